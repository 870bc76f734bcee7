//! Settings of `quiver serve`: every flag is also a `QUIVER_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

/// Server settings.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Where tables live: a folder, file://PATH, s3://BUCKET/PREFIX or memory://.
    #[arg(long, env = "QUIVER_STORE", default_value = "file://./quiver-data")]
    pub store: String,

    /// Folder of the write-ahead log (must be a local disk). Default: `wal` inside a
    /// local store, else ./quiver-wal.
    #[arg(long, env = "QUIVER_WAL_DIR")]
    pub wal_dir: Option<PathBuf>,

    /// HTTP listen address.
    #[arg(long, env = "QUIVER_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,

    /// Postgres wire protocol listen address (`off` to disable).
    #[arg(long, env = "QUIVER_PG_ADDR", default_value = "127.0.0.1:5433")]
    pub pg_addr: Listen,

    /// PEM certificate chain for Postgres TLS (with --pg-tls-key); clients may then
    /// ask for `sslmode=require`.
    #[arg(long, env = "QUIVER_PG_TLS_CERT", requires = "pg_tls_key")]
    pub pg_tls_cert: Option<PathBuf>,

    /// PEM private key for Postgres TLS.
    #[arg(long, env = "QUIVER_PG_TLS_KEY", requires = "pg_tls_cert")]
    pub pg_tls_key: Option<PathBuf>,

    /// PEM certificate chain for HTTPS/WSS and Flight SQL over TLS (with --tls-key).
    /// Also used for Postgres when --pg-tls-cert is not given. Reloaded on SIGHUP.
    #[arg(long, env = "QUIVER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "QUIVER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Origins allowed to call the API from a browser (CORS), repeatable or
    /// comma-separated; `*` for any. Off by default: only the dashboard's own origin.
    #[arg(
        long = "cors-origin",
        env = "QUIVER_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,

    /// HTTP requests per second allowed per token (per client address for requests
    /// without a token), on every endpoint but /health and /ready; past it, 429 with
    /// `Retry-After`. Every limited answer carries `RateLimit-*` headers. 0: unlimited.
    #[arg(long, env = "QUIVER_RATE_LIMIT", default_value_t = 0)]
    pub rate_limit: u32,

    /// Requests a client may send at once above --rate-limit (default: one second's worth).
    #[arg(long, env = "QUIVER_RATE_LIMIT_BURST", default_value_t = 0)]
    pub rate_limit_burst: u32,

    /// Arrow Flight SQL listen address (`off` to disable).
    #[arg(long, env = "QUIVER_FLIGHT_ADDR", default_value = "127.0.0.1:50051")]
    pub flight_addr: Listen,

    /// Largest accepted request body.
    #[arg(long, env = "QUIVER_MAX_BODY_BYTES", default_value_t = 64 << 20)]
    pub max_body_bytes: usize,

    /// Flush a stream's buffer to Delta once it holds this many bytes.
    #[arg(long, env = "QUIVER_FLUSH_BYTES", default_value_t = 64 << 20)]
    pub flush_bytes: usize,

    /// Flush a stream's buffer to Delta once its oldest event is this old.
    #[arg(long, env = "QUIVER_FLUSH_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub flush_interval: Duration,

    /// Bound on the bytes all live buffers hold together; a write past it waits for a
    /// flush to free room.
    #[arg(long, env = "QUIVER_MAX_BUFFER_BYTES", default_value_t = 256 << 20)]
    pub max_buffer_bytes: usize,

    /// Longest a write waits for buffer room; past it, or when flushing would not free
    /// room in time, it is refused with 503 and a `Retry-After` from the backlog
    /// (0s: refuse at once).
    #[arg(long, env = "QUIVER_INGEST_MAX_WAIT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub ingest_max_wait: Duration,

    /// WAL segment size.
    #[arg(long, env = "QUIVER_WAL_SEGMENT_BYTES", default_value_t = 64 << 20)]
    pub wal_segment_bytes: u64,

    /// Largest write-ahead log record: the events of one request, Arrow-encoded. A
    /// larger request is refused with 413 before anything is stored (at most 1 GiB).
    #[arg(long, env = "QUIVER_MAX_WAL_RECORD_BYTES", default_value_t = quiver_engine::wal::MAX_RECORD_LEN)]
    pub max_wal_record_bytes: usize,

    /// How often tables are compacted, checkpointed and vacuumed (0s: never).
    #[arg(long, env = "QUIVER_UPKEEP_INTERVAL", default_value = "10m", value_parser = humantime::parse_duration)]
    pub upkeep_interval: Duration,

    /// Parquet files one flush encodes at once, each on its own thread (default: the
    /// number of cores).
    #[arg(long, env = "QUIVER_FLUSH_PARALLELISM")]
    pub flush_parallelism: Option<usize>,

    /// Target size of compacted Parquet files.
    #[arg(long, env = "QUIVER_COMPACT_TARGET_BYTES", default_value_t = 128 << 20)]
    pub compact_target_bytes: u64,

    /// How long files replaced by compaction are kept before vacuum deletes them.
    #[arg(long, env = "QUIVER_VACUUM_RETENTION", default_value = "7days", value_parser = humantime::parse_duration)]
    pub vacuum_retention: Duration,

    /// How stale a table may get before it is reloaded to see other writers' commits
    /// (0s: never).
    #[arg(long, env = "QUIVER_TABLE_REFRESH_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub table_refresh_interval: Duration,

    /// How long idempotency keys are remembered.
    #[arg(long, env = "QUIVER_IDEMPOTENCY_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub idempotency_ttl: Duration,

    /// Ingest requests per second allowed per token (0: unlimited).
    #[arg(long, env = "QUIVER_INGEST_RATE_LIMIT", default_value_t = 0)]
    pub ingest_rate_limit: u32,

    /// Require a `read` token for /metrics.
    #[arg(long, env = "QUIVER_METRICS_AUTH", default_value_t = false)]
    pub metrics_auth: bool,

    /// Memory one query may use (DataFusion memory pool); past it the query fails.
    #[arg(long, env = "QUIVER_QUERY_MEMORY_LIMIT", default_value_t = 2 << 30)]
    pub query_memory_limit: usize,

    /// Longest a query may run, delivery of its result included.
    #[arg(long, env = "QUIVER_QUERY_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub query_timeout: Duration,

    /// Folder for query spill files (default: the OS temporary folder).
    #[arg(long, env = "QUIVER_QUERY_SPILL_DIR")]
    pub query_spill_dir: Option<PathBuf>,

    /// Most bytes of spill files all queries together may hold (0: queries never spill
    /// and fail at their memory limit).
    #[arg(long, env = "QUIVER_QUERY_SPILL_BYTES", default_value_t = 16 << 30)]
    pub query_spill_bytes: u64,

    /// Largest result one query may return, in encoded bytes.
    #[arg(long, env = "QUIVER_MAX_RESULT_BYTES", default_value_t = 1 << 30)]
    pub max_result_bytes: usize,

    /// Queries that may run at once; more wait for a slot.
    #[arg(long, env = "QUIVER_MAX_CONCURRENT_QUERIES", default_value_t = 8)]
    pub max_concurrent_queries: usize,

    /// How long a query waits for a slot before it is refused with 503.
    #[arg(long, env = "QUIVER_QUERY_QUEUE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub query_queue_timeout: Duration,

    /// Threads that run queries (default: one per core).
    #[arg(long, env = "QUIVER_QUERY_THREADS")]
    pub query_threads: Option<usize>,

    /// Folder of KPI view definitions (`*.sql`, each a CREATE MATERIALIZED VIEW, loaded
    /// in name order). Default: `./sql/kpis` when it exists, else the catalog built into
    /// the binary. `none` loads no KPI views.
    #[arg(long, env = "QUIVER_KPI_DIR")]
    pub kpi_dir: Option<String>,

    /// How often views that cannot be maintained incrementally are recomputed.
    #[arg(long, env = "QUIVER_VIEW_RECOMPUTE_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub view_recompute_interval: Duration,

    /// How often view state is checkpointed to the store (and always at shutdown).
    #[arg(long, env = "QUIVER_VIEW_CHECKPOINT_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub view_checkpoint_interval: Duration,

    /// Bytes of state all views together keep in memory; past it, operator state not
    /// used lately (groups, latest rows, join sides) moves to an on-disk B-tree in
    /// `--view-state-dir` and is read back when events touch it (0: no limit; the
    /// default until reading state back is fast enough, see BENCHMARKS.md).
    #[arg(long, env = "QUIVER_VIEW_MEMORY_LIMIT", default_value_t = 0)]
    pub view_memory_limit: usize,

    /// Folder of the views' spill file, emptied at every start (default: `view-state`
    /// in the WAL folder).
    #[arg(long, env = "QUIVER_VIEW_STATE_DIR")]
    pub view_state_dir: Option<PathBuf>,

    /// Run views' `now()` from this instant (RFC 3339) instead of the system time; it
    /// then advances in real time. For replaying recorded events as if they were
    /// happening, and for tests over fixed data.
    #[arg(long, env = "QUIVER_VIEW_CLOCK_START", value_parser = parse_instant_ms)]
    pub view_clock_start: Option<i64>,

    /// Admin token; when unset one is generated on first start and printed once.
    /// Change sets each view keeps for subscribers resuming with `from_version`.
    #[arg(long, env = "QUIVER_VIEW_HISTORY", default_value_t = 256)]
    pub view_history: usize,

    /// Origins whose browser pages may open `/v1/ws` (comma-separated; `*` for any).
    /// Empty: only the server's own origin. Clients that send no Origin are allowed.
    #[arg(long, env = "QUIVER_WS_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub ws_allowed_origins: Vec<String>,

    /// WebSocket connections the server holds at most.
    #[arg(long, env = "QUIVER_WS_MAX_CONNECTIONS", default_value_t = 20_000)]
    pub ws_max_connections: usize,

    /// WebSocket connections one token may hold.
    #[arg(
        long,
        env = "QUIVER_WS_MAX_CONNECTIONS_PER_TOKEN",
        default_value_t = 1_000
    )]
    pub ws_max_connections_per_token: usize,

    /// Live subscriptions one token may hold, across its connections.
    #[arg(
        long,
        env = "QUIVER_WS_MAX_SUBSCRIPTIONS_PER_TOKEN",
        default_value_t = 10_000
    )]
    pub ws_max_subscriptions_per_token: usize,

    /// The largest message a client may send.
    #[arg(long, env = "QUIVER_WS_MAX_MESSAGE_BYTES", default_value_t = 64 << 10)]
    pub ws_max_message_bytes: usize,

    /// Bytes of pending deltas per connection; past it a slow client catches up from
    /// its group's kept deltas (folded per key when more than this) or a snapshot.
    #[arg(long, env = "QUIVER_WS_QUEUE_BYTES", default_value_t = 1 << 20)]
    pub ws_queue_bytes: usize,

    /// Bytes of pending deltas all connections together may hold; past it, subscribers
    /// with pending deltas get a fresh snapshot later instead.
    #[arg(long, env = "QUIVER_WS_TOTAL_QUEUE_BYTES", default_value_t = 256 << 20)]
    pub ws_total_queue_bytes: usize,

    /// Bytes of encoded snapshots held at once, cached or being written to clients.
    /// Past it, a subscriber that needs a new snapshot waits until older ones are
    /// written (a large view's snapshot is hundreds of MB; slow clients would otherwise
    /// keep one per version alive).
    #[arg(long, env = "QUIVER_WS_SNAPSHOT_BYTES", default_value_t = 256 << 20)]
    pub ws_snapshot_bytes: usize,

    /// How often the server pings every connection, busy or quiet.
    #[arg(long, env = "QUIVER_WS_PING_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub ws_ping_interval: Duration,

    /// A connection that answers no ping (with any frame) this long is closed: a
    /// client that vanished without closing goes within this plus two ping intervals
    /// (25 s by default).
    #[arg(long, env = "QUIVER_WS_IDLE_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub ws_idle_timeout: Duration,

    /// A connection that takes longer than this to accept a write is dropped.
    #[arg(long, env = "QUIVER_WS_WRITE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub ws_write_timeout: Duration,

    /// Worker threads serving WebSocket connections, apart from those of HTTP and ingest.
    #[arg(long, env = "QUIVER_WS_THREADS", default_value_t = 1)]
    pub ws_threads: usize,

    /// Offer permessage-deflate to clients that ask for it.
    #[arg(long, env = "QUIVER_WS_COMPRESSION", default_value_t = true, action = clap::ArgAction::Set)]
    pub ws_compression: bool,

    /// When the forecast job runs: a cron expression in UTC (`0 2 * * *`: daily at
    /// 02:00; six fields put seconds first). Off unless given (`quiver demo`: hourly).
    #[arg(long, env = "QUIVER_FORECAST_SCHEDULE")]
    pub forecast_schedule: Option<String>,

    /// When the anomaly job runs: a cron expression in UTC. Off unless given
    /// (`quiver demo`: every 10 minutes).
    #[arg(long, env = "QUIVER_ANOMALIES_SCHEDULE")]
    pub anomalies_schedule: Option<String>,

    /// Threads a batch job computes on (its reads run on the query threads).
    #[arg(long, env = "QUIVER_JOB_THREADS", default_value_t = 1)]
    pub job_threads: usize,

    /// Days the forecast job forecasts.
    #[arg(long, env = "QUIVER_FORECAST_HORIZON", default_value_t = 14)]
    pub forecast_horizon: usize,

    /// SMTP relay for alert and report emails: `smtp://host:port` (STARTTLS when offered),
    /// `smtps://host:port` (TLS), credentials as `smtp://user:pass@host`.
    #[arg(long, env = "QUIVER_SMTP_URL", hide_env_values = true)]
    pub smtp_url: Option<String>,

    /// Sender address of alert and report emails.
    #[arg(long, env = "QUIVER_EMAIL_FROM", default_value = "quiver@localhost")]
    pub email_from: String,

    /// How long one alert delivery (webhook request or email) may take.
    #[arg(long, env = "QUIVER_ALERT_DELIVERY_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub alert_delivery_timeout: Duration,

    /// Wait after a failed alert delivery; doubles with each further failure (up to 10
    /// minutes), 12 attempts in all.
    #[arg(long, env = "QUIVER_ALERT_RETRY", default_value = "1s", value_parser = humantime::parse_duration)]
    pub alert_retry: Duration,

    /// Folder of built-in report definitions (`*.json`, each a `POST /v1/reports`
    /// body), created at start when missing. Default: `./sql/reports` when it exists,
    /// else the copies built into the binary. `none` loads none.
    #[arg(long, env = "QUIVER_REPORT_DIR")]
    pub report_dir: Option<String>,

    /// Whether the built-in reports keep their schedules (the demo's choice; `serve`
    /// loads them to run on request).
    #[arg(skip)]
    pub report_example_schedules: bool,

    /// How long report runs and their files are kept.
    #[arg(long, env = "QUIVER_REPORT_RETENTION", default_value = "30days", value_parser = humantime::parse_duration)]
    pub report_retention: Duration,

    /// Longest a report run may take, queries and file together (each query also has
    /// the query memory limit, and the file the result size limit).
    #[arg(long, env = "QUIVER_REPORT_TIMEOUT", default_value = "10m", value_parser = humantime::parse_duration)]
    pub report_timeout: Duration,

    /// Report files larger than this are not attached to the email; it links to them.
    #[arg(long, env = "QUIVER_EMAIL_MAX_ATTACHMENT_BYTES", default_value_t = 10 << 20)]
    pub email_max_attachment_bytes: usize,

    /// Wait after a failed report email; doubles with each further failure, 4 attempts
    /// in all.
    #[arg(long, env = "QUIVER_REPORT_EMAIL_RETRY", default_value = "5s", value_parser = humantime::parse_duration)]
    pub report_email_retry: Duration,

    /// The server's address as email readers reach it, for links to report files
    /// (default: the HTTP listen address).
    #[arg(long, env = "QUIVER_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// Run report schedules from this instant (RFC 3339) instead of the system time; it
    /// then advances in real time. For tests and for trying a schedule.
    #[arg(long, env = "QUIVER_REPORT_CLOCK_START", value_parser = parse_instant_ms)]
    pub report_clock_start: Option<i64>,

    /// Back the store up on a schedule to this location (a folder, file://PATH or
    /// s3://BUCKET/PREFIX), flushing the buffers first; see `quiver backup`.
    #[arg(long, env = "QUIVER_BACKUP_TO")]
    pub backup_to: Option<String>,

    /// When scheduled backups run (cron, seconds field optional, `CRON_TZ=` for a zone).
    #[arg(long, env = "QUIVER_BACKUP_SCHEDULE", default_value = "0 */15 * * * *")]
    pub backup_schedule: String,

    /// Alert notifications kept (the `notifications` table holds the newest).
    #[arg(long, env = "QUIVER_NOTIFICATIONS_KEEP", default_value_t = 1000)]
    pub notifications_keep: usize,

    /// A fixed admin token (never stored). Prefer --admin-token-file, which keeps the
    /// secret out of process listings and environment dumps.
    #[arg(long, env = "QUIVER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// File holding the admin token (e.g. a mounted secret); trailing newline ignored.
    #[arg(long, env = "QUIVER_ADMIN_TOKEN_FILE", conflicts_with = "admin_token")]
    pub admin_token_file: Option<PathBuf>,

    /// File holding --smtp-url (it may carry a password).
    #[arg(long, env = "QUIVER_SMTP_URL_FILE", conflicts_with = "smtp_url")]
    pub smtp_url_file: Option<PathBuf>,

    /// Log format: auto (pretty on a terminal, JSON otherwise), pretty or json.
    #[arg(long, env = "QUIVER_LOG_FORMAT", default_value = "auto")]
    pub log_format: String,
}

/// A listen address, or none (`off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

/// A listen address that is neither `ip:port` nor `off`.
#[derive(Debug, thiserror::Error)]
#[error("'{text}' is not an address like 127.0.0.1:5433, or off: {source}")]
pub struct BadListen {
    text: String,
    source: std::net::AddrParseError,
}

impl std::str::FromStr for Listen {
    type Err = BadListen;
    fn from_str(s: &str) -> Result<Self, BadListen> {
        if matches!(s, "off" | "none" | "") {
            return Ok(Self(None));
        }
        s.parse()
            .map(|a| Self(Some(a)))
            .map_err(|source| BadListen {
                text: s.to_owned(),
                source,
            })
    }
}

impl ServeConfig {
    /// Reads the secrets given as files (`--admin-token-file`, `--smtp-url-file`) into
    /// their settings; an error names the file.
    pub fn resolve_secret_files(&mut self) -> anyhow::Result<()> {
        if let Some(path) = &self.admin_token_file {
            self.admin_token = Some(
                quiver_engine::read_secret_file(path)
                    .map_err(|e| anyhow::anyhow!("--admin-token-file: {e}"))?,
            );
        }
        if let Some(path) = &self.smtp_url_file {
            self.smtp_url = Some(
                quiver_engine::read_secret_file(path)
                    .map_err(|e| anyhow::anyhow!("--smtp-url-file: {e}"))?,
            );
        }
        Ok(())
    }

    /// The TLS certificate for HTTP and Flight SQL, if any.
    pub(crate) fn tls_files(&self) -> Option<crate::tls::TlsFiles> {
        let (cert, key) = self.tls_cert.clone().zip(self.tls_key.clone())?;
        Some(crate::tls::TlsFiles { cert, key })
    }

    /// The TLS certificate for Postgres: its own, else the HTTP one.
    pub(crate) fn pg_tls_files(&self) -> Option<crate::tls::TlsFiles> {
        match self.pg_tls_cert.clone().zip(self.pg_tls_key.clone()) {
            Some((cert, key)) => Some(crate::tls::TlsFiles { cert, key }),
            None => self.tls_files(),
        }
    }

    /// The WAL folder in effect.
    pub fn wal_dir(&self) -> PathBuf {
        if let Some(d) = &self.wal_dir {
            return d.clone();
        }
        let local = self
            .store
            .strip_prefix("file://")
            .or_else(|| (!self.store.contains("://")).then_some(self.store.as_str()));
        match local {
            Some(path) => PathBuf::from(path).join("wal"),
            None => PathBuf::from("./quiver-wal"),
        }
    }

    /// The KPI view definitions to load at start.
    pub fn view_definitions(&self) -> anyhow::Result<Vec<String>> {
        let dir = match self.kpi_dir.as_deref() {
            Some("none") => return Ok(Vec::new()),
            Some(d) => PathBuf::from(d),
            None if std::path::Path::new("sql/kpis").is_dir() => PathBuf::from("sql/kpis"),
            None => return Ok(BUILT_IN_KPIS.iter().map(|s| (*s).to_owned()).collect()),
        };
        Ok(read_folder(&dir, "sql")
            .map_err(|e| anyhow::anyhow!("the KPI folder: {e}"))?
            .into_iter()
            .map(|(_, text)| text)
            .collect())
    }

    /// The built-in report definitions to create at start.
    pub fn report_examples(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let texts: Vec<(String, String)> = match self.report_dir.as_deref() {
            Some("none") => return Ok(Vec::new()),
            Some(d) => read_folder(std::path::Path::new(d), "json")?,
            None if std::path::Path::new("sql/reports").is_dir() => {
                read_folder(std::path::Path::new("sql/reports"), "json")?
            }
            None => BUILT_IN_REPORTS
                .iter()
                .map(|(name, text)| ((*name).to_owned(), (*text).to_owned()))
                .collect(),
        };
        texts
            .into_iter()
            .map(|(name, text)| {
                serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{name}: {e}"))
            })
            .collect()
    }

    /// The engine settings these flags describe.
    pub(crate) fn push_config(&self) -> crate::push::PushConfig {
        crate::push::PushConfig {
            allowed_origins: self
                .ws_allowed_origins
                .iter()
                .map(|o| o.trim().trim_end_matches('/').to_owned())
                .filter(|o| !o.is_empty())
                .collect(),
            max_connections: self.ws_max_connections,
            max_connections_per_token: self.ws_max_connections_per_token,
            max_subscriptions_per_token: self.ws_max_subscriptions_per_token,
            max_message_bytes: self.ws_max_message_bytes,
            queue_bytes: self.ws_queue_bytes,
            total_queue_bytes: self.ws_total_queue_bytes,
            snapshot_bytes: self.ws_snapshot_bytes,
            ping_interval: self.ws_ping_interval,
            idle_timeout: self.ws_idle_timeout,
            write_timeout: self.ws_write_timeout,
            auth_timeout: Duration::from_secs(10),
            compression: self.ws_compression,
            threads: self.ws_threads,
        }
    }

    pub fn engine_config(&self) -> quiver_engine::EngineConfig {
        let mut c = quiver_engine::EngineConfig::new(self.store.clone(), self.wal_dir());
        c.flush_bytes = self.flush_bytes;
        c.flush_interval = self.flush_interval;
        c.max_buffer_bytes = self.max_buffer_bytes;
        c.ingest_max_wait = self.ingest_max_wait;
        c.wal.segment_bytes = self.wal_segment_bytes;
        c.wal.max_record_bytes = self.max_wal_record_bytes;
        c.upkeep_interval = self.upkeep_interval;
        c.table.compact_target_bytes = self.compact_target_bytes;
        if let Some(n) = self.flush_parallelism {
            c.table.flush_parallelism = n.max(1);
        }
        c.table.vacuum_retention = self.vacuum_retention;
        c.idempotency_ttl = self.idempotency_ttl;
        c.table_refresh_interval = self.table_refresh_interval;
        c.query.memory_limit = self.query_memory_limit;
        c.query.timeout = self.query_timeout;
        c.query.spill_dir = self.query_spill_dir.clone();
        c.query.spill_bytes = self.query_spill_bytes;
        if let Some(n) = self.query_threads {
            c.query.threads = n.max(1);
        }
        c.views.recompute_interval = self.view_recompute_interval;
        c.views.checkpoint_interval = self.view_checkpoint_interval;
        c.views.history = self.view_history.max(1);
        c.views.memory_limit = self.view_memory_limit;
        c.views.state_dir = self.view_state_dir.clone();
        if let Some(start) = self.view_clock_start {
            c.views.clock = quiver_engine::clock::Clock::starting_at(start);
        }
        c.alerts.smtp_url = self.smtp_url.clone();
        c.alerts.email_from = self.email_from.clone();
        c.alerts.delivery_timeout = self.alert_delivery_timeout;
        c.alerts.retry_base = self.alert_retry;
        c.alerts.keep_notifications = self.notifications_keep.max(1);
        c
    }
}

impl ServeConfig {
    /// The job settings and schedules these flags describe; an error names a bad cron
    /// expression.
    /// The report settings these flags describe.
    pub(crate) fn report_options(&self) -> crate::reports::ReportOptions {
        crate::reports::ReportOptions {
            retention: self.report_retention,
            timeout: self.report_timeout,
            max_result_bytes: self.max_result_bytes,
            smtp_url: self.smtp_url.clone(),
            email_from: self.email_from.clone(),
            email_timeout: self.alert_delivery_timeout,
            email_retry: self.report_email_retry,
            max_attachment_bytes: self.email_max_attachment_bytes,
            public_url: self.public_url.clone(),
            clock: match self.report_clock_start {
                Some(start) => quiver_engine::clock::Clock::starting_at(start),
                None => quiver_engine::clock::Clock::system(),
            },
        }
    }

    pub(crate) fn jobs(&self) -> anyhow::Result<crate::jobs::Jobs> {
        use quiver_models::job::JobKind;
        let mut schedules = std::collections::BTreeMap::new();
        for (kind, text, flag) in [
            (
                JobKind::Forecast,
                &self.forecast_schedule,
                "--forecast-schedule",
            ),
            (
                JobKind::Anomalies,
                &self.anomalies_schedule,
                "--anomalies-schedule",
            ),
        ] {
            match text.as_deref().map(str::trim) {
                None | Some("" | "off") => {}
                Some(t) => {
                    let s = crate::schedule::Schedule::parse(t)
                        .map_err(|e| anyhow::anyhow!("{flag}: {e}"))?;
                    schedules.insert(kind, s);
                }
            }
        }
        Ok(crate::jobs::Jobs::new(
            job_config(self.forecast_horizon, self.job_threads),
            schedules,
        ))
    }
}

/// Job settings from the flags `serve` and the job commands share.
pub(crate) fn job_config(horizon: usize, threads: usize) -> quiver_models::job::JobConfig {
    let mut c = quiver_models::job::JobConfig::default();
    c.demand.horizon = horizon.clamp(1, 366);
    c.threads = threads.max(1);
    c
}

/// The KPI catalog (`sql/kpis`), built in for when the folder is not at hand.
const BUILT_IN_REPORTS: &[(&str, &str)] = &[
    (
        "daily_sales.json",
        include_str!("../../sql/reports/daily_sales.json"),
    ),
    (
        "weekly_stock.json",
        include_str!("../../sql/reports/weekly_stock.json"),
    ),
];

/// The files of `dir` with extension `ext`, in name order: (path, text).
fn read_folder(dir: &std::path::Path, ext: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("cannot read the folder {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .map(|t| (f.display().to_string(), t))
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))
        })
        .collect()
}

const BUILT_IN_KPIS: &[&str] = &[
    include_str!("../../sql/kpis/01_revenue_per_minute.sql"),
    include_str!("../../sql/kpis/02_hourly_sales_by_sku.sql"),
    include_str!("../../sql/kpis/03_stock_on_hand.sql"),
    include_str!("../../sql/kpis/04_low_stock.sql"),
    include_str!("../../sql/kpis/05_orders_current.sql"),
    include_str!("../../sql/kpis/06_orders_by_status.sql"),
    include_str!("../../sql/kpis/07_units_sold.sql"),
    include_str!("../../sql/kpis/08_sell_through.sql"),
];

/// An RFC 3339 instant as milliseconds since the epoch.
fn parse_instant_ms(s: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("'{s}' is not an RFC 3339 instant (2026-11-25T12:00:00Z): {e}"))
}
