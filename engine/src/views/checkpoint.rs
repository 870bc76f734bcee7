//! View checkpoints: every view's state and WAL positions, written to the store
//! under this node's id (`_quiver/nodes/<id>/views/`) off the maintainer thread.
//!
//! A chain is one full checkpoint and the deltas written on it (per view, only the
//! state that changed). A restore reads the full checkpoint and merges its deltas in
//! order; a full checkpoint starts a new chain and deletes the old one's deltas.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use datafusion::common::DataFusionError;
use futures::StreamExt;
use tracing::{info, warn};

use super::codec::{Reader, Writer};
use super::maintainer::{Maintainer, Running, update_gauges};
use super::{MAGIC, ViewHost};

impl Maintainer {
    /// Writes every view's state and positions to the store, then lets the WAL drop
    /// what the checkpoint covers; returns once it is written.
    pub(super) fn checkpoint(&mut self) -> crate::Result<()> {
        self.start_checkpoint()?;
        self.finish_checkpoint()
    }

    /// Starts a checkpoint: encodes every view's state and positions on this thread
    /// (the only pause the views see), then writes it to the store on another thread,
    /// after which the WAL may drop what it covers. One checkpoint is written at a time,
    /// so an older one can never land over a newer one.
    ///
    /// Checkpoints are deltas: per view, only the state that changed since the last
    /// checkpoint, stored beside the last full one, so the pause grows with what
    /// changed, not with the state. Only the first checkpoint, and one after a failed
    /// write, is full and encoded here. Once the deltas add up to more than the full
    /// one (or number `MAX_DELTAS`), the writer thread, after storing the delta,
    /// compacts the chain: it restores the views from the stored files into state of
    /// its own and writes them whole as the start of a new chain, while the views go
    /// on (no checkpoint starts until it is done).
    pub(super) fn start_checkpoint(&mut self) -> crate::Result<()> {
        self.finish_checkpoint()?;
        let Some(host) = self.host() else {
            return Ok(());
        };
        let started = Instant::now();
        let chain = &self.chain;
        // Compacting in the background failed often enough: encode a full one here.
        let full = chain.base == 0 || chain.broken || chain.deltas >= 2 * MAX_DELTAS;
        let compact =
            !full && (chain.delta_bytes > chain.base_bytes || chain.deltas + 1 >= MAX_DELTAS);
        let (base, seq) = if full {
            (new_chain_id(chain.base), 0)
        } else {
            (chain.base, chain.deltas + 1)
        };
        let hint = if full {
            self.chain.base_bytes.max(self.last_checkpoint_bytes)
        } else {
            self.last_checkpoint_bytes
        };
        let (bytes, sizes) = encode_checkpoint(&self.views, hint + hint / 8, base, seq);
        let encoded = started.elapsed();
        let mut spent = Vec::new();
        for run in &mut self.views {
            let mut state = run.shared.state.write();
            if let Some(node) = state.node.as_mut() {
                node.forget_changes(&mut spent);
            }
            state.output.forget_changes(&mut spent);
            drop(state);
            run.in_chain = true;
            update_gauges(&*host, run);
        }
        let paused = started.elapsed();
        self.last_checkpoint_bytes = bytes.len();
        let file = if full {
            self.chain = Chain {
                base,
                base_bytes: bytes.len(),
                ..Chain::default()
            };
            checkpoint_file(host.node_id())
        } else {
            self.chain.deltas = seq;
            self.chain.delta_bytes += bytes.len();
            delta_file(host.node_id(), base, seq)
        };
        let floor = self.floor();
        let views = self.views.len();
        let weak = Arc::clone(&self.host);
        drop(host);
        self.dirty = false;
        let handle = std::thread::Builder::new()
            .name("quiver-views-checkpoint".into())
            .spawn(move || {
                let Some(host) = weak.upgrade() else {
                    return Ok(None);
                };
                drop(spent);
                let len = bytes.len();
                let written = Instant::now();
                let rt = host.query_runtime();
                rt.block_on(put(&*host, &file, bytes))?;
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
                    .observe(started.elapsed().as_secs_f64());
                m.view_checkpoint_pause_seconds
                    .observe(paused.as_secs_f64());
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
                    pause_ms = paused.as_millis() as u64,
                    encode_ms = encoded.as_millis() as u64,
                    write_ms = written.elapsed().as_millis() as u64,
                    largest = %sizes,
                    "views checkpointed"
                );
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

    /// Waits for the checkpoint being written, if any. A failed write leaves the
    /// views dirty, so the next interval tries again.
    pub(super) fn finish_checkpoint(&mut self) -> crate::Result<()> {
        let Some(handle) = self.writing.take() else {
            return Ok(());
        };
        let result = handle.join().unwrap_or(Err(crate::Error::Internal(
            "the view checkpoint writer panicked",
        )));
        match result {
            Ok(Some(chain)) => {
                self.chain = chain;
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => {
                // The changes it held are forgotten: only a full checkpoint has them all.
                self.dirty = true;
                self.chain.broken = true;
                Err(e)
            }
        }
    }
}

/// Folds the stored chain `base` (the full checkpoint and its deltas) into a new full
/// checkpoint: the views are restored from the files into state of this thread's own,
/// as at a start, and encoded whole. Costs a second copy of the views' state while it
/// runs, and no pause of the maintainer. Returns the new chain.
fn compact_chain(
    host: &dyn ViewHost,
    weak: &Arc<dyn super::WeakHost>,
    base: u64,
) -> crate::Result<Chain> {
    let started = Instant::now();
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
    let (bytes, _) = encode_checkpoint(&shadow.views, hint, next, 0);
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

/// A checkpoint file's bytes: its chain and place in it (`seq` 0 is the full
/// checkpoint), then every view's name, SQL, version, positions and state, the state
/// as a delta where the view is already in the chain and `seq` is not 0. Also returns
/// the three views whose state took the most bytes, for the log.
pub(super) fn encode_checkpoint(
    views: &[Running],
    capacity: usize,
    base: u64,
    seq: u64,
) -> (Vec<u8>, String) {
    let mut sizes: Vec<(usize, &str)> = Vec::with_capacity(views.len());
    let mut w = Writer {
        buf: Vec::with_capacity(capacity),
    };
    w.buf.extend_from_slice(MAGIC);
    w.u64(base);
    w.u64(seq);
    w.u64(views.len() as u64);
    let mut body = Writer::default();
    for run in views {
        w.str(&run.shared.name);
        w.str(&run.shared.sql);
        let state = run.shared.state.read();
        w.u64(state.version);
        w.u64(run.positions.len() as u64);
        for (s, p) in &run.positions {
            w.str(s);
            w.u64(*p);
        }
        w.u64(u64::from(run.incremental));
        let delta = seq > 0 && run.in_chain;
        w.u64(u64::from(delta));
        // The body is length-prefixed: reserve the prefix, write in place, fill it in.
        let at = w.buf.len();
        w.u64(0);
        body.buf = std::mem::take(&mut w.buf);
        if let Some(node) = &state.node {
            node.save(&mut body, delta);
        }
        state.output.save(&mut body, delta);
        w.buf = std::mem::take(&mut body.buf);
        let len = w.buf.len() - at - 8;
        w.buf[at..at + 8].copy_from_slice(&(len as u64).to_le_bytes());
        sizes.push((len, &run.shared.name));
    }
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    let largest = sizes
        .iter()
        .take(3)
        .map(|(len, name)| format!("{name} {len}"))
        .collect::<Vec<_>>()
        .join(", ");
    (w.buf, largest)
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

pub(super) async fn put(host: &dyn ViewHost, rel: &str, body: Vec<u8>) -> crate::Result<()> {
    use object_store::ObjectStoreExt;
    let store = host.store();
    store
        .object_store()
        .put(&store.path(rel)?, body.into())
        .await?;
    Ok(())
}
