//! Operator state that remembers which keys changed since the last checkpoint, so a
//! checkpoint can write only those (a delta on the last full checkpoint) instead of
//! every entry. Writing a view of millions of rows then costs what changed since the
//! last checkpoint, not the view's size, and the maintainer's pause stays short.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use datafusion::common::Result;

use super::codec::{Reader, Writer};
use super::zset::Map;

/// Approximate heap bytes an entry's value holds (besides its key and its slot in the
/// map, which [`Tracked::table_bytes`] counts), for `quiver_view_state_bytes`.
pub(crate) trait Footprint {
    fn footprint(&self) -> usize;
}

/// A map from encoded keys to state, with the keys changed since the last save.
#[derive(Debug)]
pub(crate) struct Tracked<V> {
    map: Map<Box<[u8]>, V>,
    changed: Map<Box<[u8]>, ()>,
    /// The footprint of the entries whose keys are not in `changed`, so the whole
    /// footprint costs what changed to compute, not the map's size.
    settled: usize,
    /// The footprint of the entries the last save wrote, and whether it wrote all.
    saved: AtomicUsize,
    saved_full: AtomicBool,
    /// False: nothing is checkpointed from this map, so changes are not remembered
    /// (and the footprint is not kept either).
    track: bool,
}

/// Changed-key sets a checkpoint has taken, to be freed off the maintainer thread.
pub(crate) type Spent = Vec<Map<Box<[u8]>, ()>>;

impl<V> Default for Tracked<V> {
    fn default() -> Self {
        Self {
            map: Map::default(),
            changed: Map::default(),
            settled: 0,
            saved: AtomicUsize::new(0),
            saved_full: AtomicBool::new(false),
            track: true,
        }
    }
}

impl<V> Tracked<V> {
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
        table_bytes::<(Box<[u8]>, V)>(self.map.capacity())
            + table_bytes::<(Box<[u8]>, ())>(self.changed.capacity())
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

impl<V: Footprint> Tracked<V> {
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
        self.map.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub(crate) fn contains_key(&self, key: &[u8]) -> bool {
        self.map.contains_key(key)
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<&V> {
        self.map.get(key)
    }

    /// The entry for changing; it counts as changed.
    pub(crate) fn get_mut(&mut self, key: &[u8]) -> Option<&mut V> {
        let value = self.map.get_mut(key)?;
        if Self::mark(self.track, &mut self.changed, key) {
            self.settled -= entry_bytes(key, value);
        }
        Some(value)
    }

    pub(crate) fn insert(&mut self, key: Box<[u8]>, value: V) {
        let first = Self::mark(self.track, &mut self.changed, &key);
        let len = key.len();
        if let Some(old) = self.map.insert(key, value)
            && first
        {
            self.settled -= alloc_bytes(len) + old.footprint();
        }
    }

    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<V> {
        let value = self.map.remove(key)?;
        if Self::mark(self.track, &mut self.changed, key) {
            self.settled -= entry_bytes(key, &value);
        }
        Some(value)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Box<[u8]>, &V)> {
        self.map.iter()
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &Box<[u8]>> {
        self.map.keys()
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.map.values()
    }

    /// Writes every entry, or with `delta` only the changed keys (a removed key as
    /// absent). Either way: a count, then `key, present, [value]` per entry.
    pub(crate) fn save(&self, w: &mut Writer, delta: bool, mut value: impl FnMut(&mut Writer, &V)) {
        let mut present = 0;
        if delta {
            w.u64(self.changed.len() as u64);
            for key in self.changed.keys() {
                w.bytes(key);
                match self.map.get(key) {
                    Some(v) => {
                        w.u64(1);
                        value(w, v);
                        present += entry_bytes(key, v);
                    }
                    None => w.u64(0),
                }
            }
        } else {
            w.u64(self.map.len() as u64);
            for (key, v) in &self.map {
                w.bytes(key);
                w.u64(1);
                value(w, v);
                present += entry_bytes(key, v);
            }
        }
        // Counted here, where each entry is at hand, so that forgetting the changes
        // need not look every changed key up again.
        self.saved.store(present, Ordering::Relaxed);
        self.saved_full.store(!delta, Ordering::Relaxed);
    }

    /// Reads what [`Tracked::save`] wrote: a full save replaces every entry, a delta
    /// is applied on top of what is held. Nothing counts as changed afterwards.
    pub(crate) fn load(
        &mut self,
        r: &mut Reader<'_>,
        delta: bool,
        mut value: impl FnMut(&mut Reader<'_>) -> Result<V>,
    ) -> Result<()> {
        if !delta {
            self.map.clear();
        }
        for _ in 0..r.u64()? {
            let key = r.boxed()?;
            if r.u64()? == 1 {
                let v = value(r)?;
                self.map.insert(key, v);
            } else {
                self.map.remove(&key);
            }
        }
        self.changed.clear();
        self.settled = self.map.iter().map(|(k, v)| entry_bytes(k, v)).sum();
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

    /// Approximate bytes held: the tables, every entry's footprint, and the changed
    /// keys. Costs what changed since the last checkpoint, not the map's size.
    pub(crate) fn footprint(&self) -> usize {
        debug_assert!(self.track, "an untracked map keeps no footprint");
        self.table_bytes()
            + self.settled
            + self
                .changed
                .keys()
                .map(|k| alloc_bytes(k.len()) + self.map.get(&**k).map_or(0, |v| entry_bytes(k, v)))
                .sum::<usize>()
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

    fn save(t: &Tracked<i64>, delta: bool) -> Vec<u8> {
        let mut w = Writer::default();
        t.save(&mut w, delta, |w, v| w.i64(*v));
        w.buf
    }

    fn load(t: &mut Tracked<i64>, bytes: &[u8], delta: bool) {
        let mut r = Reader::new(bytes);
        t.load(&mut r, delta, |r| r.i64()).unwrap();
        assert!(r.is_done());
    }

    fn entries(t: &Tracked<i64>) -> Vec<(Vec<u8>, i64)> {
        let mut v: Vec<_> = t.iter().map(|(k, v)| (k.to_vec(), *v)).collect();
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
        let counted: usize = live.iter().map(|(k, v)| entry_bytes(k, v)).sum();
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
}
