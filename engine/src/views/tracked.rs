//! Operator state that remembers which keys changed since the last checkpoint, so a
//! checkpoint can write only those (a delta on the last full checkpoint) instead of
//! every entry. Writing a view of millions of rows then costs what changed since the
//! last checkpoint, not the view's size, and the maintainer's pause stays short.
//!
//! Past the views' memory limit, entries move to disk ([`super::spill`]): the map
//! keeps two generations in memory, `young` (used since the last eviction round
//! started on this map) and `old`, and a round moves `old` entries to disk. Using an
//! `old` entry moves it back to `young`, so entries in use stay in memory. Reaching for
//! a key on disk reads it back into `young`. A key lives in exactly one place.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use datafusion::common::Result;

use super::codec::{Reader, Writer};
use super::spill::{Cold, Round, Spill};
use super::zset::Map;

/// Approximate heap bytes an entry's value holds (besides its key and its slot in the
/// map, which [`Tracked::table_bytes`] counts), for `quiver_view_state_bytes`.
pub(crate) trait Footprint {
    fn footprint(&self) -> usize;
}

/// A value that checkpoints and the spill file can hold: its bytes, and how to read
/// them back (with what the map's owner knows about its values, e.g. which
/// accumulators a group has).
pub(crate) trait Stored: Footprint + Sized {
    type Ctx: std::fmt::Debug + Default + Send + Sync;
    fn encode(&self, w: &mut Writer);
    fn decode(r: &mut Reader<'_>, ctx: &Self::Ctx) -> Result<Self>;
}

/// A value from [`Tracked::get`]: in memory, or read back from disk.
pub(crate) enum Got<'a, V> {
    Held(&'a V),
    Read(V),
}

impl<V> std::ops::Deref for Got<'_, V> {
    type Target = V;
    fn deref(&self) -> &V {
        match self {
            Got::Held(v) => v,
            Got::Read(v) => v,
        }
    }
}

/// How long entries stay in memory at least after a round: the young generation
/// becomes the old one (whose entries a round moves to disk) no sooner.
const MIN_AGE: std::time::Duration = std::time::Duration::from_secs(10);

/// Most changed keys whose entries [`Tracked::footprint`] weighs one by one; past it,
/// it weighs that many and scales (the set is in no order, so they are a fair sample).
const WEIGHED: usize = 4096;

/// A map from encoded keys to state, with the keys changed since the last save.
#[derive(Debug)]
pub(crate) struct Tracked<V: Stored> {
    young: Map<Box<[u8]>, V>,
    old: Map<Box<[u8]>, V>,
    changed: Map<Box<[u8]>, ()>,
    /// The footprint of the entries in memory whose keys are not in `changed`, so the
    /// whole footprint costs what changed to compute, not the map's size.
    settled: usize,
    /// The footprint of the entries the last save wrote, and whether it wrote all.
    saved: AtomicUsize,
    saved_full: AtomicBool,
    /// False: nothing is checkpointed from this map, so changes are not remembered
    /// (and the footprint is not kept either).
    track: bool,
    ctx: V::Ctx,
    /// The entries on disk, once a round has moved any.
    cold: Option<Cold>,
    /// Entries written in a round not yet committed, and their settled footprint.
    limbo: Vec<(Box<[u8]>, V)>,
    limbo_settled: usize,
    /// When `young` became `old` last.
    rotated: Option<std::time::Instant>,
}

/// Changed-key sets a checkpoint has taken, to be freed off the maintainer thread.
pub(crate) type Spent = Vec<Map<Box<[u8]>, ()>>;

impl<V: Stored> Default for Tracked<V> {
    fn default() -> Self {
        Self::with_ctx(V::Ctx::default())
    }
}

impl<V: Stored> Tracked<V> {
    /// A map whose values need `ctx` to be read back.
    pub(crate) fn with_ctx(ctx: V::Ctx) -> Self {
        Self {
            young: Map::default(),
            old: Map::default(),
            changed: Map::default(),
            settled: 0,
            saved: AtomicUsize::new(0),
            saved_full: AtomicBool::new(false),
            track: true,
            ctx,
            cold: None,
            limbo: Vec::new(),
            limbo_settled: 0,
            rotated: None,
        }
    }

    /// A map whose changes are not remembered: for state no checkpoint holds.
    pub(crate) fn untracked() -> Self {
        Self {
            track: false,
            ..Self::default()
        }
    }

    /// The bytes of the hash tables themselves: every slot, used or not, and its
    /// control byte. A table doubles when it fills, so right after it has grown half
    /// its slots are empty; counting entries alone missed about as much as they held.
    pub(crate) fn table_bytes(&self) -> usize {
        table_bytes::<(Box<[u8]>, V)>(self.young.capacity())
            + table_bytes::<(Box<[u8]>, V)>(self.old.capacity())
            + table_bytes::<(Box<[u8]>, ())>(self.changed.capacity())
            + self
                .cold
                .as_ref()
                .map_or(0, |c| table_bytes::<(Box<[u8]>, ())>(c.shadowed_capacity()))
    }
}

/// The bytes of a hash table that can hold `capacity` entries of type `T` (its slots
/// are a power of two, at most 7/8 full).
pub(crate) fn table_bytes<T>(capacity: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    let slots = (capacity * 8 / 7).next_power_of_two();
    slots * (std::mem::size_of::<T>() + 1)
}

/// What the allocator adds to an allocation of `len` bytes, on average (jemalloc's
/// size classes round a small request up by an eighth to a quarter).
pub(crate) fn alloc_bytes(len: usize) -> usize {
    len + len / 8 + 8
}

fn entry_bytes<V: Footprint>(key: &[u8], value: &V) -> usize {
    alloc_bytes(key.len()) + value.footprint()
}

impl<V: Stored> Tracked<V> {
    /// Counts `key` as changed. True the first time since the last checkpoint: the
    /// caller then takes the entry's old footprint out of the settled one.
    fn mark(track: bool, changed: &mut Map<Box<[u8]>, ()>, key: &[u8]) -> bool {
        if !track || changed.contains_key(key) {
            return false;
        }
        changed.insert(key.into(), ());
        true
    }

    pub(crate) fn len(&self) -> usize {
        self.young.len() + self.old.len() + self.cold.as_ref().map_or(0, Cold::live)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn decode(&self, bytes: &[u8]) -> V {
        V::decode(&mut Reader::new(bytes), &self.ctx).unwrap_or_else(|e| {
            // Written by this process a moment ago: a value that does not read back
            // is a bug, not bad input.
            panic!("a view state entry read back from disk does not decode: {e}")
        })
    }

    /// The entry if it is in memory, as every entry the current batch has used is.
    pub(crate) fn get_held(&self, key: &[u8]) -> Option<&V> {
        self.young.get(key).or_else(|| self.old.get(key))
    }

    /// The entry, wherever it is; one on disk is read, and stays there.
    pub(crate) fn get(&self, key: &[u8]) -> Option<Got<'_, V>> {
        if let Some(v) = self.get_held(key) {
            return Some(Got::Held(v));
        }
        let bytes = self.cold.as_ref()?.get(key)?;
        Some(Got::Read(self.decode(&bytes)))
    }

    /// Brings the entry of `key`, if any, into `young`. True if there is one.
    fn fetch(&mut self, key: &[u8]) -> bool {
        if self.young.contains_key(key) {
            return true;
        }
        if let Some((k, v)) = self.old.remove_entry(key) {
            self.young.insert(k, v);
            return true;
        }
        let Some(bytes) = self.cold.as_ref().and_then(|c| c.get(key)) else {
            return false;
        };
        let value = self.decode(&bytes);
        if let Some(cold) = self.cold.as_mut() {
            cold.shadow(key);
        }
        if self.track && !self.changed.contains_key(key) {
            self.settled += entry_bytes(key, &value);
        }
        self.young.insert(key.into(), value);
        true
    }

    pub(crate) fn contains_key(&mut self, key: &[u8]) -> bool {
        self.fetch(key)
    }

    /// The entry for changing; it counts as changed.
    pub(crate) fn get_mut(&mut self, key: &[u8]) -> Option<&mut V> {
        if !self.fetch(key) {
            return None;
        }
        let value = self.young.get_mut(key)?;
        if Self::mark(self.track, &mut self.changed, key) {
            self.settled -= entry_bytes(key, value);
        }
        Some(value)
    }

    pub(crate) fn insert(&mut self, key: Box<[u8]>, value: V) {
        self.fetch(&key);
        let first = Self::mark(self.track, &mut self.changed, &key);
        let len = key.len();
        if let Some(old) = self.young.insert(key, value)
            && first
        {
            self.settled -= alloc_bytes(len) + old.footprint();
        }
    }

    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<V> {
        if !self.fetch(key) {
            return None;
        }
        let value = self.young.remove(key)?;
        if Self::mark(self.track, &mut self.changed, key) {
            self.settled -= entry_bytes(key, &value);
        }
        Some(value)
    }

    /// The entries in memory: all of them, for a map the maintainer never moves to
    /// disk (a view's own rows, a temporal filter's spans).
    pub(crate) fn iter_in_memory(&self) -> impl Iterator<Item = (&Box<[u8]>, &V)> {
        debug_assert!(self.cold.is_none(), "entries of this map are on disk");
        self.young.iter().chain(self.old.iter())
    }

    /// Every entry, in memory and on disk (those read one at a time).
    pub(crate) fn for_each(&self, mut f: impl FnMut(&[u8], &V) -> Result<()>) -> Result<()> {
        for (k, v) in self.young.iter().chain(self.old.iter()) {
            f(k, v)?;
        }
        if let Some(cold) = &self.cold {
            cold.scan(|k, bytes| {
                let v = V::decode(&mut Reader::new(bytes), &self.ctx)?;
                f(k, &v)
            })?;
        }
        Ok(())
    }

    /// Writes every entry, or with `delta` only the changed keys (a removed key as
    /// absent). Either way: a count, then `key, present, [value]` per entry.
    pub(crate) fn save(&self, w: &mut Writer, delta: bool) {
        let mut present = 0;
        let held = |key: &[u8]| {
            self.young
                .get(key)
                .or_else(|| self.old.get(key))
                .map(|v| entry_bytes(key, v))
        };
        if delta {
            w.u64(self.changed.len() as u64);
            for key in self.changed.keys() {
                w.bytes(key);
                match self.get(key) {
                    Some(v) => {
                        w.u64(1);
                        v.encode(w);
                        present += held(key).unwrap_or(0);
                    }
                    None => w.u64(0),
                }
            }
        } else {
            w.u64(self.len() as u64);
            // Reading the disk cannot fail short of a broken file, which stops the
            // process (see `spill`); a value that does not decode is a bug.
            let written = self.for_each(|key, v| {
                w.bytes(key);
                w.u64(1);
                v.encode(w);
                present += held(key).unwrap_or(0);
                Ok(())
            });
            if let Err(e) = written {
                panic!("view state could not be listed for a checkpoint: {e}");
            }
        }
        // Counted here, where each entry is at hand, so that forgetting the changes
        // need not look every changed key up again.
        self.saved.store(present, Ordering::Relaxed);
        self.saved_full.store(!delta, Ordering::Relaxed);
    }

    /// Reads what [`Tracked::save`] wrote: a full save replaces every entry, a delta
    /// is applied on top of what is held. Nothing counts as changed afterwards.
    pub(crate) fn load(&mut self, r: &mut Reader<'_>, delta: bool) -> Result<()> {
        if !delta {
            self.young.clear();
            self.old.clear();
            self.cold = None;
        }
        for _ in 0..r.u64()? {
            let key = r.boxed()?;
            self.fetch(&key);
            if r.u64()? == 1 {
                let v = V::decode(r, &self.ctx)?;
                self.young.insert(key, v);
            } else {
                self.young.remove(&key);
            }
        }
        self.changed.clear();
        self.settled = self
            .young
            .iter()
            .chain(self.old.iter())
            .map(|(k, v)| entry_bytes(k, v))
            .sum();
        Ok(())
    }

    /// After a checkpoint has saved the changes: start counting again. The taken set
    /// goes to `spent`, to be freed elsewhere (a million keys take a while to free).
    pub(crate) fn forget_changes(&mut self, spent: &mut Spent) {
        let saved = *self.saved.get_mut();
        self.settled = if *self.saved_full.get_mut() {
            saved
        } else {
            self.settled + saved
        };
        spent.push(std::mem::take(&mut self.changed));
    }

    /// Approximate bytes held in memory: the tables, every entry's footprint, and the
    /// changed keys. Costs at most `WEIGHED` lookups, not the map's size.
    pub(crate) fn footprint(&self) -> usize {
        debug_assert!(self.track, "an untracked map keeps no footprint");
        let weigh =
            |k: &[u8]| alloc_bytes(k.len()) + self.get_held(k).map_or(0, |v| entry_bytes(k, v));
        let changed = if self.changed.len() <= WEIGHED {
            self.changed.keys().map(|k| weigh(k)).sum::<usize>()
        } else {
            let sample: usize = self.changed.keys().take(WEIGHED).map(|k| weigh(k)).sum();
            sample / WEIGHED * self.changed.len()
        };
        self.table_bytes() + self.settled + changed
    }

    /// Bytes of keys and values on disk.
    pub(crate) fn disk_bytes(&self) -> usize {
        self.cold.as_ref().map_or(0, |c| c.bytes)
    }
}

/// Operator state the maintainer can move to disk, whatever its values.
pub(crate) trait Spillable {
    /// Bytes held in memory.
    fn memory_bytes(&self) -> usize;
    /// `force`: a new generation may start at once (at a restore, and in tests).
    fn evict(
        &mut self,
        round: &mut Round,
        spill: &std::sync::Arc<Spill>,
        want: usize,
        force: bool,
    ) -> Result<usize>;
    fn settle(&mut self, committed: bool);
}

impl<V: Stored> Spillable for Tracked<V> {
    fn memory_bytes(&self) -> usize {
        self.footprint()
    }

    /// Moves entries not used lately to disk in `round`, about `want` bytes of them
    /// (fewer if that is all the map has). Returns the bytes of memory it frees. The
    /// entries wait in `limbo` until [`Spillable::settle`] says whether the round was
    /// committed: the caller holds the state locked until then.
    fn evict(
        &mut self,
        round: &mut Round,
        spill: &std::sync::Arc<Spill>,
        want: usize,
        force: bool,
    ) -> Result<usize> {
        debug_assert!(self.limbo.is_empty(), "a round was not settled");
        if self.old.is_empty() {
            // A new generation: what is used from here on is moved back to `young`.
            // Not before the young one is `MIN_AGE` old, so that what is in use is not
            // moved out and read back at every round when the limit cannot be met.
            if !force && self.rotated.is_some_and(|t| t.elapsed() < MIN_AGE) {
                return Ok(0);
            }
            self.old = std::mem::take(&mut self.young);
            self.rotated = Some(std::time::Instant::now());
        }
        let mut freed = 0;
        for (key, value) in self.old.extract_if(|_, _| true) {
            let bytes = entry_bytes(&key, &value);
            freed += bytes;
            if self.track && !self.changed.contains_key(&key) {
                self.limbo_settled += bytes;
            }
            self.limbo.push((key, value));
            if freed >= want {
                break;
            }
        }
        // In key order: a B-tree takes sorted inserts several times faster than random
        // ones (pages fill in turn instead of splitting everywhere).
        self.limbo.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut w = Writer::default();
        let mut ends = Vec::with_capacity(self.limbo.len());
        for (_, value) in &self.limbo {
            value.encode(&mut w);
            ends.push(w.buf.len());
        }
        let encoded = w.buf;
        let starts = std::iter::once(0).chain(ends.iter().copied());
        let entries = self
            .limbo
            .iter()
            .zip(starts.zip(ends.iter().copied()))
            .map(|((k, _), (a, b))| (&**k, &encoded[a..b]));
        let cold = self.cold.get_or_insert_with(|| Cold::new(spill));
        cold.write(round, entries)?;
        Ok(freed)
    }

    /// After the round [`Spillable::evict`] wrote in: committed, the entries in limbo
    /// are on disk and their memory is freed; not, they go back where they were.
    fn settle(&mut self, committed: bool) {
        if let Some(cold) = self.cold.as_mut() {
            cold.settle(committed);
        }
        if committed {
            self.settled -= self.limbo_settled;
            self.limbo.clear();
        } else {
            self.old.extend(self.limbo.drain(..));
        }
        self.limbo_settled = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Footprint for i64 {
        fn footprint(&self) -> usize {
            8
        }
    }

    impl Stored for i64 {
        type Ctx = ();
        fn encode(&self, w: &mut Writer) {
            w.i64(*self);
        }
        fn decode(r: &mut Reader<'_>, (): &()) -> Result<Self> {
            r.i64()
        }
    }

    fn save(t: &Tracked<i64>, delta: bool) -> Vec<u8> {
        let mut w = Writer::default();
        t.save(&mut w, delta);
        w.buf
    }

    fn load(t: &mut Tracked<i64>, bytes: &[u8], delta: bool) {
        let mut r = Reader::new(bytes);
        t.load(&mut r, delta).unwrap();
        assert!(r.is_done());
    }

    fn entries(t: &Tracked<i64>) -> Vec<(Vec<u8>, i64)> {
        let mut v = Vec::new();
        t.for_each(|k, x| {
            v.push((k.to_vec(), *x));
            Ok(())
        })
        .unwrap();
        v.sort();
        v
    }

    #[test]
    fn a_full_save_and_its_deltas_rebuild_the_map() {
        let mut live = Tracked::default();
        for i in 0..100u8 {
            live.insert(vec![i].into(), i64::from(i));
        }
        let base = save(&live, false);
        live.forget_changes(&mut Vec::new());
        // Changes: updates, removals, new keys, and a key removed then added again.
        *live.get_mut(&[3]).unwrap() += 1000;
        live.remove(&[4]);
        live.insert(vec![200].into(), 7);
        live.remove(&[5]);
        live.insert(vec![5].into(), 55);
        let d1 = save(&live, true);
        live.forget_changes(&mut Vec::new());
        live.remove(&[200]);
        *live.get_mut(&[6]).unwrap() = -6;
        let d2 = save(&live, true);
        live.forget_changes(&mut Vec::new());

        let mut restored = Tracked::default();
        load(&mut restored, &base, false);
        load(&mut restored, &d1, true);
        load(&mut restored, &d2, true);
        assert_eq!(entries(&restored), entries(&live));
        // A delta holds only what changed.
        assert!(d2.len() < base.len() / 10, "{} vs {}", d2.len(), base.len());
        // The footprint kept up to date equals one counted from scratch, besides the
        // tables (whose capacity depends on how the map grew).
        let mut counted = 0;
        live.for_each(|k, v| {
            counted += entry_bytes(k, v);
            Ok(())
        })
        .unwrap();
        assert_eq!(live.footprint() - live.table_bytes(), counted);
        assert_eq!(restored.footprint() - restored.table_bytes(), counted);
        assert!(live.table_bytes() >= live.len() * (std::mem::size_of::<(Box<[u8]>, i64)>() + 1));
    }

    #[test]
    fn reading_without_changing_marks_nothing() {
        let mut t = Tracked::default();
        t.insert(vec![1].into(), 1);
        save(&t, false);
        t.forget_changes(&mut Vec::new());
        assert!(t.get(&[1]).is_some());
        assert!(t.get_mut(&[9]).is_none());
        assert!(t.remove(&[9]).is_none());
        let delta = save(&t, true);
        let mut r = Reader::new(&delta);
        assert_eq!(r.u64().unwrap(), 0);
    }

    /// Runs one round on `t` moving about `want` bytes to disk; commits it or not.
    fn round(t: &mut Tracked<i64>, spill: &std::sync::Arc<Spill>, want: usize, commit: bool) {
        forced_or_not(t, spill, want, commit, true);
    }

    fn forced_or_not(
        t: &mut Tracked<i64>,
        spill: &std::sync::Arc<Spill>,
        want: usize,
        commit: bool,
        force: bool,
    ) {
        let mut round = spill.begin().unwrap();
        t.evict(&mut round, spill, want, force).unwrap();
        if commit {
            round.commit().unwrap();
        }
        t.settle(commit);
    }

    fn key(i: u32) -> Box<[u8]> {
        i.to_be_bytes().into()
    }

    #[test]
    fn entries_on_disk_read_back_change_and_checkpoint_as_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let spill = Spill::create(dir.path(), 1 << 20).unwrap();
        let mut live = Tracked::default();
        let mut model = std::collections::BTreeMap::new();
        for i in 0..1000u32 {
            live.insert(key(i), i64::from(i));
            model.insert(key(i).to_vec(), i64::from(i));
        }
        let base = save(&live, false);
        live.forget_changes(&mut Vec::new());
        let all = live.footprint();

        // About half goes to disk; everything is still there.
        round(&mut live, &spill, all / 2, true);
        assert!(live.disk_bytes() > 0, "nothing went to disk");
        assert!(
            live.footprint() < all * 3 / 4,
            "{} of {all}",
            live.footprint()
        );
        assert_eq!(live.len(), 1000);
        assert_eq!(
            entries(&live),
            model.clone().into_iter().collect::<Vec<_>>()
        );

        // Changes to entries wherever they are: updated, removed, added back.
        for i in (0..1000u32).step_by(7) {
            *live.get_mut(&key(i)).unwrap() += 10_000;
            *model.get_mut(&key(i)[..]).unwrap() += 10_000;
        }
        for i in (3..1000u32).step_by(11) {
            assert_eq!(live.remove(&key(i)), model.remove(&key(i)[..]));
        }
        live.insert(key(3), -3);
        model.insert(key(3).to_vec(), -3);
        live.insert(key(5000), 5);
        model.insert(key(5000).to_vec(), 5);
        assert!(!live.contains_key(&key(14)), "removed above");
        assert_eq!(live.len(), model.len());

        // A round that is not committed loses nothing.
        round(&mut live, &spill, usize::MAX, false);
        assert_eq!(
            entries(&live),
            model.clone().into_iter().collect::<Vec<_>>()
        );
        // All of it to disk (two rounds: the old generation, then the young one).
        round(&mut live, &spill, usize::MAX, true);
        round(&mut live, &spill, usize::MAX, true);
        assert_eq!(
            entries(&live),
            model.clone().into_iter().collect::<Vec<_>>()
        );
        for (k, v) in &model {
            assert_eq!(live.get(k).map(|g| *g), Some(*v));
        }

        // A delta saved with the changes on disk rebuilds the map on the base.
        let delta = save(&live, true);
        live.forget_changes(&mut Vec::new());
        let mut restored = Tracked::default();
        load(&mut restored, &base, false);
        load(&mut restored, &delta, true);
        assert_eq!(entries(&restored), entries(&live));
        // So does a full save, read from disk.
        let mut whole = Tracked::default();
        load(&mut whole, &save(&live, false), false);
        assert_eq!(entries(&whole), entries(&live));
        // Memory is what is in memory: the footprint of entries on disk is gone.
        assert!(live.footprint() < all / 4, "{} of {all}", live.footprint());
    }

    #[test]
    fn entries_used_in_the_last_generation_stay_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let spill = Spill::create(dir.path(), 1 << 20).unwrap();
        let mut t = Tracked::default();
        for i in 0..100u32 {
            t.insert(key(i), 1);
        }
        // No generation yet: the first round starts one and moves it all out.
        forced_or_not(&mut t, &spill, usize::MAX, true, false);
        let on_disk = t.disk_bytes();
        assert!(on_disk > 0);
        // Entries used since are younger than the floor: a round leaves them.
        for i in 0..50u32 {
            *t.get_mut(&key(i)).unwrap() += 1;
        }
        t.insert(key(1000), 1);
        forced_or_not(&mut t, &spill, usize::MAX, true, false);
        assert_eq!(t.disk_bytes(), on_disk, "entries in use went to disk");
        assert_eq!(t.get_held(&key(7)).copied(), Some(2));
        // Forced (a restore), they go.
        forced_or_not(&mut t, &spill, usize::MAX, true, true);
        assert!(t.get_held(&key(7)).is_none());
        assert_eq!(t.get(&key(7)).map(|v| *v), Some(2));
    }
}
