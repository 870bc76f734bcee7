//! The engine: streams, their live buffers and tables, the WAL, and the background work
//! that moves events from one to the other.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, Date32Array, TimestampMicrosecondArray};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;
use tracing::{Instrument, error, info, info_span, warn};

use crate::admission::Admission;
use crate::buffer::LiveBuffer;
use crate::catalog::Document;
use crate::idempotency::{Idempotency, KeyState};
use crate::metrics::{EngineMetrics, stream_label};
use crate::query::{QueryOptions, QueryRuntime, QuerySession, ReadSnapshot, TableSource};
use crate::results::ResultTables;
use crate::schema::{ColumnDef, EVENT_TIME_COLUMN, Rule, StreamSchema};
use crate::store::Store;
use crate::table::{StreamTable, TableAt, TableOptions};
use crate::views::{Host, ViewFeed, ViewHost, ViewOptions, Views, WeakHost};
use crate::wal::{DurableSink, Wal, WalAppend, WalOptions, WalRecord};
use crate::{Error, Result};

const MICROS_PER_DAY: i64 = 86_400_000_000;

type ProviderRef = Arc<dyn datafusion::catalog::TableProvider>;

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Store location (`file://…`, `s3://…`, `memory://`).
    pub store: String,
    /// Local folder of the write-ahead log.
    pub wal_dir: PathBuf,
    /// WAL tuning.
    pub wal: WalOptions,
    /// Flush a stream once its buffer holds this many bytes.
    pub flush_bytes: usize,
    /// Flush a stream once its oldest buffered event is this old.
    pub flush_interval: Duration,
    /// Bound on what all buffers together hold; a write past it waits for room.
    pub max_buffer_bytes: usize,
    /// Longest a write waits for buffer room before it is refused (503); zero refuses
    /// at once.
    pub ingest_max_wait: Duration,
    /// How often tables are compacted, checkpointed and vacuumed (zero: never).
    pub upkeep_interval: Duration,
    /// Table upkeep settings.
    pub table: TableOptions,
    /// How long idempotency keys are remembered.
    pub idempotency_ttl: Duration,
    /// Query limits and parallelism.
    pub query: QueryOptions,
    /// How stale a table's published state may get before it is reloaded to pick up
    /// other writers' commits (zero: never).
    pub table_refresh_interval: Duration,
    /// Materialized views: definitions loaded at start, maintenance intervals.
    pub views: ViewOptions,
    /// Alert rules: notifications kept, delivery timeouts and retries, SMTP relay.
    pub alerts: crate::alerts::AlertOptions,
}

impl EngineConfig {
    /// Defaults for a store, with the WAL in `wal_dir`.
    pub fn new(store: impl Into<String>, wal_dir: impl Into<PathBuf>) -> Self {
        Self {
            store: store.into(),
            wal_dir: wal_dir.into(),
            wal: WalOptions::default(),
            flush_bytes: 64 << 20,
            flush_interval: Duration::from_secs(10),
            max_buffer_bytes: 256 << 20,
            ingest_max_wait: Duration::from_secs(5),
            upkeep_interval: Duration::from_secs(600),
            table: TableOptions::default(),
            idempotency_ttl: Duration::from_secs(24 * 3600),
            query: QueryOptions::default(),
            table_refresh_interval: Duration::from_secs(2),
            views: ViewOptions::default(),
            alerts: crate::alerts::AlertOptions::default(),
        }
    }
}

/// What an ingest call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestOutcome {
    /// The events are durable; this many were accepted.
    Accepted(u64),
    /// A request with the same idempotency key already stored this many; nothing new stored.
    Replayed(u64),
}

/// A request's idempotency key and body fingerprint.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    /// The `Idempotency-Key` header value.
    pub key: String,
    /// Hash of the request body.
    pub fingerprint: String,
}

/// A summary of one stream.
#[derive(Debug, Clone)]
pub struct StreamInfo {
    /// Schema.
    pub schema: StreamSchema,
    /// Events held in the live buffer.
    pub buffered_events: usize,
    /// Delta table version.
    pub table_version: Option<u64>,
    /// Events in the Delta table.
    pub stored_events: u64,
    /// Active data files in the Delta table.
    pub files: u64,
    /// Table URL.
    pub table_url: String,
}

#[derive(Debug)]
struct StreamState {
    schema: StreamSchema,
    table: StreamTable,
    buffer: Mutex<LiveBuffer>,
    flush_lock: tokio::sync::Mutex<()>,
}

impl StreamState {
    fn new(schema: StreamSchema, table: StreamTable) -> Arc<Self> {
        Arc::new(Self {
            schema,
            table,
            buffer: Mutex::new(LiveBuffer::default()),
            flush_lock: tokio::sync::Mutex::new(()),
        })
    }
}

#[derive(Debug)]
struct Shared {
    streams: RwLock<BTreeMap<String, Arc<StreamState>>>,
    metrics: Arc<EngineMetrics>,
    idempotency: Idempotency,
    admission: Admission,
    feed: Arc<ViewFeed>,
}

impl Shared {
    fn buffer_batch(&self, stream: &str, seq: u64, batch: RecordBatch, bytes: usize) {
        let state = self.streams.read().get(stream).cloned();
        let Some(state) = state else {
            warn!(
                stream,
                seq, "WAL record for a stream that no longer exists; skipped"
            );
            return;
        };
        if seq <= state.table.committed_seq() {
            return;
        }
        let (total, rows) = {
            let mut buf = state.buffer.lock();
            buf.push(seq, batch, bytes);
            (buf.bytes(), buf.rows())
        };
        self.admission.add(bytes);
        let label = stream_label(stream);
        self.metrics
            .buffer_bytes
            .get_or_create(&label)
            .set(total as i64);
        self.metrics
            .buffer_events
            .get_or_create(&label)
            .set(rows as i64);
    }
}

impl DurableSink for Shared {
    fn on_durable(&self, records: &[WalRecord], batches: Vec<RecordBatch>) {
        for (record, batch) in records.iter().zip(batches) {
            let rows = batch.num_rows() as u64;
            self.buffer_batch(&record.stream, record.seq, batch.clone(), record.data.len());
            // After the buffer: a view filled from a snapshot never misses a record the
            // maintainer has not seen yet.
            self.feed.push(record.seq, &record.stream, batch);
            if let Some(key) = &record.idempotency_key {
                self.idempotency
                    .complete(&record.stream, key, &record.fingerprint, rows);
            }
        }
    }
}

/// The engine handle; cheap to clone.
#[derive(Debug, Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// An engine handle that does not keep the engine alive (for its own threads).
#[derive(Debug, Clone)]
pub(crate) struct WeakEngine(std::sync::Weak<Inner>);

impl WeakEngine {
    pub(crate) fn upgrade(&self) -> Option<Engine> {
        self.0.upgrade().map(|inner| Engine { inner })
    }
}

#[derive(Debug)]
struct Inner {
    config: EngineConfig,
    store: Store,
    shared: Arc<Shared>,
    wal: Wal,
    accepting: AtomicBool,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    query: QueryRuntime,
    app_id: String,
    /// This node's identity (see [`node_id`]).
    node_id: String,
    /// Serialises stream creation, so the saved definitions never lose one.
    ddl_lock: tokio::sync::Mutex<()>,
    views: Views,
    /// Tables batch jobs write whole (see [`crate::results`]).
    results: ResultTables,
    results_refreshed: parking_lot::Mutex<Instant>,
    /// Alert rules over the views.
    alerts: Arc<crate::alerts::Alerts>,
    /// Who changed what.
    activity: crate::activity::Activity,
}

/// Where an earlier release kept user-declared streams (read once, into the catalog).
const STREAMS_FILE: &str = "_quiver/streams.json";

impl Engine {
    /// Opens the store and the built-in streams, replays the WAL, and starts the flush
    /// and upkeep tasks. Returns once recovery is complete.
    pub async fn open(config: EngineConfig, metrics: Arc<EngineMetrics>) -> Result<Self> {
        let started = Instant::now();
        let store = Store::open(&config.store)?;
        std::fs::create_dir_all(&config.wal_dir)?;
        let node_id = node_id(&config.wal_dir)?;
        let app_id = format!("quiver-wal-{node_id}");
        let app_id_kept = app_id.clone();
        let idempotency = Idempotency::load(&config.wal_dir, config.idempotency_ttl, 1_000_000)?;

        let mut streams = BTreeMap::new();
        let mut max_committed = 0;
        let mut schemas = vec![StreamSchema::orders(), StreamSchema::inventory()];
        schemas.extend(
            load_stream_definitions(&Document::new(
                &store,
                "streams",
                Some(STREAMS_FILE),
                &node_id,
            ))
            .await?,
        );
        let query = QueryRuntime::new(config.query.clone())?;
        for schema in schemas {
            let table =
                StreamTable::open_or_create(&store, &schema, &app_id, config.table.clone()).await?;
            let committed = table.committed_seq();
            max_committed = max_committed.max(committed);
            info!(stream = schema.name(), committed_seq = committed, table = %table.url(), "stream opened");
            metrics.init_stream(schema.name());
            streams.insert(schema.name().to_owned(), StreamState::new(schema, table));
        }
        let shared = Arc::new(Shared {
            streams: RwLock::new(streams),
            metrics: Arc::clone(&metrics),
            idempotency,
            admission: Admission::new(config.max_buffer_bytes, config.ingest_max_wait),
            feed: Arc::new(ViewFeed::new()),
        });

        let (wal, replay) = Wal::open(
            &config.wal_dir,
            config.wal.clone(),
            max_committed + 1,
            Arc::clone(&shared) as Arc<dyn DurableSink>,
            Arc::clone(&metrics),
        )?;
        let mut replayed = 0u64;
        for record in &replay.records {
            let batch = decode_ipc(&record.data)?;
            shared.on_durable(std::slice::from_ref(record), vec![batch]);
            replayed += 1;
        }
        metrics.wal_replayed_records_total.inc_by(replayed);
        info!(
            records = replayed,
            truncations = replay.truncations,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "recovery finished"
        );

        let (stop, _) = watch::channel(false);
        let mut view_options = config.views.clone();
        if view_options.state_dir.is_none() {
            view_options.state_dir = Some(config.wal_dir.join("view-state"));
        }
        let alerts = Arc::new(crate::alerts::Alerts::new(
            config.alerts.clone(),
            &store,
            &node_id,
            Arc::clone(&metrics),
        ));
        if config.views.maintain {
            alerts.load().await?;
        }
        let store_for_activity = store.clone();
        let node_for_activity = node_id.clone();
        let feed = Arc::clone(&shared.feed);
        let engine = Self {
            inner: Arc::new(Inner {
                config,
                store,
                shared,
                wal,
                accepting: AtomicBool::new(true),
                stop,
                tasks: Mutex::new(Vec::new()),
                query,
                app_id: app_id_kept,
                node_id,
                ddl_lock: tokio::sync::Mutex::new(()),
                views: Views::new(view_options, feed),
                results: ResultTables::default(),
                results_refreshed: parking_lot::Mutex::new(Instant::now()),
                alerts,
                activity: crate::activity::Activity::new(&store_for_activity, &node_for_activity),
            }),
        };
        if let Err(e) = engine.refresh_results().await {
            warn!(error = %e, "cannot list the result tables");
        }
        engine.spawn_background();
        Views::start(&engine, Arc::new(engine.downgrade())).await?;
        // Read once, so the `activity` table shows what was recorded before a restart.
        let _ = engine.inner.activity.entries().await;
        if engine.inner.config.views.maintain {
            let tasks = engine
                .inner
                .alerts
                .start(&engine, engine.inner.stop.subscribe());
            engine.inner.tasks.lock().extend(tasks);
        }
        Ok(engine)
    }

    fn spawn_background(&self) {
        let flusher = {
            let engine = self.clone();
            let mut stop = self.inner.stop.subscribe();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            engine.flush_due().await;
                            engine.refresh_tables().await;
                        }
                        _ = stop.changed() => break,
                    }
                }
            })
        };
        let mut tasks = vec![flusher];
        if !self.inner.config.upkeep_interval.is_zero() {
            let engine = self.clone();
            let mut stop = self.inner.stop.subscribe();
            let every = self.inner.config.upkeep_interval;
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                loop {
                    tokio::select! {
                        _ = tick.tick() => engine.upkeep().await,
                        _ = stop.changed() => break,
                    }
                }
            }));
        }
        self.inner.tasks.lock().extend(tasks);
    }

    pub(crate) fn downgrade(&self) -> WeakEngine {
        WeakEngine(Arc::downgrade(&self.inner))
    }

    /// The alert rules: create, drop and list them, their notifications and silences.
    pub fn alerts(&self) -> &crate::alerts::Alerts {
        &self.inner.alerts
    }

    /// Who created, changed or dropped what.
    pub fn activity(&self) -> &crate::activity::Activity {
        &self.inner.activity
    }

    /// The materialized views: create, drop, read and follow them.
    pub fn views(&self) -> &Views {
        &self.inner.views
    }

    /// A stream as a table now, and the WAL position that table reflects: every event
    /// of the stream at or below it is in the table, none above it.
    pub(crate) fn stream_provider_at_position(
        &self,
        stream: &str,
    ) -> Option<std::result::Result<(ProviderRef, u64), crate::QueryError>> {
        let state = self.inner.shared.streams.read().get(stream).cloned()?;
        let buffered = state.buffer.lock().batches();
        let published = state.table.published();
        let mut position = published.committed_seq;
        let buffered: Vec<RecordBatch> = buffered
            .into_iter()
            .filter(|(seq, _)| *seq > published.committed_seq)
            .map(|(seq, b)| {
                position = position.max(seq);
                b
            })
            .collect();
        Some(
            crate::query::StreamProvider::live(published.table, buffered)
                .map(|p| {
                    (
                        Arc::new(p) as Arc<dyn datafusion::catalog::TableProvider>,
                        position,
                    )
                })
                .map_err(crate::QueryError::from),
        )
    }

    /// The engine's metrics.
    pub fn metrics(&self) -> &Arc<EngineMetrics> {
        &self.inner.shared.metrics
    }

    /// The store the tables live in.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Schema of a stream, if it exists.
    pub fn stream_schema(&self, name: &str) -> Option<StreamSchema> {
        self.inner
            .shared
            .streams
            .read()
            .get(name)
            .map(|s| s.schema.clone())
    }

    fn state(&self, stream: &str) -> Result<Arc<StreamState>> {
        self.inner
            .shared
            .streams
            .read()
            .get(stream)
            .cloned()
            .ok_or_else(|| Error::UnknownStream(stream.to_owned()))
    }

    /// Names of every stream, sorted.
    pub fn stream_names(&self) -> Vec<String> {
        self.inner.shared.streams.read().keys().cloned().collect()
    }

    /// What a query reads of `stream` now. The buffer is read before the published
    /// table state: a flush publishes its commit before it releases the buffer, so every
    /// acknowledged event is in exactly one of the two once the buffer is filtered by the
    /// state's committed position.
    pub(crate) fn read_snapshot(&self, stream: &str) -> Option<ReadSnapshot> {
        let state = self.inner.shared.streams.read().get(stream).cloned()?;
        let buffered = state.buffer.lock().batches();
        let published = state.table.published();
        let buffered = buffered
            .into_iter()
            .filter(|(seq, _)| *seq > published.committed_seq)
            .map(|(_, b)| b)
            .collect();
        Some(ReadSnapshot {
            table: published.table,
            buffered,
        })
    }

    /// What queries read of this engine (the query layer's narrow view of it).
    pub(crate) fn table_source(&self) -> Arc<dyn TableSource> {
        Arc::new(self.clone())
    }

    /// A fresh query session over every stream, under the configured limits.
    pub fn query_session(&self) -> QuerySession {
        QuerySession::new(
            self.table_source(),
            Arc::clone(self.metrics()),
            &self.inner.query,
        )
    }

    /// The runtime queries should execute on.
    pub fn query_runtime(&self) -> tokio::runtime::Handle {
        self.inner.query.handle()
    }

    /// This node's identity: what it writes to a shared store is keyed by it.
    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// The catalog's record of user-declared streams.
    fn streams_document(&self) -> Document<Vec<SavedStream>> {
        Document::new(
            &self.inner.store,
            "streams",
            Some(STREAMS_FILE),
            &self.inner.node_id,
        )
    }

    /// The catalog's record of view definitions.
    pub(crate) fn views_document(&self) -> Document<Vec<crate::views::SavedView>> {
        Document::new(
            &self.inner.store,
            "views",
            Some(crate::views::DEFINITIONS_FILE),
            &self.inner.node_id,
        )
    }

    /// Query limits in force.
    pub fn query_options(&self) -> &QueryOptions {
        self.inner.query.options()
    }

    /// Creates a stream (its Delta table and its saved definition). Returns false when
    /// a stream of that name exists and `if_not_exists` is set.
    pub async fn create_stream(&self, schema: StreamSchema, if_not_exists: bool) -> Result<bool> {
        let _ddl = self.inner.ddl_lock.lock().await;
        let name = schema.name().to_owned();
        if self.stream_schema(&name).is_some() {
            if if_not_exists {
                return Ok(false);
            }
            let builtin = matches!(name.as_str(), "orders" | "inventory");
            return Err(Error::AlreadyExists(format!(
                "stream '{name}' already exists{}",
                if builtin { " (it is built in)" } else { "" }
            )));
        }
        let table = StreamTable::open_or_create(
            &self.inner.store,
            &schema,
            &self.inner.app_id,
            self.inner.config.table.clone(),
        )
        .await?;
        let saved = SavedStream::of(&schema);
        self.streams_document()
            .update(|declared| {
                match declared.iter().find(|s| s.name == saved.name) {
                    // Another server on this store declared it the same way.
                    Some(s) if *s == saved => {}
                    Some(_) => {
                        return Err(Error::AlreadyExists(format!(
                            "stream '{name}' was declared with other columns by another server on this store"
                        )));
                    }
                    None => declared.push(saved.clone()),
                }
                Ok(())
            })
            .await?;
        self.inner
            .shared
            .streams
            .write()
            .insert(name.clone(), StreamState::new(schema, table));
        info!(stream = %name, "stream created");
        self.metrics().init_stream(&name);
        Ok(true)
    }

    /// Every stream with its state.
    pub async fn streams(&self) -> Vec<StreamInfo> {
        let states: Vec<Arc<StreamState>> =
            self.inner.shared.streams.read().values().cloned().collect();
        let mut out = Vec::with_capacity(states.len());
        for s in states {
            let buffered_events = s.buffer.lock().rows();
            let (table_version, stored_events, files) = s.table.stats().await;
            out.push(StreamInfo {
                schema: s.schema.clone(),
                buffered_events,
                table_version,
                stored_events,
                files,
                table_url: s.table.url().to_string(),
            });
        }
        out
    }

    /// Makes `batch` (in the stream's input schema) durable, then buffers it.
    ///
    /// Returns only after the WAL record is on disk. With a key, a retry of a request
    /// already stored returns [`IngestOutcome::Replayed`] and stores nothing.
    pub async fn ingest(
        &self,
        stream: &str,
        batch: RecordBatch,
        idempotency: Option<IdempotencyKey>,
    ) -> Result<IngestOutcome> {
        let state = self.state(stream)?;
        if !self.inner.accepting.load(Ordering::Acquire) {
            return Err(Error::Unavailable {
                reason: "the server is shutting down".into(),
                retry_after_secs: 5,
            });
        }
        if let Some(k) = &idempotency {
            match self
                .inner
                .shared
                .idempotency
                .begin(stream, &k.key, &k.fingerprint)
                .await
            {
                KeyState::New => {}
                KeyState::Done { accepted } => return Ok(IngestOutcome::Replayed(accepted)),
                KeyState::Conflict => return Err(Error::IdempotencyConflict(k.key.clone())),
            }
        }
        let result = self.append(&state, batch, idempotency.as_ref()).await;
        if result.is_err()
            && let Some(k) = &idempotency
        {
            self.inner.shared.idempotency.abandon(stream, &k.key);
        }
        result
    }

    async fn append(
        &self,
        state: &StreamState,
        batch: RecordBatch,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<IngestOutcome> {
        let stream = state.schema.name();
        let stored = with_partition_column(&state.schema, batch)?;
        let rows = stored.num_rows() as u64;
        let data = encode_ipc(&stored)?;
        match self.inner.shared.admission.admit(data.len()).await {
            Ok(waited) if !waited.is_zero() => {
                let m = self.metrics();
                m.ingest_waits_total.inc();
                m.ingest_wait_seconds.observe(waited.as_secs_f64());
            }
            Ok(_) => {}
            Err(refused) => {
                return Err(Error::Unavailable {
                    reason: format!(
                        "ingest buffers are full ({} bytes held) and flushing to storage \
                         would not free room within {:?}",
                        refused.held, self.inner.config.ingest_max_wait
                    ),
                    retry_after_secs: refused.retry_after_secs,
                });
            }
        }
        let seq = self
            .inner
            .wal
            .append(WalAppend {
                stream: stream.to_owned(),
                idempotency_key: idempotency.map(|k| k.key.clone()),
                fingerprint: idempotency
                    .map(|k| k.fingerprint.clone())
                    .unwrap_or_default(),
                data,
                batch: stored,
            })
            .await?;
        // Within the request's span: its request id, and the WAL record that holds the
        // events (the flush that stores them logs `wal_seq_through` at or past it).
        info!(stream, rows, wal_seq = seq, "events durable in the WAL");
        let label = stream_label(stream);
        self.metrics()
            .ingest_events_total
            .get_or_create(&label)
            .inc_by(rows);
        Ok(IngestOutcome::Accepted(rows))
    }

    /// Flushes every stream whose buffer is due by size or age, the streams at once.
    async fn flush_due(&self) {
        let states: Vec<Arc<StreamState>> =
            self.inner.shared.streams.read().values().cloned().collect();
        // One capped commit per due stream per round, round after round while any is
        // still due, so a busy stream cannot starve the others.
        loop {
            let due: Vec<&Arc<StreamState>> = states
                .iter()
                .filter(|state| {
                    let buf = state.buffer.lock();
                    buf.bytes() >= self.inner.config.flush_bytes
                        || buf
                            .oldest()
                            .is_some_and(|t| t.elapsed() >= self.inner.config.flush_interval)
                })
                .collect();
            if due.is_empty() {
                return;
            }
            let results =
                futures::future::join_all(due.iter().map(|state| self.flush_prefix(state))).await;
            let mut flushed_any = false;
            for (state, result) in due.iter().zip(results) {
                match result {
                    Ok(flushed) => flushed_any |= flushed,
                    Err(e) => {
                        error!(stream = state.schema.name(), error = %e, "flush failed; will retry");
                        return;
                    }
                }
            }
            if !flushed_any {
                return;
            }
        }
    }

    /// Reloads tables whose published state has grown stale, so queries see commits
    /// made by other writers.
    async fn refresh_tables(&self) {
        let every = self.inner.config.table_refresh_interval;
        if every.is_zero() {
            return;
        }
        let due = {
            let mut last = self.inner.results_refreshed.lock();
            let due = last.elapsed() >= every;
            if due {
                *last = Instant::now();
            }
            due
        };
        if due && let Err(e) = self.refresh_results().await {
            warn!(error = %e, "cannot list the result tables");
        }
        let states: Vec<Arc<StreamState>> =
            self.inner.shared.streams.read().values().cloned().collect();
        for state in states {
            if let Err(e) = state.table.refresh_if_older(every).await {
                warn!(stream = state.schema.name(), error = %e, "could not reload the table");
            }
        }
    }

    async fn refresh_results(&self) -> Result<()> {
        let streams: HashSet<String> = self.stream_names().into_iter().collect();
        self.inner
            .results
            .refresh(&self.inner.store, &streams)
            .await
    }

    /// Replaces every row of result table `name` (a batch job's output: forecasts,
    /// anomalies, …) by `batches` in one Delta commit, creating it if needed. Readers
    /// see the previous rows or the new ones, never a mix; older runs stay readable as
    /// Delta versions. Returns the new version.
    pub async fn replace_result_table(&self, name: &str, batches: Vec<RecordBatch>) -> Result<u64> {
        self.check_result_name(name)?;
        self.inner
            .results
            .replace(&self.inner.store, name, batches)
            .await
    }

    /// Adds rows to result table `name` in one commit (creating it on first use): for
    /// tables that keep a history, such as a job's run log. Returns the new version.
    pub async fn append_result_table(&self, name: &str, batches: Vec<RecordBatch>) -> Result<u64> {
        self.check_result_name(name)?;
        self.inner
            .results
            .append(&self.inner.store, name, batches)
            .await
    }

    fn check_result_name(&self, name: &str) -> Result<()> {
        if self.stream_schema(name).is_some() || self.views().view_info(name).is_some() {
            return Err(Error::Config(format!(
                "'{name}' is a stream or a view; a result table needs a name of its own"
            )));
        }
        Ok(())
    }

    /// The result tables, by name.
    pub fn result_tables(&self) -> Vec<String> {
        self.inner.results.names()
    }

    /// Flushes every stream now, whatever its size or age.
    pub async fn flush_all(&self) -> Result<()> {
        let states: Vec<Arc<StreamState>> =
            self.inner.shared.streams.read().values().cloned().collect();
        for state in states {
            self.flush_stream(&state).await?;
        }
        Ok(())
    }

    /// Flushes every event acknowledged before the call, and no more: under continuous
    /// ingest into a slow store, flushing until the buffers are empty might not end.
    pub async fn flush_acknowledged(&self) -> Result<()> {
        let states: Vec<Arc<StreamState>> =
            self.inner.shared.streams.read().values().cloned().collect();
        for state in states {
            let Some(through) = state.buffer.lock().newest_seq() else {
                continue;
            };
            // Each round commits the buffer's oldest prefix; done once the oldest
            // batch left is newer than the call.
            while state
                .buffer
                .lock()
                .oldest_seq()
                .is_some_and(|oldest| oldest <= through)
            {
                self.flush_prefix(&state).await?;
            }
        }
        Ok(())
    }

    /// Flushes the whole buffer of a stream, in commits of at most `flush_bytes` each.
    async fn flush_stream(&self, state: &StreamState) -> Result<()> {
        while self.flush_prefix(state).await? {}
        Ok(())
    }

    /// Commits the oldest `flush_bytes` of a stream's buffer; false when it was empty.
    async fn flush_prefix(&self, state: &StreamState) -> Result<bool> {
        let _guard = state.flush_lock.lock().await;
        let (batches, last_seq) = state.buffer.lock().prefix(self.inner.config.flush_bytes);
        let Some(last_seq) = last_seq else {
            return Ok(false);
        };
        let stream = state.schema.name();
        let label = stream_label(stream);
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        let started = Instant::now();
        let span = info_span!("flush", stream, rows, last_seq);
        let result = state.table.append(batches, last_seq).instrument(span).await;
        let m = self.metrics();
        match result {
            Ok(version) => {
                let elapsed = started.elapsed();
                m.flush_total.get_or_create(&label).inc();
                m.flush_events_total
                    .get_or_create(&label)
                    .inc_by(rows as u64);
                m.flush_seconds
                    .get_or_create(&label)
                    .observe(elapsed.as_secs_f64());
                let (freed, remaining_bytes, remaining_rows) = {
                    let mut buf = state.buffer.lock();
                    let (bytes, _) = buf.release_through(last_seq);
                    (bytes, buf.bytes(), buf.rows())
                };
                self.inner.shared.admission.release(freed, elapsed);
                m.buffer_bytes
                    .get_or_create(&label)
                    .set(remaining_bytes as i64);
                m.buffer_events
                    .get_or_create(&label)
                    .set(remaining_rows as i64);
                info!(
                    stream,
                    rows,
                    version,
                    wal_seq_through = last_seq,
                    elapsed_ms = elapsed.as_millis() as u64,
                    "flushed to Delta"
                );
                self.truncate_wal()?;
                Ok(true)
            }
            Err(e) => {
                m.flush_failures_total.get_or_create(&label).inc();
                Err(e)
            }
        }
    }

    /// Deletes WAL segments every table has committed and every checkpointed view has
    /// applied.
    pub(crate) fn truncate_wal(&self) -> Result<()> {
        // Until the views have come up, what they still need is unknown.
        let Some(floor) = self.inner.views.wal_floor() else {
            return Ok(());
        };
        let committed: HashMap<String, u64> = self
            .inner
            .shared
            .streams
            .read()
            .iter()
            .map(|(k, s)| {
                let c = s.table.committed_seq();
                (k.clone(), floor.get(k).map_or(c, |f| c.min(*f)))
            })
            .collect();
        // Keys must outlive the segments that carry them.
        let idempotency = &self.inner.shared.idempotency;
        let deleted = self
            .inner
            .wal
            .truncate(&committed, || idempotency.persist())?;
        self.metrics()
            .wal_segments_deleted_total
            .inc_by(deleted as u64);
        Ok(())
    }

    /// Runs compaction, checkpoint and vacuum on every table.
    pub async fn upkeep(&self) {
        let states: Vec<Arc<StreamState>> =
            self.inner.shared.streams.read().values().cloned().collect();
        for state in states {
            let label = stream_label(state.schema.name());
            match state.table.upkeep().await {
                Ok(report) => {
                    let m = self.metrics();
                    if report.files_added > 0 {
                        m.compactions_total.get_or_create(&label).inc();
                    }
                    if report.checkpointed {
                        m.checkpoints_total.get_or_create(&label).inc();
                    }
                    m.vacuumed_files_total
                        .get_or_create(&label)
                        .inc_by(report.files_vacuumed);
                }
                Err(e) => {
                    error!(stream = state.schema.name(), error = %e, "table upkeep failed");
                }
            }
        }
    }

    /// Stops taking writes, flushes every buffer and stops background work.
    pub async fn shutdown(&self) -> Result<()> {
        self.inner.accepting.store(false, Ordering::Release);
        let _ = self.inner.stop.send(true);
        let tasks: Vec<_> = self.inner.tasks.lock().drain(..).collect();
        for t in tasks {
            let _ = t.await;
        }
        self.flush_all().await?;
        self.views().stop().await;
        info!("engine stopped; all buffered events are in Delta, views checkpointed");
        Ok(())
    }

    /// Stops every background task and the views without flushing or checkpointing,
    /// as a killed process would; the WAL is all that survives.
    #[cfg(test)]
    pub(crate) fn crash_for_tests(&self) {
        self.inner.accepting.store(false, Ordering::Release);
        let _ = self.inner.stop.send(true);
        for t in self.inner.tasks.lock().drain(..) {
            t.abort();
        }
        self.views().abandon();
    }

    /// Refuses new writes from now on (they get 503); what is in flight completes.
    pub fn stop_accepting(&self) {
        self.inner.accepting.store(false, Ordering::Release);
    }

    /// Whether writes are being accepted.
    pub fn is_accepting(&self) -> bool {
        self.inner.accepting.load(Ordering::Acquire)
    }

    /// Number of WAL segment files (for tests and metrics).
    pub fn wal_segments(&self) -> usize {
        self.inner.wal.segment_count()
    }
}

/// Reads the user-declared streams saved in the catalog.
async fn load_stream_definitions(
    streams: &Document<Vec<SavedStream>>,
) -> Result<Vec<StreamSchema>> {
    let saved = streams.read().await?;
    saved
        .into_iter()
        .map(|s| {
            let columns = s
                .columns
                .into_iter()
                .map(|c| {
                    let ty = crate::query::column_type(&c.ty).ok_or_else(|| {
                        Error::Config(format!(
                            "the catalog's stream '{}' column '{}' has unknown type '{}'",
                            s.name, c.name, c.ty
                        ))
                    })?;
                    Ok(ColumnDef {
                        name: c.name,
                        ty,
                        required: c.required,
                        rule: Rule::None,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            StreamSchema::try_new(&s.name, columns)
        })
        .collect()
}

/// A declared stream as the catalog keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct SavedStream {
    name: String,
    columns: Vec<SavedColumn>,
}

impl SavedStream {
    fn of(schema: &StreamSchema) -> Self {
        Self {
            name: schema.name().to_owned(),
            columns: schema
                .columns()
                .iter()
                .map(|c| SavedColumn {
                    name: c.name.clone(),
                    ty: c.ty.sql_name().to_owned(),
                    required: c.required,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct SavedColumn {
    name: String,
    #[serde(rename = "type")]
    ty: String,
    required: bool,
}

/// Returns this node's identity, kept beside its WAL (`wal.id`) and created on first
/// use. It names what belongs to this node's log in the shared store: the Delta `txn`
/// positions (`quiver-wal-<id>`) and the view checkpoints (`_quiver/nodes/<id>/`).
pub fn node_id(dir: &std::path::Path) -> Result<String> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("wal.id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        Ok(_) | Err(_) => {
            let id = hex::encode(rand::random::<[u8; 8]>());
            crate::durable_file::write_atomic(&path, id.as_bytes())?;
            Ok(id)
        }
    }
}

/// Adds the `event_date` partition column derived from `event_time`.
fn with_partition_column(schema: &StreamSchema, batch: RecordBatch) -> Result<RecordBatch> {
    let mismatch = |message: String| Error::SchemaMismatch {
        stream: schema.name().to_owned(),
        message,
    };
    if batch.schema().fields() != schema.input_schema().fields() {
        return Err(mismatch(format!(
            "expected columns {:?}, got {:?}",
            schema.input_schema(),
            batch.schema()
        )));
    }
    let times = batch
        .column_by_name(EVENT_TIME_COLUMN)
        .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>())
        .ok_or_else(|| mismatch("event_time is not a microsecond timestamp".into()))?;
    let dates: Date32Array = times
        .iter()
        .map(|t| t.map(|us| us.div_euclid(MICROS_PER_DAY) as i32))
        .collect();
    if dates.null_count() > 0 {
        return Err(mismatch("event_time has nulls".into()));
    }
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    columns.push(Arc::new(dates));
    Ok(RecordBatch::try_new(
        Arc::clone(schema.stored_schema()),
        columns,
    )?)
}

fn encode_ipc(batch: &RecordBatch) -> Result<Bytes> {
    let mut buf = Vec::with_capacity(batch.get_array_memory_size() + 1024);
    {
        let mut w = StreamWriter::try_new(&mut buf, &batch.schema())?;
        w.write(batch)?;
        w.finish()?;
    }
    Ok(Bytes::from(buf))
}

fn decode_ipc(data: &[u8]) -> Result<RecordBatch> {
    let reader = StreamReader::try_new(std::io::Cursor::new(data), None)?;
    let schema = reader.schema();
    let batches = reader.collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(arrow::compute::concat_batches(&schema, &batches)?)
}

#[cfg(test)]
mod tests;

impl WeakHost for WeakEngine {
    fn upgrade(&self) -> Option<Host> {
        WeakEngine::upgrade(self).map(|e| Arc::new(e) as Host)
    }
}

impl ViewHost for Engine {
    fn views(&self) -> &Views {
        Engine::views(self)
    }

    fn stream_schema(&self, name: &str) -> Option<StreamSchema> {
        Engine::stream_schema(self, name)
    }

    fn stream_provider_at_position(
        &self,
        stream: &str,
    ) -> Option<std::result::Result<(ProviderRef, u64), crate::QueryError>> {
        Engine::stream_provider_at_position(self, stream)
    }

    fn view_planner(&self) -> QuerySession {
        QuerySession::for_views(
            self.table_source(),
            Arc::clone(self.metrics()),
            &self.inner.query,
        )
    }

    fn query_session(&self) -> QuerySession {
        Engine::query_session(self)
    }

    fn query_runtime(&self) -> tokio::runtime::Handle {
        Engine::query_runtime(self)
    }

    fn node_id(&self) -> &str {
        Engine::node_id(self)
    }

    fn store(&self) -> &Store {
        Engine::store(self)
    }

    fn metrics(&self) -> &Arc<EngineMetrics> {
        Engine::metrics(self)
    }

    fn views_document(&self) -> Document<Vec<crate::views::SavedView>> {
        Engine::views_document(self)
    }

    fn truncate_wal(&self) -> Result<()> {
        Engine::truncate_wal(self)
    }
}

#[async_trait::async_trait]
impl TableSource for Engine {
    fn stream_names(&self) -> Vec<String> {
        Engine::stream_names(self)
    }

    fn view_names(&self) -> Vec<String> {
        self.views().names()
    }

    fn stream_schema(&self, name: &str) -> Option<StreamSchema> {
        Engine::stream_schema(self, name)
    }

    fn read_snapshot(&self, stream: &str) -> Option<ReadSnapshot> {
        Engine::read_snapshot(self, stream)
    }

    fn view(&self, name: &str) -> Option<Arc<crate::views::ViewShared>> {
        self.views().get(name)
    }

    fn result_names(&self) -> Vec<String> {
        self.inner.results.names()
    }

    fn result_table(&self, name: &str) -> Option<deltalake::DeltaTable> {
        self.inner.results.get(name)
    }

    fn system_names(&self) -> Vec<String> {
        crate::query::SYSTEM_TABLES
            .iter()
            .map(|&n| n.to_owned())
            .collect()
    }

    fn system_table(&self, name: &str) -> Option<arrow::record_batch::RecordBatch> {
        match name {
            "alerts" => Some(self.inner.alerts.alerts_table()),
            "notifications" => Some(self.inner.alerts.notifications_table()),
            "activity" => Some(self.inner.activity.table()),
            _ => None,
        }
    }

    async fn historical_table(&self, name: &str, at: TableAt) -> Result<deltalake::DeltaTable> {
        if self.stream_schema(name).is_none() && self.inner.results.get(name).is_some() {
            let url = self.inner.store.table_url(name)?;
            return crate::table::load_at(&self.inner.store, &url, at).await;
        }
        self.state(name)?.table.historical(at).await
    }
}
