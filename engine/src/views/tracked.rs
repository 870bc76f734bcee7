//! Operator state that remembers which keys changed since the last checkpoint, so a
//! checkpoint can write only those (a delta on the last full checkpoint) instead of
//! every entry. Writing a view of millions of rows then costs what changed since the
//! last checkpoint, not the view's size.
//!
//! Nor does the maintainer wait for the writing. A save freezes the map: it moves into
//! an `Arc` that the checkpoint thread reads while it writes, and changes made in the
//! meantime go to a small overlay on top of it (copy on write, per entry). When the
//! checkpoint thread is done the maintainer folds the overlay back into the map. The
//! maintainer's pause is then the time to swap two pointers per map, whatever the size
//! of the state or of the delta.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, mpsc};

use datafusion::common::Result;
use tracing::warn;

use super::codec::{Reader, Writer};
use super::zset::Map;

/// Approximate bytes an entry's value holds (besides its key), for
/// `quiver_view_state_bytes`.
pub(crate) trait Footprint {
    fn footprint(&self) -> usize;
}

/// What a state map holds: a value that can be counted, copied on write while a
/// save is being written, and sent to the thread that writes it.
pub(crate) trait Entry: Footprint + Clone + Send + Sync + 'static {}

impl<T: Footprint + Clone + Send + Sync + 'static> Entry for T {}

type Keys = Map<Box<[u8]>, ()>;

/// A map from encoded keys to state, with the keys changed since the last save.
#[derive(Debug)]
pub(crate) struct Tracked<V> {
    map: Map<Box<[u8]>, V>,
    changed: Keys,
    /// The footprint of the entries whose keys are not in `changed`, so the whole
    /// footprint costs what changed to compute, not the map's size.
    settled: usize,
    /// While a save is being written: the map as it was, which that save reads, and
    /// what changed since (none: removed). `map` is empty meanwhile.
    frozen: Option<Arc<Map<Box<[u8]>, V>>>,
    overlay: Map<Box<[u8]>, Option<V>>,
    /// Entries held while frozen.
    frozen_len: usize,
    /// The whole footprint as of the last save, counted by the thread that wrote it.
    saved: Arc<AtomicUsize>,
}

impl<V> Default for Tracked<V> {
    fn default() -> Self {
        Self {
            map: Map::default(),
            changed: Map::default(),
            settled: 0,
            frozen: None,
            overlay: Map::default(),
            frozen_len: 0,
            saved: Arc::default(),
        }
    }
}

/// Drops `garbage` on a thread of its own, off the maintainer's.
fn free_elsewhere(garbage: Box<dyn Send>) {
    type Garbage = Box<dyn Send>;
    static FREER: OnceLock<Option<mpsc::Sender<Garbage>>> = OnceLock::new();
    let freer = FREER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Garbage>();
        std::thread::Builder::new()
            .name("quiver-views-free".into())
            .spawn(move || rx.into_iter().for_each(drop))
            .ok()
            .map(|_| tx)
    });
    if let Some(tx) = freer {
        // (Should that thread be gone, the garbage comes back and is dropped here.)
        let _ = tx.send(garbage);
    }
}

fn entry_bytes<V: Footprint>(key: &[u8], value: &V) -> usize {
    key.len() + value.footprint()
}

impl<V: Entry> Tracked<V> {
    /// Counts `key` as changed. True the first time since the last checkpoint: the
    /// caller then takes the entry's old footprint out of the settled one (not while
    /// frozen: the overlay is settled when it is folded back).
    fn mark(changed: &mut Keys, key: &[u8]) -> bool {
        if changed.contains_key(key) {
            return false;
        }
        changed.insert(key.into(), ());
        true
    }

    pub(crate) fn len(&self) -> usize {
        if self.frozen.is_some() {
            self.frozen_len
        } else {
            self.map.len()
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn contains_key(&self, key: &[u8]) -> bool {
        self.get(key).is_some()
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<&V> {
        match &self.frozen {
            None => self.map.get(key),
            Some(frozen) => match self.overlay.get(key) {
                Some(v) => v.as_ref(),
                None => frozen.get(key),
            },
        }
    }

    /// The entry for changing; it counts as changed.
    pub(crate) fn get_mut(&mut self, key: &[u8]) -> Option<&mut V> {
        let Some(frozen) = &self.frozen else {
            let value = self.map.get_mut(key)?;
            if Self::mark(&mut self.changed, key) {
                self.settled -= entry_bytes(key, value);
            }
            return Some(value);
        };
        if !self.overlay.contains_key(key) {
            let copy = frozen.get(key)?.clone();
            self.overlay.insert(key.into(), Some(copy));
            Self::mark(&mut self.changed, key);
        }
        self.overlay.get_mut(key)?.as_mut()
    }

    pub(crate) fn insert(&mut self, key: Box<[u8]>, value: V) {
        let first = Self::mark(&mut self.changed, &key);
        let Some(frozen) = &self.frozen else {
            let len = key.len();
            if let Some(old) = self.map.insert(key, value)
                && first
            {
                self.settled -= len + old.footprint();
            }
            return;
        };
        let held = match self.overlay.get(&key) {
            Some(v) => v.is_some(),
            None => frozen.contains_key(&key),
        };
        if !held {
            self.frozen_len += 1;
        }
        self.overlay.insert(key, Some(value));
    }

    /// Removes `key`; true if it was there.
    pub(crate) fn remove(&mut self, key: &[u8]) -> bool {
        let Some(frozen) = &self.frozen else {
            let Some(value) = self.map.remove(key) else {
                return false;
            };
            if Self::mark(&mut self.changed, key) {
                self.settled -= entry_bytes(key, &value);
            }
            return true;
        };
        let held = match self.overlay.get_mut(key) {
            Some(v) => v.take().is_some(),
            None if frozen.contains_key(key) => {
                self.overlay.insert(key.into(), None);
                true
            }
            None => false,
        };
        if held {
            Self::mark(&mut self.changed, key);
            self.frozen_len -= 1;
        }
        held
    }

    /// Every entry, in no order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&[u8], &V)> {
        let (plain, frozen) = match &self.frozen {
            None => (Some(self.map.iter()), None),
            Some(frozen) => {
                let under = frozen
                    .iter()
                    .filter(|(k, _)| !self.overlay.contains_key(&***k));
                let over = self
                    .overlay
                    .iter()
                    .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)));
                (None, Some(under.chain(over)))
            }
        };
        plain
            .into_iter()
            .flatten()
            .chain(frozen.into_iter().flatten())
            .map(|(k, v)| (&**k, v))
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    /// Lays out a save: every entry, or with `delta` only the keys changed since the
    /// last save (a removed key as absent). Either way: a count, then `key, present,
    /// [value]` per entry. The entries are written later, by [`Writer::finish`] on
    /// the checkpoint thread; until [`Tracked::thaw`] the map is frozen under an
    /// overlay. Changes count from here on.
    pub(crate) fn save(&mut self, w: &mut Writer, delta: bool, value: fn(&mut Writer, &V)) {
        self.thaw();
        let frozen = Arc::new(std::mem::take(&mut self.map));
        self.frozen_len = frozen.len();
        self.frozen = Some(Arc::clone(&frozen));
        let keys = std::mem::take(&mut self.changed);
        let settled = self.settled;
        let saved = Arc::clone(&self.saved);
        w.defer(Box::new(move |w| {
            let mut present = 0;
            if delta {
                w.u64(keys.len() as u64);
                for key in keys.keys() {
                    w.bytes(key);
                    match frozen.get(key) {
                        Some(v) => {
                            w.u64(1);
                            value(w, v);
                            present += entry_bytes(key, v);
                        }
                        None => w.u64(0),
                    }
                }
                present += settled;
            } else {
                w.u64(frozen.len() as u64);
                for (key, v) in frozen.iter() {
                    w.bytes(key);
                    w.u64(1);
                    value(w, v);
                    present += entry_bytes(key, v);
                }
            }
            // Counted here, where each entry is at hand; stored before the map is let
            // go, so the maintainer sees it once it can take the map back.
            saved.store(present, Ordering::Release);
            // The changed keys are freed here too (a million keys take a while).
            drop(keys);
            drop(frozen);
        }));
    }

    /// Folds the changes made while a save was being written back into the map.
    /// Call once that save is written (or dropped): the map is then this map's alone.
    pub(crate) fn thaw(&mut self) {
        let Some(frozen) = self.frozen.take() else {
            return;
        };
        let mut map = Arc::try_unwrap(frozen).unwrap_or_else(|shared| {
            warn!("view state was still shared when its checkpoint ended; copied");
            (*shared).clone()
        });
        // Every entry was settled as of the save; those changed since are not (their
        // keys are in `changed`, and the overlay holds exactly those).
        let mut settled = self.saved.load(Ordering::Acquire);
        let mut replaced = Vec::with_capacity(self.overlay.len());
        for (key, value) in self.overlay.drain() {
            let key_len = key.len();
            let old = match value {
                Some(v) => map.insert(key, v),
                None => map.remove(&key),
            };
            if let Some(old) = old {
                settled = settled.saturating_sub(key_len + old.footprint());
                replaced.push(old);
            }
        }
        // The entries replaced may hold much (a group's distinct values): freeing them
        // here would hold the views up.
        if !replaced.is_empty() {
            free_elsewhere(Box::new(replaced));
        }
        self.settled = settled;
        self.map = map;
    }

    /// Reads what [`Tracked::save`] wrote: a full save replaces every entry, a delta
    /// is applied on top of what is held. Nothing counts as changed afterwards.
    pub(crate) fn load(
        &mut self,
        r: &mut Reader<'_>,
        delta: bool,
        mut value: impl FnMut(&mut Reader<'_>) -> Result<V>,
    ) -> Result<()> {
        self.thaw();
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

    /// Approximate bytes held: every entry's footprint, and the changed keys. Costs
    /// what changed since the last checkpoint, not the map's size. While a save is
    /// being written, the footprint as of the last save written.
    pub(crate) fn footprint(&self) -> usize {
        if self.frozen.is_some() {
            return self.saved.load(Ordering::Acquire);
        }
        self.settled
            + self
                .changed
                .keys()
                .map(|k| k.len() + 24 + self.map.get(&**k).map_or(0, |v| entry_bytes(k, v)))
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

    /// Lays out a save; the bytes are made only by `finish`, as on the checkpoint
    /// thread.
    fn save(t: &mut Tracked<i64>, delta: bool) -> Writer {
        let mut w = Writer::default();
        t.save(&mut w, delta, |w, v| w.i64(*v));
        w
    }

    fn finish(w: Writer) -> Vec<u8> {
        w.finish(0)
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

    /// The footprint counted from scratch: the entries, and the changed keys kept.
    fn counted(t: &Tracked<i64>) -> usize {
        t.iter()
            .map(|(k, v)| k.len() + v.footprint())
            .sum::<usize>()
            + t.changed.keys().map(|k| k.len() + 24).sum::<usize>()
    }

    /// Updates, removals, a new key set twice, a key removed then added again, and a
    /// removal of a key that is not there.
    fn change(t: &mut Tracked<i64>, round: i64) {
        *t.get_mut(&[3]).unwrap() += 1000 * round;
        assert!(t.remove(&[4 + round as u8]));
        t.insert(vec![200 + round as u8].into(), 0);
        t.insert(vec![200 + round as u8].into(), 7 * round);
        assert!(t.remove(&[50]));
        t.insert(vec![50].into(), 55 * round);
        assert!(!t.remove(&[150]));
        t.insert(vec![60].into(), -round);
    }

    #[test]
    fn a_full_save_and_its_deltas_rebuild_the_map() {
        let mut live = Tracked::default();
        for i in 0..100u8 {
            live.insert(vec![i].into(), i64::from(i));
        }
        let base = finish(save(&mut live, false));
        live.thaw();
        change(&mut live, 1);
        let d1 = finish(save(&mut live, true));
        live.thaw();
        change(&mut live, 2);
        let d2 = finish(save(&mut live, true));
        live.thaw();

        let mut restored = Tracked::default();
        load(&mut restored, &base, false);
        load(&mut restored, &d1, true);
        load(&mut restored, &d2, true);
        assert_eq!(entries(&restored), entries(&live));
        // A delta holds only what changed.
        assert!(d2.len() < base.len() / 5, "{} vs {}", d2.len(), base.len());
        // The footprint kept up to date equals one counted from scratch.
        assert_eq!(live.footprint(), counted(&live));
        assert_eq!(restored.footprint(), counted(&restored));
    }

    /// The maintainer goes on changing the state while the checkpoint thread writes
    /// it: the save holds the state as it was when it was laid out, reads see the
    /// changes at once, and the next delta holds them.
    #[test]
    fn changes_made_while_a_save_is_written_land_in_the_next_one() {
        let mut live = Tracked::default();
        for i in 0..100u8 {
            live.insert(vec![i].into(), i64::from(i));
        }
        let as_laid_out = entries(&live);
        let base = save(&mut live, false);
        // Frozen now: change it before the save is written.
        change(&mut live, 1);
        let mut expect = as_laid_out.clone();
        expect.retain(|(k, _)| k != &[5]);
        for (k, v) in &mut expect {
            match k[0] {
                3 => *v += 1000,
                50 => *v = 55,
                60 => *v = -1,
                _ => {}
            }
        }
        expect.push((vec![201], 7));
        expect.sort();
        assert_eq!(entries(&live), expect, "reads see the changes while frozen");
        assert_eq!(live.len(), expect.len());
        assert_eq!(live.get(&[3]), Some(&1003));
        assert!(live.get(&[5]).is_none() && !live.contains_key(&[5]));
        let base = finish(base);
        let mut restored = Tracked::default();
        load(&mut restored, &base, false);
        assert_eq!(
            entries(&restored),
            as_laid_out,
            "the save is the state laid out"
        );

        live.thaw();
        assert_eq!(entries(&live), expect);
        assert_eq!(live.footprint(), counted(&live));
        // A save laid out and changed over again before it is written.
        let d1 = save(&mut live, true);
        change(&mut live, 2);
        let after = entries(&live);
        load(&mut restored, &finish(d1), true);
        assert_eq!(entries(&restored), expect);
        live.thaw();
        let d2 = finish(save(&mut live, true));
        live.thaw();
        load(&mut restored, &d2, true);
        assert_eq!(entries(&restored), after);
        assert_eq!(entries(&live), after);
        assert_eq!(live.footprint(), counted(&live));
    }

    #[test]
    fn reading_without_changing_marks_nothing() {
        let mut t = Tracked::default();
        t.insert(vec![1].into(), 1);
        finish(save(&mut t, false));
        t.thaw();
        assert!(t.get(&[1]).is_some());
        assert!(t.get_mut(&[9]).is_none());
        assert!(!t.remove(&[9]));
        let delta = finish(save(&mut t, true));
        let mut r = Reader::new(&delta);
        assert_eq!(r.u64().unwrap(), 0);
    }
}
