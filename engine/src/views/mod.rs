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
mod ops;
mod output;
mod plan;
mod tracked;
mod zset;

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

use crate::engine::{Engine, WeakEngine};
use crate::metrics::ViewLabel;
use crate::query::QueryError;
use checkpoint::{Chain, SavedState, read_chain};
use codec::Reader;
use output::{Output, Rows};
use plan::{Node, SourceKind};
use zset::ZBatch;

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
}

impl Default for ViewOptions {
    fn default() -> Self {
        Self {
            definitions: Vec::new(),
            recompute_interval: Duration::from_secs(1),
            checkpoint_interval: Duration::from_secs(30),
            history: 256,
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
    /// How far behind acknowledged ingest the view is, in milliseconds.
    pub lag_ms: u64,
    /// Rows held.
    pub rows: usize,
    /// Approximate bytes of state (operators and rows).
    pub state_bytes: usize,
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
        engine: &Engine,
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
            ordinal: engine.views().next_ordinal(),
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

/// The views of an engine.
#[derive(Debug)]
pub(crate) struct Views {
    registry: RwLock<BTreeMap<String, Arc<ViewShared>>>,
    changes: broadcast::Sender<Arc<ChangeSet>>,
    /// Per stream, the lowest WAL position a checkpointed view still needs replayed.
    floor: RwLock<Option<HashMap<String, u64>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    options: ViewOptions,
    ordinals: std::sync::atomic::AtomicU64,
}

impl Views {
    pub(crate) fn new(options: ViewOptions) -> Self {
        Self {
            registry: RwLock::new(BTreeMap::new()),
            changes: broadcast::channel(CHANGE_FEED_CAPACITY).0,
            floor: RwLock::new(None),
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
    pub(crate) async fn start(engine: &Engine) -> crate::Result<()> {
        let rx = engine
            .view_feed()
            .rx
            .lock()
            .take()
            .ok_or_else(|| crate::Error::Config("the view maintainer already runs".into()))?;
        let (ready_tx, ready_rx) = oneshot::channel();
        let weak = engine.downgrade();
        let handle = std::thread::Builder::new()
            .name("quiver-views".into())
            .spawn(move || {
                let mut m = Maintainer {
                    engine: weak,
                    views: Vec::new(),
                    rx,
                    dirty: false,
                    writing: None,
                    last_checkpoint_bytes: 0,
                    chain: Chain::default(),
                };
                m.restore();
                let _ = ready_tx.send(());
                m.run();
            })?;
        *engine.views().thread.lock() = Some(handle);
        let _ = ready_rx.await;
        // Records replayed from the WAL wait in the feed; ready means applied.
        engine.views_settled().await;
        Ok(())
    }

    /// Stops the maintainer without a checkpoint, as a crash would.
    #[cfg(test)]
    pub(crate) fn abandon(engine: &Engine) {
        engine.view_feed().send(Msg::Stop);
    }

    /// Checkpoints every view, then stops the maintainer.
    pub(crate) async fn stop(engine: &Engine) {
        let (tx, rx) = oneshot::channel();
        if engine.view_feed().send(Msg::Checkpoint { reply: tx }) {
            match rx.await {
                Ok(Err(e)) => error!(error = %e, "final view checkpoint failed"),
                Ok(Ok(())) => info!("views checkpointed"),
                Err(_) => {}
            }
        }
        engine.view_feed().send(Msg::Stop);
        let handle = engine.views().thread.lock().take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}

fn gone() -> QueryError {
    QueryError::Internal("the view maintainer has stopped".into())
}

impl Engine {
    /// Creates a materialized view from `CREATE MATERIALIZED VIEW`'s parts. Returns once
    /// it is filled from the existing data.
    pub async fn create_view(
        &self,
        name: &str,
        sql: &str,
        if_not_exists: bool,
    ) -> Result<ViewInfo, QueryError> {
        let (tx, rx) = oneshot::channel();
        let sent = self.view_feed().send(Msg::Create {
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
        if !self.view_feed().send(Msg::Drop {
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
        if !self.view_feed().send(Msg::Explain {
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
        if !self.view_feed().send(Msg::Checkpoint { reply: tx }) {
            return Err(crate::Error::Config(
                "the view maintainer has stopped".into(),
            ));
        }
        rx.await
            .map_err(|_| crate::Error::Config("the view maintainer has stopped".into()))?
    }

    /// Returns once every event acknowledged before the call is applied to the views.
    pub async fn views_settled(&self) {
        let (tx, rx) = oneshot::channel();
        if self.view_feed().send(Msg::Barrier { reply: tx }) {
            let _ = rx.await;
        }
    }

    /// Every view, in creation order (a view after those it reads).
    pub fn views_info(&self) -> Vec<ViewInfo> {
        let views = self.views();
        views
            .names_in_order()
            .iter()
            .filter_map(|n| views.get(n))
            .map(|v| self.info_of(&v))
            .collect()
    }

    /// One view.
    pub fn view_info(&self, name: &str) -> Option<ViewInfo> {
        self.views().get(name).map(|v| self.info_of(&v))
    }

    fn info_of(&self, v: &ViewShared) -> ViewInfo {
        let state = v.state.read();
        ViewInfo {
            name: v.name.clone(),
            sql: v.sql.clone(),
            key: v.key.clone(),
            schema: Arc::clone(state.output.schema()),
            maintenance: v.maintenance,
            reason: v.reason.clone(),
            version: state.version,
            lag_ms: self.view_feed().lag().as_millis() as u64,
            rows: state.output.len(),
            state_bytes: v.state_bytes.load(Ordering::Relaxed),
            reads: v.reads.clone(),
            apply_time: Duration::from_nanos(v.apply_nanos.load(Ordering::Relaxed)),
        }
    }

    /// A view's rows now, with their version.
    pub fn view_snapshot(&self, name: &str) -> Option<Result<ViewSnapshot, QueryError>> {
        let v = self.views().get(name)?;
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
        self.views().changes.subscribe()
    }

    /// A view's current version; `None` when there is no such view.
    pub fn view_version(&self, name: &str) -> Option<u64> {
        Some(self.views().get(name)?.state.read().version)
    }

    /// The change sets a view has kept after `version`, if they reach back that far.
    pub fn view_changes_since(&self, name: &str, version: u64) -> Option<Vec<Arc<ChangeSet>>> {
        let v = self.views().get(name)?;
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

/// A view as the maintainer holds it.
struct Running {
    shared: Arc<ViewShared>,
    /// Maintained by operators (in `shared`'s state) rather than recomputed.
    incremental: bool,
    /// What applying a batch to this view costs, in nanoseconds (a moving average).
    cost_ns: f64,
    /// Per stream read, the last WAL position applied.
    positions: BTreeMap<String, u64>,
    next_recompute: Instant,
    /// The stored checkpoint chain holds this view's state, so the next checkpoint may
    /// write only what changed; false for a view created or rebuilt since.
    in_chain: bool,
}

impl Running {
    fn name(&self) -> &str {
        &self.shared.name
    }
}

struct Maintainer {
    engine: WeakEngine,
    views: Vec<Running>,
    rx: mpsc::Receiver<Msg>,
    dirty: bool,
    /// The checkpoint being written to the store, off this thread.
    writing: Option<std::thread::JoinHandle<crate::Result<()>>>,
    /// The size of the last checkpoint, to size the next one's buffer at once.
    last_checkpoint_bytes: usize,
    /// The checkpoint files in the store.
    chain: Chain,
}

/// Largest micro-batch, in rows.
const MAX_BATCH_ROWS: usize = 100_000;

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

impl Maintainer {
    fn engine(&self) -> Option<Engine> {
        self.engine.upgrade()
    }

    fn run(&mut self) {
        let mut last_checkpoint = Instant::now();
        let mut held: Option<Msg> = None;
        loop {
            let Some(engine) = self.engine() else { return };
            let options = engine.views().options.clone();
            drop(engine);
            let now = Instant::now();
            let next_recompute = self
                .views
                .iter()
                .filter(|v| !v.incremental)
                .map(|v| v.next_recompute)
                .min();
            let next_checkpoint = last_checkpoint + options.checkpoint_interval;
            let deadline = next_recompute
                .map_or(next_checkpoint, |r| r.min(next_checkpoint))
                .max(now);
            let msg = match held.take() {
                Some(m) => Ok(m),
                None => self.rx.recv_timeout(deadline - now),
            };
            match msg {
                Ok(Msg::Event(first)) => {
                    let mut events = vec![first];
                    let mut rows = events[0].batch.num_rows();
                    while rows < MAX_BATCH_ROWS {
                        match self.rx.try_recv() {
                            Ok(Msg::Event(e)) => {
                                rows += e.batch.num_rows();
                                events.push(e);
                            }
                            Ok(other) => {
                                held = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.apply_events(events);
                }
                Ok(Msg::Create {
                    name,
                    sql,
                    if_not_exists,
                    reply,
                }) => {
                    let _ = reply.send(self.create(&name, &sql, if_not_exists, true));
                }
                Ok(Msg::Drop {
                    name,
                    if_exists,
                    reply,
                }) => {
                    let _ = reply.send(self.drop_view(&name, if_exists));
                }
                Ok(Msg::Explain { name, reply }) => {
                    let _ = reply.send(self.explain(&name));
                }
                Ok(Msg::Checkpoint { reply }) => {
                    let _ = reply.send(self.checkpoint());
                    last_checkpoint = Instant::now();
                }
                Ok(Msg::Barrier { reply }) => {
                    let _ = reply.send(());
                }
                Ok(Msg::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    if let Err(e) = self.finish_checkpoint() {
                        warn!(error = %e, "view checkpoint failed");
                    }
                    return;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            let now = Instant::now();
            if self
                .views
                .iter()
                .any(|v| !v.incremental && v.next_recompute <= now)
            {
                self.recompute_due();
            }
            if self.writing.as_ref().is_some_and(|h| h.is_finished())
                && let Err(e) = self.finish_checkpoint()
            {
                warn!(error = %e, "view checkpoint failed; will retry");
            }
            // A checkpoint still being written defers the next one rather than stall.
            if now >= last_checkpoint + options.checkpoint_interval && self.writing.is_none() {
                if self.dirty
                    && let Err(e) = self.start_checkpoint()
                {
                    warn!(error = %e, "view checkpoint failed; will retry");
                }
                last_checkpoint = Instant::now();
            }
        }
    }

    /// Applies durable events to every view, then publishes the change sets.
    fn apply_events(&mut self, events: Vec<Event>) {
        let Some(engine) = self.engine() else { return };
        let started = Instant::now();
        let acked = events.iter().map(|e| e.acked).min();
        let mut by_stream: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
        for e in &events {
            by_stream.entry(e.stream.as_str()).or_default().push(e);
        }
        let mut cache: HashMap<(String, u64), ZBatch> = HashMap::new();
        let mut inputs = |stream: &str, after: u64| -> Option<(ZBatch, u64)> {
            let evs = by_stream.get(stream)?;
            let last = evs.last()?.seq;
            if last <= after {
                return None;
            }
            let key = (stream.to_owned(), after);
            if let Some(z) = cache.get(&key) {
                return Some((z.clone(), last));
            }
            let parts: Vec<ZBatch> = evs
                .iter()
                .filter(|e| e.seq > after)
                .map(|e| ZBatch::inserts(e.batch.clone()))
                .collect();
            let z = ZBatch::concat(&parts[0].batch.schema(), &parts).ok()?;
            cache.insert(key, z.clone());
            Some((z, last))
        };
        let mut diffs: HashMap<String, ZBatch> = HashMap::new();
        let mut broken = Vec::new();
        for i in self.batch_order() {
            let run = &mut self.views[i];
            if !run.incremental {
                continue;
            }
            let view_started = Instant::now();
            let mut deltas = Vec::new();
            for src in &run.shared.reads {
                let delta = if let Some(d) = diffs.get(src) {
                    Some(d.clone())
                } else {
                    let after = run.positions.get(src).copied();
                    match after {
                        Some(after) => inputs(src, after).map(|(z, last)| {
                            run.positions.insert(src.clone(), last);
                            z
                        }),
                        None => None,
                    }
                };
                deltas.extend(delta.map(|d| (src.clone(), d)));
            }
            match advance(&engine, run, &deltas, acked) {
                Ok(Some(diff)) => {
                    diffs.insert(run.shared.name.clone(), diff);
                }
                Ok(None) => {}
                Err(e) => {
                    error!(view = run.name(), error = %e, "view update failed; rebuilding it from its sources");
                    broken.push(i);
                }
            }
            let spent = view_started.elapsed();
            run.cost_ns = 0.9 * run.cost_ns + 0.1 * spent.as_nanos() as f64;
            run.shared
                .apply_nanos
                .fetch_add(spent.as_nanos() as u64, Ordering::Relaxed);
            engine
                .metrics()
                .view_apply_seconds
                .get_or_create(&ViewLabel {
                    view: run.shared.name.clone(),
                })
                .observe(spent.as_secs_f64());
        }
        {
            let mut pending = engine.view_feed().pending.lock();
            for _ in 0..events.len() {
                pending.pop_front();
            }
        }
        self.dirty = true;
        engine
            .metrics()
            .view_batch_seconds
            .observe(started.elapsed().as_secs_f64());
        for i in broken {
            self.rebuild(i);
        }
    }

    /// The order to apply a batch in: every view after the views it reads and, of those
    /// ready, the cheapest first. Each view's change set goes out as soon as it is
    /// applied, and push sends change sets in that order, so an expensive view (a
    /// `DISTINCT ON` over every order line, whose deltas are large) placed early would
    /// hold back the change sets of every cheap view after it.
    fn batch_order(&self) -> Vec<usize> {
        let n = self.views.len();
        let index: HashMap<&str, usize> = self
            .views
            .iter()
            .enumerate()
            .map(|(i, v)| (v.name(), i))
            .collect();
        let mut done = vec![false; n];
        let mut order = Vec::with_capacity(n);
        while order.len() < n {
            let ready = (0..n).filter(|&i| {
                !done[i]
                    && self.views[i]
                        .shared
                        .reads
                        .iter()
                        .all(|r| index.get(r.as_str()).is_none_or(|&j| done[j]))
            });
            let Some(next) = ready.min_by(|&a, &b| {
                self.views[a]
                    .cost_ns
                    .total_cmp(&self.views[b].cost_ns)
                    .then(a.cmp(&b))
            }) else {
                // (Cannot happen: a view is created after the views it reads.)
                order.extend((0..n).filter(|&i| !done[i]));
                break;
            };
            done[next] = true;
            order.push(next);
        }
        order
    }

    /// Runs every due recompute view and passes its change to the views reading it.
    fn recompute_due(&mut self) {
        let Some(engine) = self.engine() else { return };
        let interval = engine.views().options.recompute_interval;
        let now = Instant::now();
        for i in 0..self.views.len() {
            if self.views[i].incremental || self.views[i].next_recompute > now {
                continue;
            }
            self.views[i].next_recompute = now + interval;
            let sql = self.views[i].shared.sql.clone();
            let result = run_query(&engine, &sql);
            let applied = result.and_then(|batch| {
                let run = &self.views[i];
                let mut state = run.shared.state.write();
                let batch = crate::query::cast_batch(&batch, state.output.schema())?;
                let applied = state.replace(&batch)?;
                Ok((state.bump(&applied), applied))
            });
            match applied {
                Ok((version, applied)) if !applied.is_empty() => {
                    let diff = finish(&engine, &self.views[i], applied, version, None);
                    self.dirty = true;
                    self.propagate(&engine, i, diff);
                }
                Ok(_) => {}
                Err(e) => warn!(view = self.views[i].name(), error = %e, "recompute failed"),
            }
        }
    }

    /// Feeds one view's change to the incremental views after it.
    fn propagate(&mut self, engine: &Engine, from: usize, diff: ZBatch) {
        let mut diffs: HashMap<String, ZBatch> = HashMap::new();
        diffs.insert(self.views[from].shared.name.clone(), diff);
        let mut broken = Vec::new();
        for i in from + 1..self.views.len() {
            let run = &self.views[i];
            let deltas: Vec<(String, ZBatch)> = run
                .shared
                .reads
                .iter()
                .filter_map(|src| Some((src.clone(), diffs.get(src)?.clone())))
                .collect();
            if deltas.is_empty() {
                continue;
            }
            match advance(engine, run, &deltas, None) {
                Ok(Some(d)) => {
                    diffs.insert(run.shared.name.clone(), d);
                }
                Ok(None) => {}
                Err(e) => {
                    error!(view = run.name(), error = %e, "view update failed");
                    broken.push(i);
                }
            }
        }
        for i in broken {
            self.rebuild(i);
        }
    }

    /// Refills a view whose state can no longer be trusted, publishing the difference.
    fn rebuild(&mut self, i: usize) {
        let Some(engine) = self.engine() else { return };
        let sql = self.views[i].shared.sql.clone();
        let name = self.views[i].shared.name.clone();
        match self.build(&engine, &name, &sql) {
            Ok(fresh) => {
                let rows = fresh.shared.snapshot().map(|(_, r)| r);
                let applied = {
                    let mut state = self.views[i].shared.state.write();
                    // The rows now are listed before the operators are swapped: they
                    // may be derived from the old operators' state.
                    let applied = rows.and_then(|rows| state.replace(&rows));
                    state.node = fresh.shared.state.write().node.take();
                    applied.map(|applied| (state.bump(&applied), applied))
                };
                self.views[i].positions = fresh.positions;
                // The fresh operators know nothing of what the old ones held.
                self.views[i].in_chain = false;
                if let Ok((version, applied)) = applied
                    && !applied.is_empty()
                {
                    let diff = finish(&engine, &self.views[i], applied, version, None);
                    self.propagate(&engine, i, diff);
                }
            }
            Err(e) => error!(view = %name, error = %e, "rebuilding the view failed"),
        }
    }

    fn source_kind(&self, engine: &Engine, name: &str) -> Option<SourceKind> {
        if engine.stream_schema(name).is_some() {
            return Some(SourceKind::Stream);
        }
        let v = self.views.iter().find(|v| v.name() == name)?;
        let state = v.shared.state.read();
        let keyed = v.shared.key.len() < state.output.schema().fields().len()
            || state.node.as_ref().is_some_and(|n| n.key.is_some());
        Some(SourceKind::View {
            key: keyed.then(|| state.output.key_columns().to_vec()),
        })
    }

    /// Plans a view and fills it from the data as it is now.
    fn build(&self, engine: &Engine, name: &str, sql: &str) -> Result<Running, QueryError> {
        let plan = engine
            .query_runtime()
            .block_on(engine.view_planner().plan_view(sql))?;
        let compiled = plan::compile(&plan, &engine.view_planner().state(), &|n| {
            self.source_kind(engine, n)
        });
        let schema: SchemaRef = Arc::clone(plan.schema().inner());
        let mut reads = Vec::new();
        collect_tables(&plan, &mut reads);
        for r in &reads {
            if self.source_kind(engine, r).is_none() {
                return Err(QueryError::Invalid(format!(
                    "view {name} reads '{r}', which is neither a stream nor a view"
                )));
            }
        }
        let (mut node, reason) = match compiled {
            Ok(node) => (Some(node), None),
            Err(why) => (None, Some(why)),
        };
        let mut output = new_output(&schema, node.as_ref())?;
        let mut positions = BTreeMap::new();
        let started = Instant::now();
        let label = ViewLabel {
            view: name.to_owned(),
        };
        match node.as_mut() {
            Some(node) => {
                let mut sources = Vec::new();
                node.sources(&mut sources);
                let mut rows = 0u64;
                let mut last_log = Instant::now();
                for src in &sources {
                    let mut feed = |batch: RecordBatch| -> datafusion::common::Result<()> {
                        rows += batch.num_rows() as u64;
                        engine
                            .metrics()
                            .view_backfill_rows_total
                            .get_or_create(&label)
                            .inc_by(batch.num_rows() as u64);
                        if let Some(out) = node.apply(src, &ZBatch::inserts(batch))? {
                            output.apply(&out, false)?;
                        }
                        if last_log.elapsed() >= Duration::from_secs(5) {
                            info!(view = name, rows, "backfilling view");
                            last_log = Instant::now();
                        }
                        Ok(())
                    };
                    if engine.stream_schema(src).is_some() {
                        let position = engine
                            .query_runtime()
                            .block_on(scan_stream(engine, src, &mut feed))?;
                        positions.insert(src.clone(), position);
                    } else if let Some(parent) = self.views.iter().find(|v| v.name() == src) {
                        let (_, rows) = parent.shared.snapshot()?;
                        feed(rows)?;
                    }
                }
                // Once over no rows, so an aggregate without GROUP BY has its one row
                // even over empty sources.
                if let Some(src) = sources.first() {
                    let empty = match engine.stream_schema(src) {
                        Some(s) => crate::query::query_schema(s.stored_schema()),
                        None => self
                            .views
                            .iter()
                            .find(|v| v.name() == src)
                            .map(|v| v.shared.schema())
                            .ok_or_else(|| QueryError::Internal(format!("{src} vanished")))?,
                    };
                    if let Some(out) = node.apply(src, &ZBatch::empty(empty))? {
                        output.apply(&out, false)?;
                    }
                }
                info!(
                    view = name,
                    rows,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "view filled from existing data; maintained incrementally from here"
                );
            }
            None => {
                let batch = run_query(engine, sql)?;
                let batch = crate::query::cast_batch(&batch, &schema)
                    .map_err(|e| QueryError::Internal(e.to_string()))?;
                output.replace(&output.snapshot()?, &batch)?;
                info!(
                    view = name,
                    reason = reason.as_deref().unwrap_or(""),
                    "view is recomputed on an interval"
                );
            }
        }
        let incremental = node.is_some();
        let shared = ViewShared::new(
            engine,
            name,
            sql,
            incremental,
            reason,
            reads,
            output,
            node,
            1,
        );
        let interval = engine.views().options.recompute_interval;
        let run = Running {
            shared,
            incremental,
            cost_ns: 0.0,
            positions,
            next_recompute: Instant::now() + interval,
            in_chain: false,
        };
        update_gauges(engine, &run);
        Ok(run)
    }

    fn create(
        &mut self,
        name: &str,
        sql: &str,
        if_not_exists: bool,
        save: bool,
    ) -> Result<ViewInfo, QueryError> {
        let engine = self.engine().ok_or_else(gone)?;
        if !crate::schema::is_valid_identifier(name) {
            return Err(QueryError::Invalid(format!(
                "'{name}' is not a valid view name: use lower-case letters, digits and _, \
                 starting with a letter"
            )));
        }
        if engine.stream_schema(name).is_some() {
            return Err(QueryError::Conflict(format!("'{name}' is a stream")));
        }
        if let Some(v) = self.views.iter().find(|v| v.name() == name) {
            if if_not_exists {
                return Ok(engine.info_of(&v.shared));
            }
            return Err(QueryError::Conflict(format!(
                "materialized view '{name}' already exists"
            )));
        }
        let run = self.build(&engine, name, sql)?;
        let info = engine.info_of(&run.shared);
        engine
            .views()
            .registry
            .write()
            .insert(name.to_owned(), Arc::clone(&run.shared));
        self.views.push(run);
        self.dirty = true;
        if save {
            let saved = SavedView {
                name: name.to_owned(),
                sql: sql.to_owned(),
            };
            self.store_definitions(&engine, |defs| upsert(defs, &saved))?;
        }
        info!(
            view = name,
            maintenance = info.maintenance.as_str(),
            "materialized view created"
        );
        Ok(info)
    }

    fn drop_view(&mut self, name: &str, if_exists: bool) -> Result<bool, QueryError> {
        let engine = self.engine().ok_or_else(gone)?;
        let Some(i) = self.views.iter().position(|v| v.name() == name) else {
            if if_exists {
                return Ok(false);
            }
            return Err(QueryError::NotFound(format!(
                "materialized view '{name}' does not exist"
            )));
        };
        let dependents: Vec<&str> = self
            .views
            .iter()
            .filter(|v| v.shared.reads.iter().any(|r| r == name))
            .map(Running::name)
            .collect();
        if !dependents.is_empty() {
            return Err(QueryError::Conflict(format!(
                "cannot drop materialized view '{name}': {} read{} it; drop {} first",
                dependents.join(", "),
                if dependents.len() == 1 { "s" } else { "" },
                if dependents.len() == 1 { "it" } else { "them" },
            )));
        }
        self.views.remove(i);
        engine.views().registry.write().remove(name);
        self.store_definitions(&engine, |defs| defs.retain(|d| d.name != name))?;
        self.dirty = true;
        if let Err(e) = self.checkpoint() {
            warn!(error = %e, "view checkpoint after a drop failed");
        }
        info!(view = name, "materialized view dropped");
        Ok(true)
    }

    fn explain(&self, name: &str) -> Result<Vec<String>, QueryError> {
        let run = self
            .views
            .iter()
            .find(|v| v.name() == name)
            .ok_or_else(|| {
                QueryError::NotFound(format!("materialized view '{name}' does not exist"))
            })?;
        let mut lines = vec![format!(
            "MaterializedView: {name} maintenance={} key=[{}] version={}",
            run.shared.maintenance.as_str(),
            run.shared.key.join(", "),
            run.shared.state.read().version
        )];
        match &run.shared.state.read().node {
            Some(node) => node.explain(1, &mut lines),
            None => lines.push(format!(
                "  recomputed every {:?}: {}",
                self.engine()
                    .map(|e| e.views().options.recompute_interval)
                    .unwrap_or_default(),
                run.shared.reason.as_deref().unwrap_or("")
            )),
        }
        Ok(lines)
    }

    /// Applies `change` to the catalog's view definitions (see [`crate::catalog`]: a
    /// change made meanwhile by another server on the store is kept, not overwritten).
    fn store_definitions(
        &self,
        engine: &Engine,
        mut change: impl FnMut(&mut Vec<SavedView>),
    ) -> Result<(), QueryError> {
        engine
            .query_runtime()
            .block_on(engine.views_document().update(|defs| {
                change(defs);
                Ok(())
            }))
            .map(|_| ())
            .map_err(|e| QueryError::Internal(format!("cannot save view definitions: {e}")))
    }

    /// Loads saved definitions and the checkpoint, then brings every view up.
    fn restore(&mut self) {
        let Some(engine) = self.engine() else { return };
        let started = Instant::now();
        let rt = engine.query_runtime();
        let mut defs: Vec<SavedView> = match rt.block_on(engine.views_document().read()) {
            Ok(defs) => defs,
            Err(e) => {
                error!(error = %e, "cannot read the view definitions; starting from the configured views");
                Vec::new()
            }
        };
        for stmt in &engine.views().options.definitions {
            match crate::query::parse_view_definition(stmt) {
                Ok((name, sql)) => match defs.iter_mut().find(|d| d.name == name) {
                    Some(d) => d.sql = sql,
                    None => defs.push(SavedView { name, sql }),
                },
                Err(e) => error!(error = %e, "a configured view definition is invalid; skipped"),
            }
        }
        let saved = match rt.block_on(read_chain(&engine)) {
            Ok(Some((saved, chain))) => {
                self.chain = chain;
                saved
            }
            Ok(None) => Vec::new(),
            Err(e) => {
                warn!(error = %e, "cannot read the view checkpoint; views are refilled from the tables");
                Vec::new()
            }
        };
        for def in defs {
            let restored = saved
                .iter()
                .find(|s| s.name == def.name && s.sql == def.sql)
                .and_then(|s| match self.load_view(&engine, s) {
                    Ok(run) => Some(run),
                    Err(e) => {
                        warn!(view = %def.name, error = %e, "cannot restore the view from its checkpoint; refilling it");
                        None
                    }
                });
            let result = match restored {
                Some(run) => {
                    engine
                        .views()
                        .registry
                        .write()
                        .insert(def.name.clone(), Arc::clone(&run.shared));
                    info!(view = %def.name, version = run.shared.state.read().version, "view restored from its checkpoint");
                    self.views.push(run);
                    Ok(())
                }
                None => self.create(&def.name, &def.sql, false, false).map(|_| ()),
            };
            if let Err(e) = result {
                error!(view = %def.name, error = %e, "view could not be created; skipped");
            }
        }
        *engine.views().floor.write() = Some(self.floor());
        let running: Vec<SavedView> = self
            .views
            .iter()
            .map(|v| SavedView {
                name: v.shared.name.clone(),
                sql: v.shared.sql.clone(),
            })
            .collect();
        if let Err(e) = self.store_definitions(&engine, |defs| {
            for view in &running {
                upsert(defs, view);
            }
        }) {
            warn!(error = %e, "cannot save view definitions");
        }
        info!(
            views = self.views.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "views ready"
        );
    }

    fn load_view(&self, engine: &Engine, saved: &SavedState) -> Result<Running, QueryError> {
        let plan = engine
            .query_runtime()
            .block_on(engine.view_planner().plan_view(&saved.sql))?;
        let schema: SchemaRef = Arc::clone(plan.schema().inner());
        let mut node = plan::compile(&plan, &engine.view_planner().state(), &|n| {
            self.source_kind(engine, n)
        })
        .ok();
        if node.is_some() != saved.incremental {
            return Err(QueryError::Internal(
                "maintenance changed since the checkpoint".into(),
            ));
        }
        let mut output = new_output(&schema, node.as_ref())?;
        // The full state, then each delta on it, in the order they were written.
        for (delta, body) in &saved.bodies {
            let mut r = Reader::new(body);
            if let Some(node) = node.as_mut() {
                node.load(&mut r, *delta)?;
            }
            output.load(&mut r, *delta)?;
            if !r.is_done() {
                return Err(QueryError::Internal(
                    "the checkpoint has trailing bytes".into(),
                ));
            }
        }
        // Rows the checkpoint does not hold are listed again from the operators' state
        // (only counted, where the view does not hold them either).
        if let Some(node) = node.as_ref() {
            match output.mode() {
                Rows::Saved => {}
                Rows::Rebuilt => node.emit_all(REBUILD_CHUNK, &mut |rows| {
                    output.apply(&rows, false).map(|_| ())
                })?,
                Rows::Derived => node.emit_all(REBUILD_CHUNK, &mut |rows| {
                    output.restored(rows.batch.num_rows());
                    Ok(())
                })?,
            }
        }
        let mut reads = Vec::new();
        collect_tables(&plan, &mut reads);
        let reason = match &node {
            Some(_) => None,
            None => plan::compile(&plan, &engine.view_planner().state(), &|n| {
                self.source_kind(engine, n)
            })
            .err(),
        };
        let incremental = node.is_some();
        let shared = ViewShared::new(
            engine,
            &saved.name,
            &saved.sql,
            incremental,
            reason,
            reads,
            output,
            node,
            saved.version,
        );
        let run = Running {
            shared,
            incremental,
            cost_ns: 0.0,
            positions: saved.positions.clone(),
            next_recompute: Instant::now(),
            in_chain: true,
        };
        update_gauges(engine, &run);
        Ok(run)
    }

    /// Per stream, the lowest WAL position any view has applied.
    fn floor(&self) -> HashMap<String, u64> {
        let mut floor: HashMap<String, u64> = HashMap::new();
        for run in &self.views {
            for (s, p) in &run.positions {
                let e = floor.entry(s.clone()).or_insert(*p);
                *e = (*e).min(*p);
            }
        }
        floor
    }
}

/// Moves a view forward: runs its operators over the changes of the sources it reads
/// (`deltas`, by source) and applies what they output to its rows. Operators, rows and
/// version change under one lock, so a snapshot is never ahead of its version (and
/// rows derived from the operators match the rows held). Then records and broadcasts
/// the change set; returns the change for views that read this one.
fn advance(
    engine: &Engine,
    run: &Running,
    deltas: &[(String, ZBatch)],
    acked: Option<Instant>,
) -> datafusion::common::Result<Option<ZBatch>> {
    let read_by_others = engine
        .views()
        .registry
        .read()
        .values()
        .any(|v| v.reads.contains(&run.shared.name));
    let (version, applied) = {
        let mut state = run.shared.state.write();
        let state = &mut *state;
        let Some(node) = state.node.as_mut() else {
            return Ok(None);
        };
        let mut outs = Vec::new();
        for (src, delta) in deltas {
            outs.extend(node.apply(src, delta)?.filter(|out| !out.is_empty()));
        }
        if outs.is_empty() {
            return Ok(None);
        }
        let diff = ZBatch::concat(&outs[0].batch.schema(), &outs)?;
        let applied = state.output.apply(&diff, read_by_others)?;
        (state.bump(&applied), applied)
    };
    if applied.is_empty() {
        return Ok(None);
    }
    Ok(Some(finish(engine, run, applied, version, acked)))
}

/// Versions and sends out an applied change.
fn finish(
    engine: &Engine,
    run: &Running,
    applied: output::Applied,
    version: u64,
    acked: Option<Instant>,
) -> ZBatch {
    let change = Arc::new(ChangeSet {
        view: run.shared.name.clone(),
        version,
        upserts: applied.upserts,
        deletes: applied.deletes,
        replaced: applied.replaced,
        acked_at: acked,
    });
    let label = ViewLabel {
        view: run.shared.name.clone(),
    };
    let m = engine.metrics();
    m.view_changes_total.get_or_create(&label).inc();
    if let Some(t) = acked {
        m.view_freshness_seconds.observe(t.elapsed().as_secs_f64());
    }
    {
        let mut history = run.shared.history.lock();
        history.push_back(Arc::clone(&change));
        while history.len() > engine.views().options.history.max(1) {
            history.pop_front();
        }
    }
    let changes = &engine.views().changes;
    let _ = changes.send(change);
    m.view_changes_queued.set(changes.len() as i64);
    applied.diff
}

fn update_gauges(engine: &Engine, run: &Running) {
    let state = run.shared.state.read();
    let bytes = state.output.state_bytes() + state.node.as_ref().map_or(0, Node::state_bytes);
    run.shared.state_bytes.store(bytes, Ordering::Relaxed);
    let label = ViewLabel {
        view: run.shared.name.clone(),
    };
    let m = engine.metrics();
    m.view_rows
        .get_or_create(&label)
        .set(state.output.len() as i64);
    m.view_state_bytes.get_or_create(&label).set(bytes as i64);
}

/// A view's (empty) rows. When its operators can list them from their own state,
/// checkpoints do not hold them, and with a key neither does the view: a `DISTINCT ON`
/// view's rows would otherwise be held twice, in the operator and in the view.
fn new_output(schema: &SchemaRef, node: Option<&plan::Node>) -> Result<Output, QueryError> {
    let key = node.and_then(|n| n.key.clone());
    let mode = match node {
        Some(n) if n.can_emit_all() && key.is_some() => Rows::Derived,
        Some(n) if n.can_emit_all() => Rows::Rebuilt,
        _ => Rows::Saved,
    };
    Ok(Output::new(Arc::clone(schema), key, mode)?)
}

/// Every table a plan reads.
fn collect_tables(plan: &datafusion::logical_expr::LogicalPlan, out: &mut Vec<String>) {
    let _ = plan.apply_with_subqueries(|p| {
        if let datafusion::logical_expr::LogicalPlan::TableScan(s) = p {
            let name = s.table_name.table().to_owned();
            if !out.contains(&name) {
                out.push(name);
            }
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
}

/// Reads a stream as it is now, batch by batch; returns the WAL position read up to.
async fn scan_stream(
    engine: &Engine,
    stream: &str,
    feed: &mut dyn FnMut(RecordBatch) -> datafusion::common::Result<()>,
) -> Result<u64, QueryError> {
    let (provider, position) = engine
        .stream_provider_at_position(stream)
        .ok_or_else(|| QueryError::Invalid(format!("stream '{stream}' does not exist")))??;
    let session = engine.view_planner();
    let mut batches = session.scan(provider).await?;
    while let Some(batch) = batches.next().await {
        feed(batch?)?;
    }
    Ok(position)
}

/// Runs a view's SQL as a query; one batch of all rows.
fn run_query(engine: &Engine, sql: &str) -> datafusion::common::Result<RecordBatch> {
    let session = engine.query_session();
    let sql = sql.to_owned();
    engine.query_runtime().block_on(async move {
        let plan = match session.prepare(&sql, &[]).await {
            Ok(crate::query::Prepared::Query(p)) => *p,
            Ok(_) => return Err(DataFusionError::Plan("a view must be a query".into())),
            Err(e) => return Err(DataFusionError::Plan(e.to_string())),
        };
        let schema: SchemaRef = Arc::clone(plan.schema().inner());
        let mut stream = session
            .execute(plan)
            .await
            .map_err(|e| DataFusionError::Execution(e.to_string()))?;
        let mut parts = Vec::new();
        while let Some(b) = stream.next().await {
            parts.push(b?);
        }
        let schema = parts.first().map_or(schema, |b| b.schema());
        Ok(arrow::compute::concat_batches(&schema, &parts)?)
    })
}

#[cfg(test)]
mod tests;
