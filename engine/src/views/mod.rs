//! Materialized views: SQL-defined tables kept up to date as events arrive.
//!
//! One maintainer thread owns every view's operator state. It receives each durable WAL
//! record right after the write is acknowledged, applies the records it finds waiting
//! as one micro-batch to every view in creation order (so a view is always updated
//! after the views it reads), and publishes per view a versioned change set: upserts
//! and deletes by key. Queries and subscribers read a view's published rows.
//!
//! A view whose plan has only maintainable shapes ([`plan`]) is `incremental`: its cost
//! per batch follows the rows that changed. Any other view is `recompute`: its SQL runs
//! again every `recompute_interval` and the difference is published the same way.
//!
//! Positions make this exact. A view records, per stream it reads, the WAL position it
//! reflects. A new view is filled (backfilled) from the stream's published table plus
//! the live buffer, whose position is known, and skips records at or below it. State is
//! checkpointed with those positions, and the WAL keeps every record a checkpoint does
//! not cover yet, so after a crash each view resumes where its checkpoint stopped.

mod agg;
mod checkpoint;
mod codec;
mod maintainer;
mod ops;
mod output;
mod plan;
mod spill;
mod temporal;
mod tracked;
mod zset;

pub use checkpoint::Slices as CheckpointHolds;
pub(crate) use zset::evaluate;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::common::DataFusionError;
use futures::StreamExt;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot};
use tracing::{error, info, warn};

use crate::catalog::Document;
use crate::metrics::{EngineMetrics, ViewLabel, ViewStateLabel};
use crate::query::QueryError;
use crate::query::QuerySession;
use crate::schema::StreamSchema;
use crate::store::Store;
use checkpoint::{Chain, SavedState, read_chain};
use codec::Reader;
use maintainer::Maintainer;
use output::{Output, Rows};
use plan::{Node, SourceKind};
use zset::ZBatch;

/// What the views need from the engine that hosts them. The engine is the one host; the
/// views never see the rest of it (ingest, flushing, tables).
pub(crate) trait ViewHost: Send + Sync {
    /// The views themselves.
    fn views(&self) -> &Views;
    /// A stream's schema; `None` when there is no such stream.
    fn stream_schema(&self, name: &str) -> Option<StreamSchema>;
    /// A stream as a table now, and the WAL position that table reflects (every event
    /// of the stream at or below it is in the table, none above it): what a new view
    /// is filled from.
    fn stream_provider_at_position(
        &self,
        stream: &str,
    ) -> Option<Result<PositionedTable, QueryError>>;
    /// A session for planning and filling views (reads streams and views).
    fn view_planner(&self) -> QuerySession;
    /// A session for running a recompute view's SQL, as a query would.
    fn query_session(&self) -> QuerySession;
    /// The runtime queries run on.
    fn query_runtime(&self) -> tokio::runtime::Handle;
    /// This node's identity: checkpoints are kept under it.
    fn node_id(&self) -> &str;
    /// The object store checkpoints are written to.
    fn store(&self) -> &Store;
    /// The engine's metrics.
    fn metrics(&self) -> &Arc<EngineMetrics>;
    /// The catalog document of view definitions.
    fn views_document(&self) -> Document<Vec<SavedView>>;
    /// Lets the WAL drop what every view's checkpoint covers.
    fn truncate_wal(&self) -> crate::Result<()>;
}

/// A stream's table and the WAL position it reflects.
pub(crate) type PositionedTable = (Arc<dyn datafusion::catalog::TableProvider>, u64);

/// A handle to the host that does not keep it alive: the maintainer and checkpoint
/// threads hold one, so dropping the engine stops them.
pub(crate) trait WeakHost: Send + Sync {
    /// The host, while it lives.
    fn upgrade(&self) -> Option<Host>;
}

/// A live host.
pub(crate) type Host = Arc<dyn ViewHost>;

/// How views are maintained.
#[derive(Debug, Clone)]
pub struct ViewOptions {
    /// Views defined at start (`CREATE MATERIALIZED VIEW` statements), in order.
    pub definitions: Vec<String>,
    /// How often recompute views run their SQL again.
    pub recompute_interval: Duration,
    /// How often view state is checkpointed to the store (also at shutdown).
    pub checkpoint_interval: Duration,
    /// Change sets kept per view for subscribers that resume.
    pub history: usize,
    /// Whether views run at all. Off for batch tools (`quiver forecast`) that share a
    /// store with a server: they read tables and write result tables, and must not
    /// load, refill or checkpoint the server's views.
    pub maintain: bool,
    /// The time temporal filters (`now()` in a view) go by.
    pub clock: crate::clock::Clock,
    /// Bytes of state all views together keep in memory; past it, operator state not
    /// used lately moves to disk (0: no limit, the default until reading state back
    /// from disk is fast enough; see BENCHMARKS.md).
    pub memory_limit: usize,
    /// Folder of the spill file (default: `view-state` in the WAL folder).
    pub state_dir: Option<std::path::PathBuf>,
}

impl Default for ViewOptions {
    fn default() -> Self {
        Self {
            definitions: Vec::new(),
            recompute_interval: Duration::from_secs(1),
            checkpoint_interval: Duration::from_secs(30),
            history: 256,
            maintain: true,
            clock: crate::clock::Clock::system(),
            memory_limit: 0,
            state_dir: None,
        }
    }
}

/// How a view is kept up to date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, strum::IntoStaticStr)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum Maintenance {
    /// Per micro-batch, at a cost that follows what changed.
    Incremental,
    /// By running its SQL again on an interval.
    Recompute,
}

impl Maintenance {
    /// `incremental` or `recompute`.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// What is known of one view.
#[derive(Debug, Clone)]
pub struct ViewInfo {
    /// View name.
    pub name: String,
    /// The defining query.
    pub sql: String,
    /// Key columns: a row's identity in change sets.
    pub key: Vec<String>,
    /// Output columns.
    pub schema: SchemaRef,
    /// How it is maintained.
    pub maintenance: Maintenance,
    /// Why it is recomputed, when it is.
    pub reason: Option<String>,
    /// Version: grows by one with every change set.
    pub version: u64,
    /// How far behind acknowledged ingest the view is, in milliseconds, rounded up: 0
    /// only when every acknowledged event has been applied.
    pub lag_ms: u64,
    /// Rows held.
    pub rows: usize,
    /// Approximate bytes of state in memory (operators and rows).
    pub state_bytes: usize,
    /// Bytes of operator state moved to disk (past `--view-memory-limit`).
    pub state_disk_bytes: usize,
    /// Streams and views it reads.
    pub reads: Vec<String>,
    /// Time spent applying changes to it since start, in total.
    pub apply_time: Duration,
}

/// One view's change between two versions.
#[derive(Debug)]
pub struct ChangeSet {
    /// View name.
    pub view: String,
    /// The version this change set produces.
    pub version: u64,
    /// Rows inserted or replaced (whole rows).
    pub upserts: RecordBatch,
    /// Keys removed (key columns only).
    pub deletes: RecordBatch,
    /// The rows as they were before this change, of the keys it upserted or deleted
    /// (whole rows; a new key has none; empty for a view without a key). A filter on
    /// values can tell from them which keys its subscribers held.
    pub replaced: RecordBatch,
    /// When the oldest event behind this change was acknowledged.
    pub acked_at: Option<Instant>,
}

/// A view's rows at one version.
#[derive(Debug, Clone)]
pub struct ViewSnapshot {
    /// Version of these rows.
    pub version: u64,
    /// Key column names.
    pub key: Vec<String>,
    /// The rows.
    pub rows: RecordBatch,
}

/// What queries and subscribers see of one view.
#[derive(Debug)]
pub(crate) struct ViewShared {
    name: String,
    /// Creation order: a view comes after every view it reads.
    ordinal: u64,
    sql: String,
    maintenance: Maintenance,
    reason: Option<String>,
    reads: Vec<String>,
    key: Vec<String>,
    state: RwLock<Published>,
    cache: Mutex<Option<(u64, RecordBatch)>>,
    history: Mutex<VecDeque<Arc<ChangeSet>>>,
    state_bytes: AtomicUsize,
    disk_bytes: AtomicUsize,
    /// Time spent applying changes to this view, in total.
    apply_nanos: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct Published {
    version: u64,
    output: Output,
    /// The operator tree; `None` for recomputed views. It is kept here, beside the
    /// rows, because where the rows are [`Rows::Derived`] it is what they are read from.
    node: Option<Node>,
}

impl Published {
    /// Every row of the view now.
    fn rows(&self) -> datafusion::common::Result<RecordBatch> {
        if self.output.mode() != Rows::Derived {
            return self.output.snapshot();
        }
        let node = self.node.as_ref().ok_or_else(|| {
            datafusion::common::DataFusionError::Internal("derived rows need operators".into())
        })?;
        let schema = self.output.schema();
        let mut parts = Vec::new();
        node.emit_all(LIST_CHUNK, &mut |rows| {
            parts.push(rows.into_rows(schema)?);
            Ok(())
        })?;
        if parts.len() == 1 {
            return Ok(parts.remove(0));
        }
        Ok(arrow::compute::concat_batches(schema, &parts)?)
    }

    /// Replaces every row by `batch`'s; returns the change.
    fn replace(&mut self, batch: &RecordBatch) -> datafusion::common::Result<output::Applied> {
        let current = self.rows()?;
        self.output.replace(&current, batch)
    }

    /// What a checkpoint holds of the view: its operators' state, then its rows.
    fn parts(&mut self) -> Vec<tracked::Part<'_>> {
        let mut out = Vec::new();
        if let Some(node) = self.node.as_mut() {
            node.parts(&mut out);
        }
        self.output.parts(&mut out);
        out
    }

    /// The version after `applied`: one more when it changed anything.
    fn bump(&mut self, applied: &output::Applied) -> u64 {
        if !applied.is_empty() {
            self.version += 1;
        }
        self.version
    }
}

impl ViewShared {
    #[allow(clippy::too_many_arguments)]
    fn new(
        host: &dyn ViewHost,
        name: &str,
        sql: &str,
        incremental: bool,
        reason: Option<String>,
        reads: Vec<String>,
        output: Output,
        node: Option<Node>,
        version: u64,
    ) -> Arc<Self> {
        let schema = output.schema();
        let key = output
            .key_columns()
            .iter()
            .map(|&c| schema.field(c).name().clone())
            .collect();
        Arc::new(Self {
            ordinal: host.views().next_ordinal(),
            name: name.to_owned(),
            sql: sql.to_owned(),
            maintenance: if incremental {
                Maintenance::Incremental
            } else {
                Maintenance::Recompute
            },
            reason,
            reads,
            key,
            state: RwLock::new(Published {
                version,
                output,
                node,
            }),
            cache: Mutex::new(None),
            history: Mutex::new(VecDeque::new()),
            state_bytes: AtomicUsize::new(0),
            disk_bytes: AtomicUsize::new(0),
            apply_nanos: std::sync::atomic::AtomicU64::new(0),
        })
    }

    pub(crate) fn schema(&self) -> SchemaRef {
        Arc::clone(self.state.read().output.schema())
    }

    /// The rows now, and their version.
    pub(crate) fn snapshot(&self) -> datafusion::common::Result<(u64, RecordBatch)> {
        let state = self.state.read();
        let mut cache = self.cache.lock();
        if let Some((v, rows)) = &*cache
            && *v == state.version
        {
            return Ok((*v, rows.clone()));
        }
        let rows = state.rows()?;
        *cache = Some((state.version, rows.clone()));
        Ok((state.version, rows))
    }
}

/// One event batch on its way to the views.
#[derive(Debug)]
struct Event {
    seq: u64,
    stream: String,
    batch: RecordBatch,
    acked: Instant,
}

enum Msg {
    Event(Event),
    Create {
        name: String,
        sql: String,
        if_not_exists: bool,
        reply: oneshot::Sender<Result<ViewInfo, QueryError>>,
    },
    Drop {
        name: String,
        if_exists: bool,
        reply: oneshot::Sender<Result<bool, QueryError>>,
    },
    Explain {
        name: String,
        reply: oneshot::Sender<Result<Vec<String>, QueryError>>,
    },
    Checkpoint {
        reply: oneshot::Sender<crate::Result<()>>,
    },
    Barrier {
        reply: oneshot::Sender<()>,
    },
    /// Weighs the state against the memory limit now, and moves state to disk until
    /// it is under it (tests: no waiting for the maintainer's own rounds).
    #[cfg(test)]
    Bound {
        reply: oneshot::Sender<()>,
    },
    Stop,
}

/// Where durable events enter the view maintainer; lives before the maintainer does,
/// so records replayed at start wait for it.
#[derive(Debug)]
pub(crate) struct ViewFeed {
    tx: Mutex<mpsc::Sender<Msg>>,
    rx: Mutex<Option<mpsc::Receiver<Msg>>>,
    /// Acknowledgement times of events not yet applied, oldest first.
    pending: Mutex<VecDeque<Instant>>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Event(_) => "Event",
            Self::Create { .. } => "Create",
            Self::Drop { .. } => "Drop",
            Self::Explain { .. } => "Explain",
            Self::Checkpoint { .. } => "Checkpoint",
            Self::Barrier { .. } => "Barrier",
            #[cfg(test)]
            Self::Bound { .. } => "Bound",
            Self::Stop => "Stop",
        })
    }
}

impl ViewFeed {
    pub(crate) fn new() -> Self {
        let (tx, rx) = mpsc::channel();
        Self {
            tx: Mutex::new(tx),
            rx: Mutex::new(Some(rx)),
            pending: Mutex::new(VecDeque::new()),
        }
    }

    /// Hands a durable record to the views (called in WAL order).
    pub(crate) fn push(&self, seq: u64, stream: &str, batch: RecordBatch) {
        let acked = Instant::now();
        self.pending.lock().push_back(acked);
        let _ = self.tx.lock().send(Msg::Event(Event {
            seq,
            stream: stream.to_owned(),
            batch,
            acked,
        }));
    }

    fn send(&self, msg: Msg) -> bool {
        self.tx.lock().send(msg).is_ok()
    }

    fn lag(&self) -> Duration {
        self.pending
            .lock()
            .front()
            .map(Instant::elapsed)
            .unwrap_or_default()
    }
}

/// The views of an engine, and their public API (reached through `Engine::views`).
#[derive(Debug)]
pub struct Views {
    feed: Arc<ViewFeed>,
    registry: RwLock<BTreeMap<String, Arc<ViewShared>>>,
    changes: broadcast::Sender<Arc<ChangeSet>>,
    /// Per stream, the lowest WAL position a checkpointed view still needs replayed.
    floor: RwLock<Option<HashMap<String, u64>>>,
    /// How the last checkpoint written held the maintainer.
    last_checkpoint: Mutex<Option<checkpoint::Slices>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    options: ViewOptions,
    ordinals: std::sync::atomic::AtomicU64,
}

impl Views {
    pub(crate) fn new(options: ViewOptions, feed: Arc<ViewFeed>) -> Self {
        Self {
            feed,
            registry: RwLock::new(BTreeMap::new()),
            changes: broadcast::channel(CHANGE_FEED_CAPACITY).0,
            floor: RwLock::new(None),
            last_checkpoint: Mutex::new(None),
            thread: Mutex::new(None),
            options,
            ordinals: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<ViewShared>> {
        self.registry.read().get(name).cloned()
    }

    pub(crate) fn names(&self) -> Vec<String> {
        self.registry.read().keys().cloned().collect()
    }

    /// View names in creation order.
    pub(crate) fn names_in_order(&self) -> Vec<String> {
        let mut views: Vec<_> = self
            .registry
            .read()
            .values()
            .map(|v| (v.ordinal, v.name.clone()))
            .collect();
        views.sort();
        views.into_iter().map(|(_, n)| n).collect()
    }

    fn next_ordinal(&self) -> u64 {
        self.ordinals.fetch_add(1, Ordering::Relaxed)
    }

    /// The WAL positions checkpointed views still need, per stream.
    pub(crate) fn wal_floor(&self) -> Option<HashMap<String, u64>> {
        self.floor.read().clone()
    }

    /// Starts the maintainer, restores checkpointed views, defines the rest; returns
    /// once every view is ready.
    pub(crate) async fn start(host: &dyn ViewHost, weak: Arc<dyn WeakHost>) -> crate::Result<()> {
        let views = host.views();
        let rx = views
            .feed
            .rx
            .lock()
            .take()
            .ok_or_else(|| crate::Error::Config("the view maintainer already runs".into()))?;
        if !views.options.maintain {
            // With the receiver gone every request to the maintainer is refused at
            // once, as after a stop.
            drop(rx);
            return Ok(());
        }
        let (ready_tx, ready_rx) = oneshot::channel();
        let spill = spill::open(&views.options);
        let handle = std::thread::Builder::new()
            .name("quiver-views".into())
            .spawn(move || {
                let mut m = Maintainer {
                    host: weak,
                    views: Vec::new(),
                    rx,
                    dirty: false,
                    writing: None,
                    asked: Vec::new(),
                    answering: Vec::new(),
                    slicing: None,
                    last_checkpoint_bytes: 0,
                    chain: Chain::default(),
                    spill,
                    bounded: Instant::now(),
                };
                m.restore();
                let _ = ready_tx.send(());
                m.run();
            })?;
        *views.thread.lock() = Some(handle);
        let _ = ready_rx.await;
        // Records replayed from the WAL wait in the feed; ready means applied.
        views.views_settled().await;
        Ok(())
    }

    /// Stops the maintainer without a checkpoint, as a crash would.
    #[cfg(test)]
    pub(crate) fn abandon(&self) {
        self.feed.send(Msg::Stop);
    }

    /// Checkpoints every view, then stops the maintainer.
    pub(crate) async fn stop(&self) {
        let (tx, rx) = oneshot::channel();
        if self.feed.send(Msg::Checkpoint { reply: tx }) {
            match rx.await {
                Ok(Err(e)) => error!(error = %e, "final view checkpoint failed"),
                Ok(Ok(())) => info!("views checkpointed"),
                Err(_) => {}
            }
        }
        self.feed.send(Msg::Stop);
        let handle = self.thread.lock().take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}

fn gone() -> QueryError {
    QueryError::Internal("the view maintainer has stopped".into())
}

impl Views {
    /// Creates a materialized view from `CREATE MATERIALIZED VIEW`'s parts. Returns once
    /// it is filled from the existing data.
    pub async fn create_view(
        &self,
        name: &str,
        sql: &str,
        if_not_exists: bool,
    ) -> Result<ViewInfo, QueryError> {
        let (tx, rx) = oneshot::channel();
        let sent = self.feed.send(Msg::Create {
            name: name.to_owned(),
            sql: sql.to_owned(),
            if_not_exists,
            reply: tx,
        });
        if !sent {
            return Err(gone());
        }
        rx.await.map_err(|_| gone())?
    }

    /// Drops a view. False when it did not exist and `if_exists` is set.
    pub async fn drop_view(&self, name: &str, if_exists: bool) -> Result<bool, QueryError> {
        let (tx, rx) = oneshot::channel();
        if !self.feed.send(Msg::Drop {
            name: name.to_owned(),
            if_exists,
            reply: tx,
        }) {
            return Err(gone());
        }
        rx.await.map_err(|_| gone())?
    }

    /// How a view is maintained: the operator tree, or why it is recomputed.
    pub async fn explain_view(&self, name: &str) -> Result<Vec<String>, QueryError> {
        let (tx, rx) = oneshot::channel();
        if !self.feed.send(Msg::Explain {
            name: name.to_owned(),
            reply: tx,
        }) {
            return Err(gone());
        }
        rx.await.map_err(|_| gone())?
    }

    /// Writes a checkpoint of every view now (after the events already acknowledged).
    pub async fn checkpoint_views(&self) -> crate::Result<()> {
        let (tx, rx) = oneshot::channel();
        if !self.feed.send(Msg::Checkpoint { reply: tx }) {
            return Err(crate::Error::Config(
                "the view maintainer has stopped".into(),
            ));
        }
        rx.await
            .map_err(|_| crate::Error::Config("the view maintainer has stopped".into()))?
    }

    /// How the last view checkpoint written held the maintainer: its longest hold,
    /// how many holds, and their time together.
    pub fn last_checkpoint_holds(&self) -> Option<CheckpointHolds> {
        *self.last_checkpoint.lock()
    }

    /// Returns once every event acknowledged before the call is applied to the views.
    pub async fn views_settled(&self) {
        let (tx, rx) = oneshot::channel();
        if self.feed.send(Msg::Barrier { reply: tx }) {
            let _ = rx.await;
        }
    }

    /// Moves view state to disk until it is under the memory limit.
    #[cfg(test)]
    pub(crate) async fn bound_memory_now(&self) {
        let (tx, rx) = oneshot::channel();
        if self.feed.send(Msg::Bound { reply: tx }) {
            let _ = rx.await;
        }
    }

    /// Every view, in creation order (a view after those it reads).
    pub fn views_info(&self) -> Vec<ViewInfo> {
        self.names_in_order()
            .iter()
            .filter_map(|n| self.get(n))
            .map(|v| self.info_of(&v))
            .collect()
    }

    /// One view.
    pub fn view_info(&self, name: &str) -> Option<ViewInfo> {
        self.get(name).map(|v| self.info_of(&v))
    }

    pub(crate) fn info_of(&self, v: &ViewShared) -> ViewInfo {
        let state = v.state.read();
        ViewInfo {
            name: v.name.clone(),
            sql: v.sql.clone(),
            key: v.key.clone(),
            schema: Arc::clone(state.output.schema()),
            maintenance: v.maintenance,
            reason: v.reason.clone(),
            version: state.version,
            // Rounded up: a view with anything pending is never reported as caught up.
            lag_ms: self.feed.lag().as_micros().div_ceil(1000) as u64,
            rows: state.output.len(),
            state_bytes: v.state_bytes.load(Ordering::Relaxed),
            state_disk_bytes: v.disk_bytes.load(Ordering::Relaxed),
            reads: v.reads.clone(),
            apply_time: Duration::from_nanos(v.apply_nanos.load(Ordering::Relaxed)),
        }
    }

    /// A view's rows now, with their version.
    pub fn view_snapshot(&self, name: &str) -> Option<Result<ViewSnapshot, QueryError>> {
        let v = self.get(name)?;
        Some(
            v.snapshot()
                .map(|(version, rows)| ViewSnapshot {
                    version,
                    key: v.key.clone(),
                    rows,
                })
                .map_err(QueryError::from),
        )
    }

    /// Change sets of every view as they are published.
    pub fn subscribe_changes(&self) -> broadcast::Receiver<Arc<ChangeSet>> {
        self.changes.subscribe()
    }

    /// A view's current version; `None` when there is no such view.
    pub fn view_version(&self, name: &str) -> Option<u64> {
        Some(self.get(name)?.state.read().version)
    }

    /// The change sets a view has kept after `version`, if they reach back that far.
    pub fn view_changes_since(&self, name: &str, version: u64) -> Option<Vec<Arc<ChangeSet>>> {
        let v = self.get(name)?;
        let history = v.history.lock();
        let current = v.state.read().version;
        if version > current {
            // A version this view never had here (say, the view was dropped and created
            // anew): the caller needs a fresh snapshot.
            return None;
        }
        if version == current {
            return Some(Vec::new());
        }
        let first = history.front()?.version;
        if first > version + 1 {
            return None;
        }
        Some(
            history
                .iter()
                .filter(|c| c.version > version)
                .cloned()
                .collect(),
        )
    }
}

/// Largest micro-batch, in rows.
const MAX_BATCH_ROWS: usize = 100_000;
/// Longest the maintainer waits before looking at the clock again while a view has a
/// temporal filter.
const TEMPORAL_TICK: Duration = Duration::from_secs(1);

/// Where an earlier release kept view definitions (read once, into the catalog).
pub(crate) const DEFINITIONS_FILE: &str = "_quiver/views.json";
/// Change sets the feed to push holds until push has taken them. A push that falls
/// further behind catches up from each view's kept changes (`--view-history`), so a
/// larger feed would only hold the same change sets longer: at 10,000 subscribers a
/// feed of 16,384 held 9,636 of them.
const CHANGE_FEED_CAPACITY: usize = 1024;
const MAGIC: &[u8] = b"QUIVER-VIEWS-3";
/// Rows per batch when a view's rows are rebuilt from its operators' state.
const REBUILD_CHUNK: usize = if cfg!(test) { 7 } else { 65_536 };
/// Rows per batch when a view's rows are listed from its operators' state for a
/// snapshot: all at once, so a large view is not held twice while its parts are
/// joined (in tests, small parts, so joining them is exercised).
const LIST_CHUNK: usize = if cfg!(test) { 7 } else { usize::MAX };

/// A view's definition as the catalog keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SavedView {
    name: String,
    sql: String,
}

/// Puts `view` into `defs`, in place of a definition of the same name.
fn upsert(defs: &mut Vec<SavedView>, view: &SavedView) {
    match defs.iter_mut().find(|d| d.name == view.name) {
        Some(d) => d.sql.clone_from(&view.sql),
        None => defs.push(view.clone()),
    }
}

#[cfg(test)]
mod tests;
