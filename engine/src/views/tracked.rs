//! Operator state that remembers which keys changed since the last checkpoint, so a
//! checkpoint can write only those (a delta on the last full checkpoint) instead of
//! every entry. Writing a view of millions of rows then costs what changed since the
//! last checkpoint, not the view's size, and the maintainer's pause stays short.
//!
//! A delta is written a slice at a time between batches ([`Tracked::freeze`]): the
//! changed keys are set aside, the maintainer writes some of them after each batch,
//! and a key changed again before its turn is written first, as it was (copy on
//! write). The checkpoint holds the map as it was at the freeze, and no pause of the
//! maintainer grows with what changed.
//!
//! Past the views' memory limit, entries move to disk ([`super::spill`]): the map
//! keeps two generations in memory, `young` (used since the last eviction round
//! started on this map) and `old`, and a round moves `old` entries to disk. Using an
//! `old` entry moves it back to `young`, so entries in use stay in memory. Reaching for
//! a key on disk reads it back into `young`. A key lives in exactly one place.

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

/// A set of keys that gives any one of them up at once ([`IndexSet::pop`]), so a
/// delta can be written a few keys at a time without a cursor.
pub(crate) type Keys = indexmap::IndexSet<Box<[u8]>, foldhash::fast::RandomState>;

/// A delta being written a slice at a time: the keys still to write, and the entries
/// written so far (`key, present, [value]` each), in buffers of about `CHUNK` bytes
/// (one growing buffer would copy itself over and over, some copies inside a slice).
#[derive(Debug, Default)]
struct Frozen {
    pending: Keys,
    out: Writer,
    full: Vec<Vec<u8>>,
    count: u64,
    /// Bytes written so far.
    written: usize,
}

/// The size of the buffers a delta is written into.
const CHUNK: usize = 1 << 20;

/// A map from encoded keys to state, with the keys changed since the last save.
#[derive(Debug)]
pub(crate) struct Tracked<V: Stored> {
    young: Map<Box<[u8]>, V>,
    old: Map<Box<[u8]>, V>,
    changed: Keys,
    /// The delta being written, if any. No key is both in it and in `changed`.
    frozen: Option<Frozen>,
    /// The footprint of the entries in memory whose keys are neither in `changed` nor
    /// waiting in `frozen`, so the whole footprint costs what changed to compute, not
    /// the map's size.
    settled: usize,
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
            changed: Keys::default(),
            frozen: None,
            settled: 0,
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
            + set_bytes(self.changed.capacity())
            + self.frozen.as_ref().map_or(0, |f| {
                set_bytes(f.pending.capacity()) + f.out.buf.capacity()
            })
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

/// The sum of `sizes`, `len` of them: added up to `WEIGHED`, scaled past it (from the
/// first ones, which stand for the rest).
pub(crate) fn sampled(sizes: impl Iterator<Item = usize>, len: usize) -> usize {
    if len <= WEIGHED {
        return sizes.sum();
    }
    sizes.take(WEIGHED).sum::<usize>() / WEIGHED * len
}

/// The bytes of a [`Keys`] set that can hold `capacity` keys: its entries (hash and
/// key) and its table of their indexes.
fn set_bytes(capacity: usize) -> usize {
    capacity * std::mem::size_of::<(usize, Box<[u8]>)>() + table_bytes::<usize>(capacity)
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
    fn mark(track: bool, changed: &mut Keys, key: &[u8]) -> bool {
        if !track || changed.contains(key) {
            return false;
        }
        changed.insert(key.into());
        true
    }

    /// Whether the footprint of `key`'s entry is counted apart from the settled one:
    /// the key changed, or waits to be written in a delta.
    fn apart(changed: &Keys, frozen: Option<&Frozen>, key: &[u8]) -> bool {
        changed.contains(key) || frozen.is_some_and(|f| f.pending.contains(key))
    }

    /// Before `key`'s entry changes: if a delta still has to write it, it is written
    /// now, as it was at the freeze.
    fn thaw(&mut self, key: &[u8]) {
        if let Some(mut frozen) = self.frozen.take() {
            if frozen.pending.swap_remove(key) {
                self.write_entry(&mut frozen, key);
            }
            self.frozen = Some(frozen);
        }
    }

    /// Writes `key`'s entry as it is into a delta (which no longer holds the key), and
    /// counts its footprint as settled again.
    fn write_entry(&mut self, frozen: &mut Frozen, key: &[u8]) {
        let w = &mut frozen.out;
        let before = w.buf.len();
        frozen.count += 1;
        w.bytes(key);
        if let Some(v) = self.get_held(key) {
            w.u64(1);
            v.encode(w);
            self.settled += entry_bytes(key, v);
        } else if let Some(bytes) = self.cold.as_ref().and_then(|c| c.get(key)) {
            // The spill file holds the value as `encode` wrote it.
            w.u64(1);
            w.buf.extend_from_slice(&bytes);
        } else {
            w.u64(0);
        }
        frozen.written += w.buf.len() - before;
        if w.buf.len() >= CHUNK {
            let next = Vec::with_capacity(CHUNK + CHUNK / 4);
            frozen.full.push(std::mem::replace(&mut w.buf, next));
        }
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
        if self.track && !Self::apart(&self.changed, self.frozen.as_ref(), key) {
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
        self.thaw(key);
        let value = self.young.get_mut(key)?;
        if Self::mark(self.track, &mut self.changed, key) {
            self.settled -= entry_bytes(key, value);
        }
        Some(value)
    }

    pub(crate) fn insert(&mut self, key: Box<[u8]>, value: V) {
        self.fetch(&key);
        self.thaw(&key);
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
        self.thaw(key);
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

    /// Reads what a checkpoint holds of the map ([`Checkpointed`]): a full save
    /// replaces every entry, a delta is applied on top of what is held. Nothing counts
    /// as changed afterwards.
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
        self.frozen = None;
        self.settle_all();
        Ok(())
    }

    /// Counts every entry in memory as settled (nothing changed).
    fn settle_all(&mut self) {
        self.settled = self
            .young
            .iter()
            .chain(self.old.iter())
            .map(|(k, v)| entry_bytes(k, v))
            .sum();
    }

    /// Approximate bytes held in memory: the tables, every entry's footprint, and the
    /// changed keys. Costs at most `WEIGHED` lookups per set of keys, not the map's
    /// size.
    pub(crate) fn footprint(&self) -> usize {
        debug_assert!(self.track, "an untracked map keeps no footprint");
        let weigh = |keys: &Keys| {
            let one =
                |k: &[u8]| alloc_bytes(k.len()) + self.get_held(k).map_or(0, |v| entry_bytes(k, v));
            if keys.len() <= WEIGHED {
                keys.iter().map(|k| one(k)).sum::<usize>()
            } else {
                // Spread over the set: its order is the order keys came in.
                let step = keys.len() / WEIGHED;
                let sample: usize = (0..WEIGHED)
                    .filter_map(|i| keys.get_index(i * step))
                    .map(|k| one(k))
                    .sum();
                sample / WEIGHED * keys.len()
            }
        };
        let frozen = self.frozen.as_ref().map_or(0, |f| weigh(&f.pending));
        self.table_bytes() + self.settled + weigh(&self.changed) + frozen
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
            if self.track && !Self::apart(&self.changed, self.frozen.as_ref(), &key) {
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

/// Operator state a checkpoint holds, whatever its values. Either way a map is
/// written as a count, then `key, present, [value]` per entry.
pub(crate) trait Checkpointed {
    /// Writes every entry (a full checkpoint).
    fn save_all(&self, w: &mut Writer);
    /// After [`Checkpointed::save_all`] by the maintainer: nothing counts as changed.
    fn forget_all(&mut self);
    /// Starts a delta: the keys changed since the last one are set aside, to be
    /// written as they are now; changes from here on go to the next delta.
    fn freeze(&mut self);
    /// Writes set-aside entries until `deadline` (none: all of them). True once
    /// none is left.
    fn write_frozen(&mut self, deadline: Option<std::time::Instant>) -> bool;
    /// The delta, once written: its count and its entries (in several buffers).
    /// None if none was frozen.
    fn take_frozen(&mut self) -> Option<(u64, Vec<Vec<u8>>)>;
}

/// What a checkpoint holds of a view, in the order it is read back: bytes written as
/// they are, and maps.
pub(crate) enum Part<'a> {
    Bytes(Vec<u8>),
    Map(&'a mut dyn Checkpointed),
}

/// Writes `parts` whole, as a full checkpoint holds them.
pub(crate) fn save_all(parts: Vec<Part<'_>>, w: &mut Writer) {
    for part in parts {
        match part {
            Part::Bytes(b) => w.buf.extend_from_slice(&b),
            Part::Map(map) => map.save_all(w),
        }
    }
}

/// Entries a slice writes between looks at the clock, at most, and bytes: a group
/// with a large `COUNT(DISTINCT)` set can take a millisecond to write (at 50 M
/// events, 16 of them held the maintainer for 30 ms).
const BETWEEN_LOOKS: usize = 16;
const BYTES_BETWEEN_LOOKS: usize = 64 << 10;

impl<V: Stored> Checkpointed for Tracked<V> {
    fn save_all(&self, w: &mut Writer) {
        w.u64(self.len() as u64);
        // Reading the disk cannot fail short of a broken file, which stops the
        // process (see `spill`); a value that does not decode is a bug.
        let written = self.for_each(|key, v| {
            w.bytes(key);
            w.u64(1);
            v.encode(w);
            Ok(())
        });
        if let Err(e) = written {
            panic!("view state could not be listed for a checkpoint: {e}");
        }
    }

    fn forget_all(&mut self) {
        self.changed = Keys::default();
        self.frozen = None;
        self.settle_all();
    }

    fn freeze(&mut self) {
        debug_assert!(self.frozen.is_none(), "a delta is still being written");
        self.frozen = Some(Frozen {
            pending: std::mem::take(&mut self.changed),
            ..Frozen::default()
        });
    }

    fn write_frozen(&mut self, deadline: Option<std::time::Instant>) -> bool {
        let Some(mut frozen) = self.frozen.take() else {
            return true;
        };
        let done = loop {
            let mut left = true;
            let looked = frozen.written;
            for _ in 0..BETWEEN_LOOKS {
                let Some(key) = frozen.pending.pop() else {
                    left = false;
                    break;
                };
                self.write_entry(&mut frozen, &key);
                if frozen.written - looked >= BYTES_BETWEEN_LOOKS {
                    break;
                }
            }
            if !left {
                break true;
            }
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                break false;
            }
        };
        if done {
            // The set's table is freed now, not at the next freeze.
            frozen.pending = Keys::default();
        }
        self.frozen = Some(frozen);
        done
    }

    fn take_frozen(&mut self) -> Option<(u64, Vec<Vec<u8>>)> {
        let mut frozen = self.frozen.take()?;
        debug_assert!(frozen.pending.is_empty(), "the delta is not written yet");
        frozen.full.push(frozen.out.buf);
        Some((frozen.count, frozen.full))
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

    /// A checkpoint of `t`: whole, or a delta (frozen, then written in slices of
    /// no time at all, so one look at the clock per `BETWEEN_LOOKS` entries).
    fn save(t: &mut Tracked<i64>, delta: bool) -> Vec<u8> {
        let mut w = Writer::default();
        if delta {
            t.freeze();
            let past = std::time::Instant::now();
            while !t.write_frozen(Some(past)) {}
            let (count, entries) = t.take_frozen().unwrap();
            w.u64(count);
            w.buf.extend_from_slice(&entries.concat());
        } else {
            t.save_all(&mut w);
            t.forget_all();
        }
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
        let base = save(&mut live, false);
        // Changes: updates, removals, new keys, and a key removed then added again.
        *live.get_mut(&[3]).unwrap() += 1000;
        live.remove(&[4]);
        live.insert(vec![200].into(), 7);
        live.remove(&[5]);
        live.insert(vec![5].into(), 55);
        let d1 = save(&mut live, true);
        live.remove(&[200]);
        *live.get_mut(&[6]).unwrap() = -6;
        let d2 = save(&mut live, true);

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

    /// Footprint kept up to date, against one counted from scratch (besides the
    /// tables, whose capacity depends on how the map grew).
    fn footprint_is_exact(t: &Tracked<i64>) {
        let mut counted = 0;
        for (k, v) in t.young.iter().chain(t.old.iter()) {
            if !Tracked::<i64>::apart(&t.changed, t.frozen.as_ref(), k) {
                counted += entry_bytes(k, v);
            }
        }
        assert_eq!(t.settled, counted, "settled footprint drifted");
    }

    /// A delta written in slices while the map keeps changing holds the map as it was
    /// at the freeze: a key changed before its turn is written first, as it was.
    #[test]
    fn a_delta_written_in_slices_holds_the_map_as_it_was_at_the_freeze() {
        let dir = tempfile::tempdir().unwrap();
        let spill = Spill::create(dir.path(), 1 << 20).unwrap();
        let mut live = Tracked::default();
        for i in 0..2000u32 {
            live.insert(key(i), i64::from(i));
        }
        let base = save(&mut live, false);
        // Changes, some of them then moved to disk.
        for i in (0..2000u32).step_by(3) {
            *live.get_mut(&key(i)).unwrap() += 1;
        }
        for i in (1..2000u32).step_by(50) {
            live.remove(&key(i));
        }
        round(&mut live, &spill, usize::MAX, true);
        round(&mut live, &spill, usize::MAX, true);
        assert!(live.disk_bytes() > 0);
        let at_freeze = entries(&live);

        live.freeze();
        // A few slices, changes between them: updates, removals, re-insertions and
        // new keys, on keys the delta has and has not written yet.
        let mut slices = 0;
        let mut i = 0u32;
        while !live.write_frozen(Some(std::time::Instant::now())) {
            slices += 1;
            for _ in 0..37 {
                let k = key(i % 2100);
                match i % 4 {
                    0 => {
                        if let Some(v) = live.get_mut(&k) {
                            *v -= 1000;
                        }
                    }
                    1 => {
                        live.remove(&k);
                    }
                    2 => live.insert(k, -7),
                    _ => live.insert(key(10_000 + i), 1),
                }
                i += 7;
            }
            footprint_is_exact(&live);
        }
        assert!(slices > 10, "{slices} slices");
        let (count, entries1) = live.take_frozen().unwrap();
        let mut d1 = Writer::default();
        d1.u64(count);
        d1.buf.extend_from_slice(&entries1.concat());
        let d2 = save(&mut live, true);
        footprint_is_exact(&live);

        let mut restored = Tracked::default();
        load(&mut restored, &base, false);
        load(&mut restored, &d1.buf, true);
        assert_eq!(
            entries(&restored),
            at_freeze,
            "the delta is not the map at the freeze"
        );
        load(&mut restored, &d2, true);
        assert_eq!(entries(&restored), entries(&live));
    }

    #[test]
    fn reading_without_changing_marks_nothing() {
        let mut t = Tracked::default();
        t.insert(vec![1].into(), 1);
        save(&mut t, false);
        assert!(t.get(&[1]).is_some());
        assert!(t.get_mut(&[9]).is_none());
        assert!(t.remove(&[9]).is_none());
        let delta = save(&mut t, true);
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
        let base = save(&mut live, false);
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
        let delta = save(&mut live, true);
        let mut restored = Tracked::default();
        load(&mut restored, &base, false);
        load(&mut restored, &delta, true);
        assert_eq!(entries(&restored), entries(&live));
        // So does a full save, read from disk.
        let mut whole = Tracked::default();
        load(&mut whole, &save(&mut live, false), false);
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
