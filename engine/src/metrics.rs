//! Every Prometheus metric Quiver exports, registered in one place.
//!
//! Names follow `quiver_<subsystem>_<what>_<unit>`; counters end in `_total`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label set naming one stream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabel {
    /// Stream name.
    pub stream: String,
}

/// Label set for rejected ingest requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabel {
    /// Stream name as requested (may be unknown).
    pub stream: String,
    /// Short machine-readable reason (`invalid_rows`, `too_large`, ...).
    pub reason: String,
}

/// Label set for HTTP requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// Matched route template.
    pub route: String,
    /// Response status code.
    pub status: u16,
}

/// Label set for SQL statements, by outcome (`ok` or an error code).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `ok`, or the error code the statement got.
    pub outcome: String,
}

/// Label set naming one materialized view.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ViewLabel {
    /// View name.
    pub view: String,
}

/// Label set for alert transitions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertStateLabel {
    /// `firing` or `resolved`.
    pub state: String,
}

/// Label set for alert deliveries.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabel {
    /// `webhook` or `email`.
    pub kind: String,
    /// `delivered`, `failed` (to be retried) or `gave_up`.
    pub outcome: String,
}

/// Label set for view state: one view's, in memory or on disk.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ViewStateLabel {
    /// View name.
    pub view: String,
    /// `memory`, or `disk` (moved to the spill file past `--view-memory-limit`).
    pub tier: String,
}

/// Label set for view checkpoints.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckpointLabel {
    /// `full` (encoded by the maintainer), `delta`, or `compacted` (a chain folded
    /// into a new full checkpoint off the maintainer).
    pub kind: String,
}

/// A latency histogram: 50 µs .. ~6.5 s.
pub fn seconds_histogram() -> Histogram {
    // 50 µs .. ~6.5 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
}

/// All of Quiver's metrics.
#[derive(Debug)]
pub struct EngineMetrics {
    /// Events accepted (durable), by stream.
    pub ingest_events_total: Family<StreamLabel, Counter>,
    /// Request body bytes accepted, by stream.
    pub ingest_bytes_total: Family<StreamLabel, Counter>,
    /// Rejected ingest requests, by stream and reason.
    pub ingest_rejects_total: Family<RejectLabel, Counter>,
    /// Rows named as bad in rejected requests, by stream.
    pub ingest_rejected_rows_total: Family<StreamLabel, Counter>,
    /// Writes that waited for buffer room before they were admitted.
    pub ingest_waits_total: Counter,
    /// How long admitted writes waited for buffer room.
    pub ingest_wait_seconds: Histogram,
    /// Latency of a WAL group write plus fsync.
    pub wal_fsync_seconds: Histogram,
    /// Bytes written to the WAL.
    pub wal_bytes_total: Counter,
    /// WAL segments deleted after commits.
    pub wal_segments_deleted_total: Counter,
    /// Records replayed from the WAL at start.
    pub wal_replayed_records_total: Counter,
    /// Successful flushes of the live buffer into Delta, by stream.
    pub flush_total: Family<StreamLabel, Counter>,
    /// Failed flush attempts, by stream.
    pub flush_failures_total: Family<StreamLabel, Counter>,
    /// Events written by flushes, by stream.
    pub flush_events_total: Family<StreamLabel, Counter>,
    /// Duration of a flush (Parquet write plus Delta commit).
    pub flush_seconds: Family<StreamLabel, Histogram, fn() -> Histogram>,
    /// Bytes held in live buffers, by stream.
    pub buffer_bytes: Family<StreamLabel, Gauge>,
    /// Events held in live buffers, by stream.
    pub buffer_events: Family<StreamLabel, Gauge>,
    /// Compactions (Delta optimize) run, by stream.
    pub compactions_total: Family<StreamLabel, Counter>,
    /// Delta checkpoints written, by stream.
    pub checkpoints_total: Family<StreamLabel, Counter>,
    /// Files removed by vacuum, by stream.
    pub vacuumed_files_total: Family<StreamLabel, Counter>,
    /// HTTP request durations, by route and status.
    pub http_request_seconds: Family<RouteLabel, Histogram, fn() -> Histogram>,
    /// SQL statements by outcome.
    pub sql_queries_total: Family<OutcomeLabel, Counter>,
    /// Time from receiving a query to its last result byte.
    pub sql_query_seconds: Histogram,
    /// Queries running now (holding a slot).
    pub sql_active_queries: Gauge,
    /// Times a query operator spilled to disk over its memory limit.
    pub sql_spills_total: Counter,
    /// Bytes queries spilled to disk.
    pub sql_spilled_bytes_total: Counter,
    /// Time to apply one micro-batch of events to every view.
    pub view_batch_seconds: Histogram,
    /// Time to apply one micro-batch to one view, by view.
    pub view_apply_seconds: Family<ViewLabel, Histogram, fn() -> Histogram>,
    /// Time from the acknowledgement of an event to the view change it causes.
    pub view_freshness_seconds: Histogram,
    /// Change sets published, by view.
    pub view_changes_total: Family<ViewLabel, Counter>,
    /// Rows read to fill new views from existing data, by view.
    pub view_backfill_rows_total: Family<ViewLabel, Counter>,
    /// Rows held, by view.
    pub view_rows: Family<ViewLabel, Gauge>,
    /// Approximate bytes of state, by view.
    pub view_state_bytes: Family<ViewStateLabel, Gauge>,
    /// Entries of view state moved to disk, and rounds of moving them.
    pub view_state_evicted_total: Counter,
    /// How long a round of moving view state to disk held up view maintenance.
    pub view_state_evict_seconds: Histogram,
    /// Bytes the view state spill file takes on disk.
    pub view_state_file_bytes: Gauge,
    /// Duration of a view checkpoint.
    pub view_checkpoint_seconds: Histogram,
    /// The longest a view checkpoint held up view maintenance at once.
    pub view_checkpoint_pause_seconds: Histogram,
    /// Size of the last view checkpoint.
    pub view_checkpoint_bytes: Gauge,
    /// View checkpoints written, by kind.
    pub view_checkpoints_total: Family<CheckpointLabel, Counter>,
    /// View checkpoints that failed (they are retried at the next interval).
    pub view_checkpoint_failures_total: Counter,
    /// Change sets published and not yet taken by every subscriber of the change feed
    /// (push), as of the last one published.
    pub view_changes_queued: Gauge,
    /// Alert rules defined.
    pub alert_rules: Gauge,
    /// Alert transitions recorded, by state.
    pub alert_transitions_total: Family<AlertStateLabel, Counter>,
    /// Time to evaluate the rules on one change set.
    pub alert_eval_seconds: Histogram,
    /// Delivery attempts, by kind and outcome.
    pub alert_deliveries_total: Family<DeliveryLabel, Counter>,
    /// Duration of one delivery attempt.
    pub alert_delivery_seconds: Histogram,
    /// Deliveries waiting in the outbox (to be sent or retried).
    pub alert_outbox: Gauge,
}

impl EngineMetrics {
    /// Creates the metrics and registers each in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            ingest_events_total: Family::default(),
            ingest_bytes_total: Family::default(),
            ingest_rejects_total: Family::default(),
            ingest_rejected_rows_total: Family::default(),
            ingest_waits_total: Counter::default(),
            ingest_wait_seconds: seconds_histogram(),
            wal_fsync_seconds: seconds_histogram(),
            wal_bytes_total: Counter::default(),
            wal_segments_deleted_total: Counter::default(),
            wal_replayed_records_total: Counter::default(),
            flush_total: Family::default(),
            flush_failures_total: Family::default(),
            flush_events_total: Family::default(),
            flush_seconds: Family::new_with_constructor(seconds_histogram),
            buffer_bytes: Family::default(),
            buffer_events: Family::default(),
            compactions_total: Family::default(),
            checkpoints_total: Family::default(),
            vacuumed_files_total: Family::default(),
            http_request_seconds: Family::new_with_constructor(seconds_histogram),
            sql_queries_total: Family::default(),
            sql_query_seconds: seconds_histogram(),
            sql_active_queries: Gauge::default(),
            sql_spills_total: Counter::default(),
            sql_spilled_bytes_total: Counter::default(),
            view_batch_seconds: seconds_histogram(),
            view_apply_seconds: Family::new_with_constructor(seconds_histogram),
            view_freshness_seconds: seconds_histogram(),
            view_changes_total: Family::default(),
            view_backfill_rows_total: Family::default(),
            view_rows: Family::default(),
            view_state_bytes: Family::default(),
            view_state_evicted_total: Counter::default(),
            view_state_evict_seconds: seconds_histogram(),
            view_state_file_bytes: Gauge::default(),
            view_checkpoint_seconds: seconds_histogram(),
            view_checkpoint_pause_seconds: seconds_histogram(),
            view_checkpoint_bytes: Gauge::default(),
            view_checkpoints_total: Family::default(),
            view_checkpoint_failures_total: Counter::default(),
            view_changes_queued: Gauge::default(),
            alert_rules: Gauge::default(),
            alert_transitions_total: Family::default(),
            alert_eval_seconds: seconds_histogram(),
            alert_deliveries_total: Family::default(),
            alert_delivery_seconds: seconds_histogram(),
            alert_outbox: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("quiver");
        r.register(
            "ingest_events",
            "Events accepted and durable",
            m.ingest_events_total.clone(),
        );
        r.register(
            "ingest_bytes",
            "Request body bytes accepted",
            m.ingest_bytes_total.clone(),
        );
        r.register(
            "ingest_waits",
            "Writes that waited for buffer room before they were admitted",
            m.ingest_waits_total.clone(),
        );
        r.register(
            "ingest_wait_seconds",
            "How long admitted writes waited for buffer room",
            m.ingest_wait_seconds.clone(),
        );
        r.register(
            "ingest_rejects",
            "Rejected ingest requests by reason",
            m.ingest_rejects_total.clone(),
        );
        r.register(
            "ingest_rejected_rows",
            "Bad rows named in rejected requests",
            m.ingest_rejected_rows_total.clone(),
        );
        r.register(
            "wal_fsync_seconds",
            "WAL group write and fsync latency",
            m.wal_fsync_seconds.clone(),
        );
        r.register(
            "wal_bytes",
            "Bytes written to the WAL",
            m.wal_bytes_total.clone(),
        );
        r.register(
            "wal_segments_deleted",
            "WAL segments deleted after commit",
            m.wal_segments_deleted_total.clone(),
        );
        r.register(
            "wal_replayed_records",
            "WAL records replayed at start",
            m.wal_replayed_records_total.clone(),
        );
        r.register(
            "flush",
            "Flushes of live buffers into Delta",
            m.flush_total.clone(),
        );
        r.register(
            "flush_failures",
            "Failed flush attempts",
            m.flush_failures_total.clone(),
        );
        r.register(
            "flush_events",
            "Events written to Delta by flushes",
            m.flush_events_total.clone(),
        );
        r.register(
            "flush_seconds",
            "Flush duration (Parquet write and Delta commit)",
            m.flush_seconds.clone(),
        );
        r.register(
            "buffer_bytes",
            "Bytes held in live buffers",
            m.buffer_bytes.clone(),
        );
        r.register(
            "buffer_events",
            "Events held in live buffers",
            m.buffer_events.clone(),
        );
        r.register(
            "table_compactions",
            "Delta optimize runs",
            m.compactions_total.clone(),
        );
        r.register(
            "table_checkpoints",
            "Delta checkpoints written",
            m.checkpoints_total.clone(),
        );
        r.register(
            "table_vacuumed_files",
            "Files removed by vacuum",
            m.vacuumed_files_total.clone(),
        );
        r.register(
            "http_request_seconds",
            "HTTP request duration",
            m.http_request_seconds.clone(),
        );
        r.register(
            "sql_queries",
            "SQL statements by outcome",
            m.sql_queries_total.clone(),
        );
        r.register(
            "sql_query_seconds",
            "SQL query duration, result delivery included",
            m.sql_query_seconds.clone(),
        );
        r.register(
            "sql_active_queries",
            "Queries running now",
            m.sql_active_queries.clone(),
        );
        r.register(
            "sql_spills",
            "Times a query operator spilled to disk over its memory limit",
            m.sql_spills_total.clone(),
        );
        r.register(
            "sql_spilled_bytes",
            "Bytes queries spilled to disk",
            m.sql_spilled_bytes_total.clone(),
        );
        r.register(
            "view_batch_seconds",
            "Time to apply one micro-batch of events to every view",
            m.view_batch_seconds.clone(),
        );
        r.register(
            "view_apply_seconds",
            "Time to apply one micro-batch to one view",
            m.view_apply_seconds.clone(),
        );
        r.register(
            "view_freshness_seconds",
            "Event acknowledgement to the view change it causes",
            m.view_freshness_seconds.clone(),
        );
        r.register(
            "view_changes",
            "Change sets published",
            m.view_changes_total.clone(),
        );
        r.register(
            "view_backfill_rows",
            "Rows read to fill new views from existing data",
            m.view_backfill_rows_total.clone(),
        );
        r.register("view_rows", "Rows held by a view", m.view_rows.clone());
        r.register(
            "view_state_bytes",
            "Approximate bytes of view state, by view and tier (memory, or disk past --view-memory-limit)",
            m.view_state_bytes.clone(),
        );
        r.register(
            "view_state_evicted",
            "Entries of view operator state moved to disk",
            m.view_state_evicted_total.clone(),
        );
        r.register(
            "view_state_evict_seconds",
            "How long a round of moving view state to disk held up view maintenance",
            m.view_state_evict_seconds.clone(),
        );
        r.register(
            "view_state_file_bytes",
            "Bytes the view state spill file takes on disk",
            m.view_state_file_bytes.clone(),
        );
        r.register(
            "view_checkpoint_seconds",
            "Duration of a view checkpoint",
            m.view_checkpoint_seconds.clone(),
        );
        r.register(
            "view_checkpoint_pause_seconds",
            "The longest a view checkpoint held up view maintenance at once (it is encoded in slices between batches; the write to the store runs beside them)",
            m.view_checkpoint_pause_seconds.clone(),
        );
        r.register(
            "view_checkpoint_bytes",
            "Size of the last view checkpoint",
            m.view_checkpoint_bytes.clone(),
        );
        r.register(
            "view_checkpoints",
            "View checkpoints written, by kind: full (encoded by the maintainer), delta, compacted (off the maintainer)",
            m.view_checkpoints_total.clone(),
        );
        r.register(
            "view_checkpoint_failures",
            "View checkpoints that failed to be encoded or stored (retried at the next interval)",
            m.view_checkpoint_failures_total.clone(),
        );
        r.register(
            "view_changes_queued",
            "Change sets published and not yet taken by every reader of the change feed (push), as of the last one",
            m.view_changes_queued.clone(),
        );
        r.register("alert_rules", "Alert rules defined", m.alert_rules.clone());
        r.register(
            "alert_transitions",
            "Alert transitions recorded (firing, resolved)",
            m.alert_transitions_total.clone(),
        );
        r.register(
            "alert_eval_seconds",
            "Time to evaluate the alert rules on one view change set",
            m.alert_eval_seconds.clone(),
        );
        r.register(
            "alert_deliveries",
            "Alert delivery attempts by kind (webhook, email) and outcome (delivered, failed, gave_up)",
            m.alert_deliveries_total.clone(),
        );
        r.register(
            "alert_delivery_seconds",
            "Duration of one alert delivery attempt",
            m.alert_delivery_seconds.clone(),
        );
        r.register(
            "alert_outbox",
            "Alert deliveries waiting to be sent or retried",
            m.alert_outbox.clone(),
        );
        // The outcomes the query alert watches start at zero (see `init_stream`).
        for outcome in ["ok", "query_timeout"] {
            let _ = m.sql_queries_total.get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            });
        }
        m
    }

    /// Metrics not attached to any registry (tests, tools).
    pub fn unregistered() -> Self {
        Self::new(&mut Registry::default())
    }

    /// Makes a stream's series exist at zero from the moment it opens. A counter that
    /// first appears at 1 hides its first increase from `increase()` and `rate()`, so
    /// an alert on the first flush failure or refusal would never fire.
    pub fn init_stream(&self, stream: &str) {
        let label = stream_label(stream);
        for family in [
            &self.ingest_events_total,
            &self.ingest_bytes_total,
            &self.ingest_rejected_rows_total,
            &self.flush_total,
            &self.flush_failures_total,
            &self.flush_events_total,
            &self.compactions_total,
            &self.checkpoints_total,
            &self.vacuumed_files_total,
        ] {
            let _ = family.get_or_create(&label);
        }
        let _ = self.buffer_bytes.get_or_create(&label);
        let _ = self.buffer_events.get_or_create(&label);
        let _ = self.flush_seconds.get_or_create(&label);
        // The refusals the availability alert watches.
        for reason in ["unavailable", "internal"] {
            let _ = self.ingest_rejects_total.get_or_create(&RejectLabel {
                stream: stream.to_owned(),
                reason: reason.to_owned(),
            });
        }
    }
}

/// Shorthand for a stream label.
pub fn stream_label(stream: &str) -> StreamLabel {
    StreamLabel {
        stream: stream.to_owned(),
    }
}

/// The resident set size of process `pid` in bytes, from `/proc` (Linux; `None`
/// elsewhere or when the process is gone).
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}
