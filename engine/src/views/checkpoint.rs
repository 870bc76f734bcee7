//! View checkpoints: every view's state and WAL positions, written to the store
//! under this node's id (`_quiver/nodes/<id>/views/`) off the maintainer thread.
//!
//! A chain is one full checkpoint and the deltas written on it (per view, only the
//! state that changed). The maintainer encodes a checkpoint a slice at a time between
//! batches, so no pause grows with the state. A restore reads the full checkpoint and merges its deltas in
//! order; a full checkpoint starts a new chain and deletes the old one's deltas.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::common::DataFusionError;
use futures::StreamExt;
use tracing::{info, warn};

use super::codec::{Reader, Writer};
use super::maintainer::{Maintainer, Running, update_gauges};
use super::tracked::Part;
use super::{MAGIC, ViewHost, ViewShared};

impl Maintainer {
    /// Writes every view's state and positions to the store, then lets the WAL drop
    /// what the checkpoint covers; returns once it is written. A checkpoint being
    /// encoded is finished and written first.
    pub(super) fn checkpoint(&mut self) -> crate::Result<()> {
        self.encode_all();
        self.finish_checkpoint()?;
        self.start_checkpoint()?;
        self.encode_all();
        self.finish_checkpoint()
    }

    /// Starts a checkpoint: sets every view's changes aside at this point of the
    /// WAL ([`Checkpointed::freeze`]), to be encoded a slice at a time between
    /// batches ([`Maintainer::encode_slice`]) and then written to the store on
    /// another thread, after which the WAL may drop what it covers. One checkpoint is
    /// encoded or written at a time, so an older one can never land over a newer one.
    ///
    /// Checkpoints are deltas: per view, only the state that changed since the last
    /// checkpoint, stored beside the last full one. A view not in the stored chain
    /// yet (all of them, at the first checkpoint) has every key it holds among its
    /// changes, so it is written whole the same way. Only after a failed write (the
    /// changes it held are gone) is a full checkpoint encoded here in one go. Once the
    /// deltas add up to more than the full one (or number `MAX_DELTAS`), the writer
    /// thread, after storing the delta, compacts the chain: it restores the views
    /// from the stored files into state of its own and writes them whole as the start
    /// of a new chain, while the views go on (no checkpoint starts until it is done).
    pub(super) fn start_checkpoint(&mut self) -> crate::Result<()> {
        self.finish_checkpoint()?;
        if self.slicing.is_some() {
            return Ok(());
        }
        let Some(host) = self.host() else {
            return Ok(());
        };
        let started = Instant::now();
        let hold = Hold::start();
        let chain = &self.chain;
        // Compacting in the background failed often enough: encode a full one here.
        let whole = chain.broken || chain.deltas >= 2 * MAX_DELTAS;
        let full = whole || chain.base == 0;
        let compact =
            !full && (chain.delta_bytes > chain.base_bytes || chain.deltas + 1 >= MAX_DELTAS);
        let (base, seq) = if full {
            (new_chain_id(chain.base), 0)
        } else {
            (chain.base, chain.deltas + 1)
        };
        self.dirty = false;
        let mut cut = Cut {
            base,
            seq,
            full,
            compact,
            floor: self.floor(),
            stats: Slices {
                started,
                longest: Duration::ZERO,
                longest_cpu: Duration::ZERO,
                longest_at: "",
                busy: Duration::ZERO,
                count: 0,
            },
        };
        if whole {
            let (bytes, sizes) = encode_checkpoint(&self.views, self.chain.base_bytes, base);
            for run in &mut self.views {
                let mut state = run.shared.state.write();
                for part in state.parts() {
                    if let Part::Map(map) = part {
                        map.forget_all();
                    }
                }
                drop(state);
                run.in_chain = true;
                update_gauges(&*host, run);
            }
            cut.stats.add(hold, "whole");
            drop(host);
            return self.write_checkpoint(vec![bytes], cut, sizes);
        }
        let mut head = Writer::default();
        head.buf.extend_from_slice(MAGIC);
        head.u64(base);
        head.u64(seq);
        head.u64(self.views.len() as u64);
        let mut views = Vec::with_capacity(self.views.len());
        for run in &mut self.views {
            let mut w = Writer::default();
            let mut state = run.shared.state.write();
            view_head(&mut w, run, state.version, seq > 0 && run.in_chain);
            let parts = state
                .parts()
                .into_iter()
                .map(|part| match part {
                    Part::Bytes(b) => Some(b),
                    Part::Map(map) => {
                        map.freeze();
                        None
                    }
                })
                .collect();
            drop(state);
            run.in_chain = true;
            views.push(Frozen {
                shared: Arc::clone(&run.shared),
                head: w.buf,
                parts,
            });
        }
        cut.stats.add(hold, "freeze");
        self.slicing = Some(Slicing {
            cut,
            head: head.buf,
            views,
            written: 0,
        });
        Ok(())
    }

    /// Encodes the checkpoint set aside by [`Maintainer::start_checkpoint`] for about
    /// `SLICE`, and once all of it is encoded, hands it to the writer thread. The
    /// maintainer calls it between batches while a checkpoint is being encoded.
    pub(super) fn encode_slice(&mut self) {
        self.encode(Some(Instant::now() + SLICE));
    }

    /// Encodes the checkpoint being encoded, if any, to the end, and has it written.
    pub(super) fn encode_all(&mut self) {
        self.encode(None);
    }

    fn encode(&mut self, deadline: Option<Instant>) {
        let Some(slicing) = self.slicing.as_mut() else {
            return;
        };
        let hold = Hold::start();
        let mut done = true;
        while slicing.written < slicing.views.len() {
            let mut state = slicing.views[slicing.written].shared.state.write();
            done = state.parts().into_iter().all(|part| match part {
                Part::Map(map) => map.write_frozen(deadline),
                Part::Bytes(_) => true,
            });
            drop(state);
            if !done {
                break;
            }
            slicing.written += 1;
        }
        slicing.cut.stats.add(hold, "slice");
        if !done {
            return;
        }
        let Some(slicing) = self.slicing.take() else {
            return;
        };
        if let Err(e) = self.write_sliced(slicing) {
            warn!(error = %e, "view checkpoint failed; will retry");
            self.count_failure();
            self.dirty = true;
            self.chain.broken = true;
            self.answer(Err(e.to_string()));
        }
    }

    /// Answers those waiting for the checkpoint that just ended.
    pub(super) fn answer(&mut self, result: Result<(), String>) {
        for waiting in std::mem::take(&mut self.answering) {
            let _ = waiting.send(result.clone().map_err(crate::Error::Config));
        }
    }

    /// Gathers the encoded checkpoint (its buffers are moved, not copied) and starts
    /// writing it.
    fn write_sliced(&mut self, slicing: Slicing) -> crate::Result<()> {
        let hold = Hold::start();
        let Slicing {
            mut cut,
            head,
            views,
            ..
        } = slicing;
        let mut chunks = vec![head];
        let mut sizes = Vec::with_capacity(views.len());
        for view in views {
            let mut body = Vec::new();
            let mut state = view.shared.state.write();
            let mut frozen = view.parts.into_iter();
            for part in state.parts() {
                match (part, frozen.next()) {
                    (Part::Map(map), Some(None)) => {
                        let (count, mut entries) =
                            map.take_frozen().ok_or(crate::Error::Internal(
                                "a view's state was replaced while its checkpoint was encoded",
                            ))?;
                        body.push(count.to_le_bytes().to_vec());
                        body.append(&mut entries);
                    }
                    (Part::Bytes(_), Some(Some(bytes))) => body.push(bytes),
                    _ => {
                        return Err(crate::Error::Internal(
                            "a view's operators changed while its checkpoint was encoded",
                        ));
                    }
                }
            }
            drop(state);
            let len: usize = body.iter().map(Vec::len).sum();
            sizes.push((len, view.shared.name.clone()));
            chunks.push(view.head);
            chunks.push((len as u64).to_le_bytes().to_vec());
            chunks.append(&mut body);
        }
        // The state gauges follow at the next weighing (`bound_memory`).
        cut.stats.add(hold, "gather");
        self.write_checkpoint(chunks, cut, largest(sizes))
    }

    /// Writes an encoded checkpoint to the store on another thread, then lets the WAL
    /// drop what it covers and, with `compact`, compacts the chain.
    fn write_checkpoint(
        &mut self,
        chunks: Vec<Vec<u8>>,
        cut: Cut,
        largest: String,
    ) -> crate::Result<()> {
        let Some(host) = self.host() else {
            return Ok(());
        };
        let Cut {
            base,
            seq,
            full,
            compact,
            floor,
            stats,
        } = cut;
        let len: usize = chunks.iter().map(Vec::len).sum();
        self.last_checkpoint_bytes = len;
        let file = if full {
            self.chain = Chain {
                base,
                base_bytes: len,
                ..Chain::default()
            };
            checkpoint_file(host.node_id())
        } else {
            self.chain.deltas = seq;
            self.chain.delta_bytes += len;
            delta_file(host.node_id(), base, seq)
        };
        let views = self.views.len();
        let weak = Arc::clone(&self.host);
        drop(host);
        let handle = std::thread::Builder::new()
            .name("quiver-views-checkpoint".into())
            .spawn(move || {
                let Some(host) = weak.upgrade() else {
                    return Ok(None);
                };
                let written = Instant::now();
                let rt = host.query_runtime();
                let body: object_store::PutPayload =
                    chunks.into_iter().map(bytes::Bytes::from).collect();
                rt.block_on(put(&*host, &file, body))?;
                *host.views().floor.write() = Some(floor);
                if let Err(e) = host.truncate_wal() {
                    warn!(error = %e, "WAL truncation after a view checkpoint failed");
                }
                // A full checkpoint replaces every older chain: its deltas, and any a
                // crash left behind, go.
                if full && let Err(e) = rt.block_on(delete_other_chains(&*host, base)) {
                    warn!(error = %e, "cannot delete old view checkpoint deltas");
                }
                let compacted = if compact {
                    match compact_chain(&*host, &weak, base) {
                        Ok(chain) => Some(chain),
                        Err(e) => {
                            warn!(error = %e, "compacting the view checkpoints failed; the chain goes on");
                            None
                        }
                    }
                } else {
                    None
                };
                let m = host.metrics();
                m.view_checkpoint_seconds
                    .observe(stats.started.elapsed().as_secs_f64());
                m.view_checkpoint_pause_seconds
                    .observe(stats.longest.as_secs_f64());
                m.view_checkpoint_bytes.set(len as i64);
                let kind = |kind: &str| crate::metrics::CheckpointLabel {
                    kind: kind.to_owned(),
                };
                m.view_checkpoints_total
                    .get_or_create(&kind(if full { "full" } else { "delta" }))
                    .inc();
                if compacted.is_some() {
                    m.view_checkpoints_total.get_or_create(&kind("compacted")).inc();
                }
                info!(
                    views,
                    bytes = len,
                    kind = if full { "full" } else { "delta" },
                    pause_ms = stats.longest.as_secs_f64() * 1e3,
                    pause_cpu_ms = stats.longest_cpu.as_secs_f64() * 1e3,
                    pause_at = stats.longest_at,
                    slices = stats.count,
                    encode_ms = stats.busy.as_millis() as u64,
                    write_ms = written.elapsed().as_millis() as u64,
                    largest = %largest,
                    "views checkpointed"
                );
                *host.views().last_checkpoint.lock() = Some(stats);
                Ok(compacted)
            })
            .map_err(|e| {
                self.dirty = true;
                self.chain.broken = true;
                crate::Error::Io(e)
            })?;
        self.writing = Some(handle);
        Ok(())
    }

    fn count_failure(&self) {
        if let Some(host) = self.host() {
            host.metrics().view_checkpoint_failures_total.inc();
        }
    }

    /// Waits for the checkpoint being written, if any. A failed write leaves the
    /// views dirty, so the next interval tries again.
    pub(super) fn finish_checkpoint(&mut self) -> crate::Result<()> {
        let Some(handle) = self.writing.take() else {
            return Ok(());
        };
        let result = handle.join().unwrap_or(Err(crate::Error::Internal(
            "the view checkpoint writer panicked",
        )));
        let result = match result {
            Ok(Some(chain)) => {
                self.chain = chain;
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => {
                self.count_failure();
                // The changes it held are forgotten: only a full checkpoint has them all.
                self.dirty = true;
                self.chain.broken = true;
                Err(e)
            }
        };
        self.answer(result.as_ref().map_err(ToString::to_string).copied());
        result
    }
}

/// The longest a checkpoint's slices may hold the maintainer, about.
pub(super) const SLICE: Duration = Duration::from_millis(2);

/// Where a checkpoint goes in the chain, the WAL positions it covers, and how it
/// has held the maintainer so far.
struct Cut {
    base: u64,
    seq: u64,
    full: bool,
    /// The writer compacts the chain after storing it.
    compact: bool,
    floor: HashMap<String, u64>,
    stats: Slices,
}

/// A checkpoint set aside at one point of the WAL and encoded a slice at a time.
pub(super) struct Slicing {
    cut: Cut,
    /// The file's header.
    head: Vec<u8>,
    views: Vec<Frozen>,
    /// Views whose parts are all encoded.
    written: usize,
}

/// A view set aside for a checkpoint: the head of its entry in the file (name, SQL,
/// version, positions), and per part of its state the bytes it had then, or None for
/// a map (whose delta the map encodes).
struct Frozen {
    shared: Arc<ViewShared>,
    head: Vec<u8>,
    parts: Vec<Option<Vec<u8>>>,
}

/// How a checkpoint held the maintainer: its longest hold (in time, and in CPU time
/// the thread spent in one hold, which leaves out the time the thread waited for a
/// core), how many, and all of them.
#[derive(Debug, Clone, Copy)]
pub struct Slices {
    pub started: Instant,
    pub longest: Duration,
    pub longest_cpu: Duration,
    /// Which part of the checkpoint the longest hold was.
    pub longest_at: &'static str,
    pub busy: Duration,
    pub count: u32,
}

impl Slices {
    fn add(&mut self, hold: Hold, what: &'static str) {
        let held = hold.wall.elapsed();
        self.count += 1;
        self.busy += held;
        if held > self.longest {
            self.longest = held;
            self.longest_at = what;
        }
        let cpu = match (hold.cpu, thread_cpu()) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => held,
        };
        self.longest_cpu = self.longest_cpu.max(cpu);
    }
}

/// One hold of the maintainer, from its start.
#[derive(Debug, Clone, Copy)]
struct Hold {
    wall: Instant,
    cpu: Option<Duration>,
}

impl Hold {
    fn start() -> Self {
        Self {
            wall: Instant::now(),
            cpu: thread_cpu(),
        }
    }
}

/// The CPU time this thread has run, where the system tells it
/// (`/proc/thread-self/schedstat` on Linux; its first field is in nanoseconds).
fn thread_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// Folds the stored chain `base` (the full checkpoint and its deltas) into a new full
/// checkpoint: the views are restored from the files into state of this thread's own,
/// as at a start, and encoded whole, at the lowest CPU priority. Costs a second copy
/// of the views' state while it runs, and no pause of the maintainer. Returns the new
/// chain.
fn compact_chain(
    host: &dyn ViewHost,
    weak: &Arc<dyn super::WeakHost>,
    base: u64,
) -> crate::Result<Chain> {
    let started = Instant::now();
    // Seconds of one core, and nothing waits for it: the views, ingest and push go
    // first. (This thread ends after it.)
    if let Err(e) = rustix::process::nice(19) {
        warn!(error = %e, "cannot lower the priority of the checkpoint compaction");
    }
    let rt = host.query_runtime();
    let Some((saved, chain)) = rt.block_on(read_chain(host))? else {
        return Err(crate::Error::Config("the view checkpoint vanished".into()));
    };
    if chain.base != base {
        return Err(crate::Error::Config(format!(
            "the stored view checkpoint is chain {}, not {base}",
            chain.base
        )));
    }
    let mut shadow = Maintainer {
        host: Arc::clone(weak),
        views: Vec::with_capacity(saved.len()),
        rx: std::sync::mpsc::channel().1,
        dirty: false,
        writing: None,
        asked: Vec::new(),
        answering: Vec::new(),
        slicing: None,
        last_checkpoint_bytes: 0,
        chain: Chain::default(),
        // Its state lives as long as one encode: it is not bounded.
        spill: None,
        bounded: std::time::Instant::now(),
    };
    for view in &saved {
        let run = shadow
            .load_view(host, view)
            .map_err(|e| crate::Error::Config(format!("view {}: {e}", view.name)))?;
        shadow.views.push(run);
    }
    let next = new_chain_id(base);
    let hint = chain.base_bytes + chain.delta_bytes;
    let (bytes, _) = encode_checkpoint(&shadow.views, hint, next);
    drop(shadow);
    let len = bytes.len();
    rt.block_on(put(host, &checkpoint_file(host.node_id()), bytes))?;
    if let Err(e) = rt.block_on(delete_other_chains(host, next)) {
        warn!(error = %e, "cannot delete old view checkpoint deltas");
    }
    info!(
        deltas = chain.deltas,
        from_bytes = chain.base_bytes + chain.delta_bytes,
        bytes = len,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "view checkpoint chain compacted off the maintainer"
    );
    Ok(Chain {
        base: next,
        base_bytes: len,
        ..Chain::default()
    })
}

/// A full checkpoint file's bytes: its chain, then every view's name, SQL,
/// version, positions and whole state. Also names the three views whose state took
/// the most bytes, for the log.
pub(super) fn encode_checkpoint(
    views: &[Running],
    capacity: usize,
    base: u64,
) -> (Vec<u8>, String) {
    let mut sizes = Vec::with_capacity(views.len());
    let mut w = Writer {
        buf: Vec::with_capacity(capacity),
    };
    w.buf.extend_from_slice(MAGIC);
    w.u64(base);
    w.u64(0);
    w.u64(views.len() as u64);
    for run in views {
        let mut state = run.shared.state.write();
        view_head(&mut w, run, state.version, false);
        // The body is length-prefixed: reserve the prefix, write in place, fill it in.
        let at = w.buf.len();
        w.u64(0);
        super::tracked::save_all(state.parts(), &mut w);
        let len = w.buf.len() - at - 8;
        w.buf[at..at + 8].copy_from_slice(&(len as u64).to_le_bytes());
        sizes.push((len, run.shared.name.clone()));
    }
    (w.buf, largest(sizes))
}

/// A view's entry in a checkpoint file, up to its state: name, SQL, version,
/// positions, whether it is maintained, and whether its state is a delta.
fn view_head(w: &mut Writer, run: &Running, version: u64, delta: bool) {
    w.str(&run.shared.name);
    w.str(&run.shared.sql);
    w.u64(version);
    w.u64(run.positions.len() as u64);
    for (s, p) in &run.positions {
        w.str(s);
        w.u64(*p);
    }
    w.u64(u64::from(run.incremental));
    w.u64(u64::from(delta));
}

/// The three views whose state took the most bytes, for the log.
fn largest(mut sizes: Vec<(usize, String)>) -> String {
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    sizes
        .iter()
        .take(3)
        .map(|(len, name)| format!("{name} {len}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The checkpoint files in the store: a full checkpoint and the deltas written on it.
#[derive(Debug, Default)]
pub(super) struct Chain {
    /// The full checkpoint's id (0: none yet).
    pub(super) base: u64,
    pub(super) base_bytes: usize,
    /// Deltas written on it, and their bytes together.
    pub(super) deltas: u64,
    pub(super) delta_bytes: usize,
    /// A write failed: the next checkpoint must be full.
    pub(super) broken: bool,
}

/// Most deltas on one full checkpoint, however small they are.
pub(super) const MAX_DELTAS: u64 = 100;

/// Where this node's view checkpoints live. A checkpoint records positions in one
/// node's WAL, so each node on a shared store keeps its own.
pub(super) fn checkpoint_dir(node: &str) -> String {
    format!("_quiver/nodes/{node}/views")
}

pub(super) fn checkpoint_file(node: &str) -> String {
    format!("{}/checkpoint.bin", checkpoint_dir(node))
}

pub(super) fn delta_file(node: &str, base: u64, seq: u64) -> String {
    format!("{}/checkpoint-{base}-{seq:06}.bin", checkpoint_dir(node))
}

/// An id for a new chain: the time in nanoseconds, above the last one. Deltas of an
/// older chain left in the store (a crash before they were deleted) are never read
/// as this chain's.
pub(super) fn new_chain_id(last: u64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    now.max(last + 1)
}

/// Reads the full checkpoint and the deltas written on it, merged per view; `None`
/// when there is no checkpoint. Any unreadable file fails the whole chain: the WAL
/// may already have dropped what a later delta covered.
pub(super) async fn read_chain(
    host: &dyn ViewHost,
) -> crate::Result<Option<(Vec<SavedState>, Chain)>> {
    let node = host.node_id();
    let Some(bytes) = get(host, &checkpoint_file(node)).await? else {
        return Ok(None);
    };
    let (base, seq, mut saved) = parse_checkpoint(&bytes)?;
    if seq != 0 {
        return Err(crate::Error::Config(
            "the view checkpoint is not a full one".into(),
        ));
    }
    let mut chain = Chain {
        base,
        base_bytes: bytes.len(),
        ..Chain::default()
    };
    while let Some(bytes) = get(host, &delta_file(node, base, chain.deltas + 1)).await? {
        let (b, s, next) = parse_checkpoint(&bytes)?;
        if b != base || s != chain.deltas + 1 {
            return Err(crate::Error::Config(format!(
                "{} is out of place in the view checkpoint chain",
                delta_file(node, base, chain.deltas + 1)
            )));
        }
        chain.deltas = s;
        chain.delta_bytes += bytes.len();
        saved = merge_delta(saved, next);
    }
    Ok(Some((saved, chain)))
}

/// The views as of a delta: each a delta on its earlier state, or whole. Views the
/// delta does not list were dropped before it.
pub(super) fn merge_delta(mut saved: Vec<SavedState>, next: Vec<SavedState>) -> Vec<SavedState> {
    next.into_iter()
        .filter_map(|mut view| {
            let delta = view.bodies.first().is_some_and(|(d, _)| *d);
            if !delta {
                return Some(view);
            }
            let i = saved.iter().position(|s| {
                s.name == view.name && s.sql == view.sql && s.incremental == view.incremental
            })?;
            let mut earlier = saved.swap_remove(i);
            earlier.version = view.version;
            earlier.positions = std::mem::take(&mut view.positions);
            earlier.bodies.append(&mut view.bodies);
            Some(earlier)
        })
        .collect()
}

pub(super) struct SavedState {
    pub(super) name: String,
    pub(super) sql: String,
    pub(super) version: u64,
    pub(super) positions: BTreeMap<String, u64>,
    pub(super) incremental: bool,
    /// The state: whole, then the deltas on it (`true`), in order.
    pub(super) bodies: Vec<(bool, Vec<u8>)>,
}

/// One checkpoint file: its chain id, its place in the chain, and its views.
pub(super) fn parse_checkpoint(
    data: &[u8],
) -> datafusion::common::Result<(u64, u64, Vec<SavedState>)> {
    let body = data
        .strip_prefix(MAGIC)
        .ok_or_else(|| DataFusionError::Execution("not a Quiver view checkpoint".into()))?;
    let mut r = Reader::new(body);
    let base = r.u64()?;
    let seq = r.u64()?;
    let n = r.u64()?;
    let mut out = Vec::new();
    for _ in 0..n {
        let name = r.str()?;
        let sql = r.str()?;
        let version = r.u64()?;
        let mut positions = BTreeMap::new();
        for _ in 0..r.u64()? {
            let s = r.str()?;
            positions.insert(s, r.u64()?);
        }
        let incremental = r.u64()? == 1;
        let delta = r.u64()? == 1;
        let state = r.bytes()?.to_vec();
        out.push(SavedState {
            name,
            sql,
            version,
            positions,
            incremental,
            bodies: vec![(delta, state)],
        });
    }
    if !r.is_done() {
        return Err(DataFusionError::Execution(
            "the view checkpoint has trailing bytes".into(),
        ));
    }
    Ok((base, seq, out))
}

pub(super) async fn get(host: &dyn ViewHost, rel: &str) -> crate::Result<Option<bytes::Bytes>> {
    use object_store::ObjectStoreExt;
    let store = host.store();
    match store.object_store().get(&store.path(rel)?).await {
        Ok(got) => Ok(Some(got.bytes().await?)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Deletes every checkpoint delta that does not belong to chain `base`.
pub(super) async fn delete_other_chains(host: &dyn ViewHost, base: u64) -> crate::Result<()> {
    use object_store::ObjectStoreExt;
    let store = host.store();
    let ours = format!("checkpoint-{base}-");
    let mut listed = store
        .object_store()
        .list(Some(&store.path(&checkpoint_dir(host.node_id()))?));
    let mut stale = Vec::new();
    while let Some(meta) = listed.next().await {
        let meta = meta?;
        let name = meta.location.filename().unwrap_or_default();
        if name.starts_with("checkpoint-") && !name.starts_with(&ours) {
            stale.push(meta.location);
        }
    }
    for path in stale {
        match store.object_store().delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

pub(super) async fn put(
    host: &dyn ViewHost,
    rel: &str,
    body: impl Into<object_store::PutPayload>,
) -> crate::Result<()> {
    use object_store::ObjectStoreExt;
    let store = host.store();
    store
        .object_store()
        .put(&store.path(rel)?, body.into())
        .await?;
    Ok(())
}
