//! View state beyond memory: when the views together hold more than
//! `--view-memory-limit`, the maintainer moves the entries of operator state that were
//! not used for longest to an embedded B-tree file (redb), and reads one back the next
//! time an event touches its key. Results stay exact: an entry is in memory or on disk,
//! never lost between them.
//!
//! The file is scratch space, not a checkpoint: it is emptied at every start, and the
//! state is restored from the checkpoints in the store as before (which are already
//! incremental). Writes are not synced, except one round in `SYNC_EVERY` so that redb
//! may reuse the pages freed since.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use datafusion::common::{DataFusionError, Result};
use parking_lot::Mutex;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use tracing::{error, warn};

use super::maintainer::{Maintainer, update_gauges};
use super::zset::Map;

type Def<'a> = TableDefinition<'a, &'static [u8], &'static [u8]>;
type ReadTable = redb::ReadOnlyTable<&'static [u8], &'static [u8]>;

/// One round in this many syncs the file, letting redb reuse the pages freed since.
const SYNC_EVERY: u64 = 32;

/// The spill file every view's operator state shares.
pub(crate) struct Spill {
    db: redb::Database,
    path: PathBuf,
    /// Names given to tables so far.
    tables: AtomicU64,
    /// Bumped by every committed round, so cached readers see what it wrote.
    generation: AtomicU64,
    /// Tables of state that was dropped, deleted by the next round.
    dropped: Mutex<Vec<String>>,
}

impl std::fmt::Debug for Spill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spill").field("path", &self.path).finish()
    }
}

fn storage(path: &Path, e: impl std::fmt::Display) -> DataFusionError {
    DataFusionError::Execution(format!("view state file {}: {e}", path.display()))
}

impl Spill {
    /// Creates the spill file in `dir`, replacing what an earlier run left there;
    /// redb's page cache takes at most `cache_bytes`.
    pub(crate) fn create(dir: &Path, cache_bytes: usize) -> Result<Arc<Self>> {
        std::fs::create_dir_all(dir).map_err(|e| storage(dir, e))?;
        let path = dir.join("state.redb");
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(storage(&path, e)),
        }
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(&path)
            .map_err(|e| storage(&path, e))?;
        Ok(Arc::new(Self {
            db,
            path,
            tables: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            dropped: Mutex::new(Vec::new()),
        }))
    }

    /// Bytes the file takes on disk.
    pub(crate) fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    /// Starts a round of evictions: one write transaction for all of them.
    pub(crate) fn begin(self: &Arc<Self>) -> Result<Round> {
        let mut txn = self.db.begin_write().map_err(|e| storage(&self.path, e))?;
        let generation = self.generation.load(Ordering::Relaxed) + 1;
        let durability = if generation.is_multiple_of(SYNC_EVERY) {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        };
        txn.set_durability(durability)
            .map_err(|e| storage(&self.path, e))?;
        let dropped = std::mem::take(&mut *self.dropped.lock());
        for name in &dropped {
            txn.delete_table(Def::new(name))
                .map_err(|e| storage(&self.path, e))?;
        }
        Ok(Round {
            spill: Arc::clone(self),
            txn,
            entries: 0,
        })
    }
}

/// One write transaction moving entries to disk.
pub(crate) struct Round {
    spill: Arc<Spill>,
    txn: redb::WriteTransaction,
    /// Entries moved to disk in this round.
    pub(crate) entries: usize,
}

impl Round {
    /// Makes what the round wrote visible to reads.
    pub(crate) fn commit(self) -> Result<()> {
        self.txn
            .commit()
            .map_err(|e| storage(&self.spill.path, e))?;
        self.spill.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }
}

/// The part of one map that lives on disk: a table of its own in the spill file.
pub(crate) struct Cold {
    spill: Arc<Spill>,
    table: String,
    /// Keys on disk, stale copies included.
    entries: usize,
    /// Bytes of keys and values on disk.
    pub(crate) bytes: usize,
    /// Keys whose copy on disk is stale (the entry was read back into memory, or
    /// removed): reads skip them, and the next round deletes them.
    shadowed: Map<Box<[u8]>, ()>,
    /// A read transaction on the table, with the round it saw.
    reader: Mutex<Option<(u64, Arc<ReadTable>)>>,
    /// Counts of the round in progress.
    staged: Option<Staged>,
}

impl std::fmt::Debug for Cold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cold")
            .field("table", &self.table)
            .field("entries", &self.entries)
            .finish()
    }
}

impl Drop for Cold {
    fn drop(&mut self) {
        self.spill
            .dropped
            .lock()
            .push(std::mem::take(&mut self.table));
    }
}

/// A spill file that cannot be read has lost state no checkpoint has yet: the process
/// stops, and a restart restores the views from their checkpoints and the WAL.
fn unreadable(path: &Path, e: impl std::fmt::Display) -> ! {
    error!(file = %path.display(), error = %e, "view state spill file unreadable; stopping");
    std::process::abort()
}

impl Cold {
    pub(crate) fn new(spill: &Arc<Spill>) -> Self {
        let n = spill.tables.fetch_add(1, Ordering::Relaxed);
        Self {
            spill: Arc::clone(spill),
            table: format!("t{n}"),
            entries: 0,
            bytes: 0,
            shadowed: Map::default(),
            reader: Mutex::new(None),
            staged: None,
        }
    }

    /// Keys whose current entry is on disk.
    pub(crate) fn live(&self) -> usize {
        self.entries - self.shadowed.len()
    }

    pub(crate) fn shadowed_capacity(&self) -> usize {
        self.shadowed.capacity()
    }

    /// Runs `f` on a read transaction that sees every committed round. The lock is
    /// not held while `f` runs: `f` may read this table again (a join reads both sides
    /// while it lists one).
    fn with_reader<T>(&self, f: impl FnOnce(&ReadTable) -> T) -> Option<T> {
        let generation = self.spill.generation.load(Ordering::Acquire);
        let table = {
            let mut reader = self.reader.lock();
            if reader.as_ref().is_none_or(|(g, _)| *g != generation) {
                *reader = None;
                let txn = self
                    .spill
                    .db
                    .begin_read()
                    .unwrap_or_else(|e| unreadable(&self.spill.path, e));
                match txn.open_table(Def::new(&self.table)) {
                    Ok(table) => *reader = Some((generation, Arc::new(table))),
                    Err(redb::TableError::TableDoesNotExist(_)) => return None,
                    Err(e) => unreadable(&self.spill.path, e),
                }
            }
            reader.as_ref().map(|(_, table)| Arc::clone(table))
        };
        table.map(|table| f(&table))
    }

    /// The current value of `key` on disk, encoded.
    pub(crate) fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        if self.live() == 0 || self.shadowed.contains_key(key) {
            return None;
        }
        self.with_reader(|table| {
            table
                .get(key)
                .unwrap_or_else(|e| unreadable(&self.spill.path, e))
                .map(|v| v.value().to_vec())
        })
        .flatten()
    }

    /// The current copy on disk is stale from now on.
    pub(crate) fn shadow(&mut self, key: &[u8]) {
        self.shadowed.insert(key.into(), ());
    }

    /// Every current entry on disk, encoded.
    pub(crate) fn scan(&self, mut f: impl FnMut(&[u8], &[u8]) -> Result<()>) -> Result<()> {
        if self.live() == 0 {
            return Ok(());
        }
        let path = &self.spill.path;
        self.with_reader(|table| {
            let range = table.iter().map_err(|e| storage(path, e))?;
            for item in range {
                let (k, v) = item.map_err(|e| storage(path, e))?;
                if !self.shadowed.contains_key(k.value()) {
                    f(k.value(), v.value())?;
                }
            }
            Ok(())
        })
        .unwrap_or(Ok(()))
    }

    /// Writes entries to disk in `round`: first deletes the stale copies, then adds
    /// each `(key, value)` yields. What it counts takes effect by [`Cold::settle`]
    /// once the round is committed.
    pub(crate) fn write<'a>(
        &mut self,
        round: &mut Round,
        entries: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<()> {
        let path = &self.spill.path;
        let mut table = round
            .txn
            .open_table(Def::new(&self.table))
            .map_err(|e| storage(path, e))?;
        let mut staged = Staged::default();
        for key in self.shadowed.keys() {
            if let Some(old) = table.remove(&**key).map_err(|e| storage(path, e))? {
                staged.entries -= 1;
                staged.bytes -= (key.len() + old.value().len()) as isize;
            }
        }
        for (key, value) in entries {
            table.insert(key, value).map_err(|e| storage(path, e))?;
            staged.entries += 1;
            staged.bytes += (key.len() + value.len()) as isize;
            round.entries += 1;
        }
        self.staged = Some(staged);
        Ok(())
    }

    /// After the round that [`Cold::write`] wrote in: committed, its counts take
    /// effect and the stale copies are gone; not, nothing it did happened.
    pub(crate) fn settle(&mut self, committed: bool) {
        let Some(staged) = self.staged.take() else {
            return;
        };
        if committed {
            self.entries = self.entries.saturating_add_signed(staged.entries);
            self.bytes = self.bytes.saturating_add_signed(staged.bytes);
            self.shadowed.clear();
        }
    }
}

/// What a round changes in a table's counts, until it is committed.
#[derive(Debug, Default)]
struct Staged {
    entries: isize,
    bytes: isize,
}

/// Opens the spill file when the views have a memory limit. Without a file the limit
/// cannot be kept; that is logged, and the views run unbounded.
pub(super) fn open(options: &super::ViewOptions) -> Option<Arc<Spill>> {
    if options.memory_limit == 0 {
        return None;
    }
    let dir = options.state_dir.as_ref()?;
    // redb's page cache: a sixteenth of the limit, within 4 to 64 MiB.
    let cache = (options.memory_limit / 16).clamp(4 << 20, 64 << 20);
    match Spill::create(dir, cache) {
        Ok(spill) => Some(spill),
        Err(e) => {
            error!(error = %e, "cannot create the view state spill file; view state is not bounded");
            None
        }
    }
}

/// How often the views' state is weighed against the limit.
const WEIGH_EVERY: Duration = Duration::from_millis(100);
/// Most bytes one round moves to disk: a round holds the views it moves state of
/// locked, so a larger excess is worked off over the next rounds.
const ROUND_BYTES: usize = 32 << 20;

impl Maintainer {
    /// Weighs the views' state (and sets their gauges); past the memory limit, moves
    /// the operator state not used for longest to disk, from the largest views first,
    /// down to 15/16 of the limit so that a round is not needed after every batch.
    /// True if a round moved state to disk.
    pub(super) fn bound_memory(&mut self, force: bool) -> bool {
        let now = Instant::now();
        if !force && now < self.bounded + WEIGH_EVERY {
            return false;
        }
        self.bounded = now;
        let Some(host) = self.host() else {
            return false;
        };
        let mut sizes: Vec<(usize, usize)> = Vec::with_capacity(self.views.len());
        for (i, run) in self.views.iter().enumerate() {
            sizes.push((update_gauges(&*host, run), i));
        }
        let m = host.metrics();
        let Some(spill) = self.spill.clone() else {
            return false;
        };
        m.view_state_file_bytes.set(spill.file_bytes() as i64);
        let limit = host.views().options.memory_limit;
        let total: usize = sizes.iter().map(|(b, _)| b).sum();
        if total <= limit {
            return false;
        }
        let want = (total - limit / 16 * 15).min(ROUND_BYTES);
        let mut round = match spill.begin() {
            Ok(round) => round,
            Err(e) => {
                warn!(error = %e, "cannot move view state to disk");
                return false;
            }
        };
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let mut left = want;
        let mut failed = None;
        let mut held = Vec::new();
        for &(_, i) in &sizes {
            if left == 0 || failed.is_some() {
                break;
            }
            let run = &self.views[i];
            let mut state = run.shared.state.write();
            if let Some(node) = state.node.as_mut() {
                let mut maps = Vec::new();
                node.maps(&mut maps);
                maps.sort_by_cached_key(|m| std::cmp::Reverse(m.memory_bytes()));
                for map in maps {
                    if left == 0 {
                        break;
                    }
                    match map.evict(&mut round, &spill, left, force) {
                        Ok(freed) => left = left.saturating_sub(freed),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
            }
            held.push((i, state));
        }
        let entries = round.entries;
        let committed = match failed {
            Some(e) => Err(e),
            None => round.commit(),
        };
        if let Err(e) = &committed {
            warn!(error = %e, "moving view state to disk failed; it stays in memory");
        }
        let touched: Vec<usize> = held.iter().map(|(i, _)| *i).collect();
        for (_, mut state) in held {
            if let Some(node) = state.node.as_mut() {
                let mut maps = Vec::new();
                node.maps(&mut maps);
                for map in maps {
                    map.settle(committed.is_ok());
                }
            }
        }
        m.view_state_evict_seconds
            .observe(now.elapsed().as_secs_f64());
        if committed.is_ok() {
            m.view_state_evicted_total.inc_by(entries as u64);
        }
        for i in touched {
            update_gauges(&*host, &self.views[i]);
        }
        committed.is_ok() && entries > 0
    }
}
