//! The `TestServer` fixture and helpers.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::prelude::SessionContext;
use deltalake::DeltaTableBuilder;

/// Where test servers start their views' clock (`--view-clock-start`): the day the
/// test data is of, so views that keep the last days keep it.
pub(crate) const VIEW_CLOCK_START: &str = "2026-11-25T12:00:00Z";

pub(crate) const ADMIN: &str = "test-admin-token";

/// A `quiver serve` process on a free port, killed on drop.
#[derive(Debug)]
pub(crate) struct TestServer {
    child: Option<Child>,
    pub(crate) url: String,
    /// Port of the Postgres wire protocol listener.
    pub(crate) pg_port: u16,
    /// Port of the Flight SQL listener.
    pub(crate) flight_port: u16,
    pub(crate) store: String,
    pub(crate) dir: PathBuf,
    pub(crate) client: reqwest::Client,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// The value of the first line of the metrics text that starts with `name` (0 if none).
pub(crate) fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A port no listener holds, below the kernel's ephemeral range (32768 up by default):
/// a server restarted on its old ports must not find one taken by some client
/// connection's local end, as a port from the ephemeral range can be (seen once in CI).
///
/// Each port handed out is also reserved for ten minutes by a marker file that only one
/// process can create: nextest runs tests in separate processes, and a port free only
/// because its server is restarting must not go to another test meanwhile (seen once:
/// a restarted server found its Postgres port taken).
pub(crate) fn free_port() -> u16 {
    use rand::Rng;
    let reservations = std::env::temp_dir().join("quiver-test-ports");
    let _ = std::fs::create_dir_all(&reservations);
    let mut rng = rand::rng();
    for _ in 0..1000 {
        let port = rng.random_range(20_000..32_000);
        let marker = reservations.join(port.to_string());
        let stale = std::fs::metadata(&marker)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(600));
        if stale {
            let _ = std::fs::remove_file(&marker);
        }
        let reserved = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&marker)
            .is_ok();
        if reserved && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range")
}

/// An HTTP client for a test server; with `ca`, it trusts that certificate (the
/// server's own, self-signed) and nothing else.
fn test_client(ca: Option<&Path>) -> reqwest::Client {
    // No request of a test may hang it: past two minutes it fails.
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(120));
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).expect("the test certificate");
        builder = builder
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("a PEM certificate"));
    }
    builder.build().expect("http client")
}

impl TestServer {
    /// Starts a server with its store in `dir` and waits until it is ready.
    pub(crate) async fn start(dir: &Path, extra: &[&str]) -> Self {
        let store = format!("file://{}", dir.join("store").display());
        Self::start_with(dir, &store, extra, &[]).await
    }

    /// Starts a server with TLS flags in `extra`; the test's client trusts only `ca`.
    pub(crate) async fn start_with_ca(dir: &Path, extra: &[&str], ca: &Path) -> Self {
        let store = format!("file://{}", dir.join("store").display());
        Self::start_full(dir, &store, extra, &[], Some(ca)).await
    }

    pub(crate) async fn start_with(
        dir: &Path,
        store: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_full(dir, store, extra, env, None).await
    }

    async fn start_full(
        dir: &Path,
        store: &str,
        extra: &[&str],
        env: &[(&str, &str)],
        ca: Option<&Path>,
    ) -> Self {
        let wal = dir.join("wal").display().to_string();
        let defaults = [
            ("--store", store),
            ("--wal-dir", wal.as_str()),
            ("--flush-interval", "300ms"),
            ("--upkeep-interval", "0s"),
            // The test data is of that day: views that keep the last days keep it.
            ("--view-clock-start", VIEW_CLOCK_START),
        ];
        // Flags given by the test replace the defaults.
        let mut args: Vec<String> = defaults
            .iter()
            .filter(|(flag, _)| !extra.contains(flag))
            .flat_map(|(flag, value)| [flag.to_string(), value.to_string()])
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut this = Self {
            child: None,
            url: String::new(),
            pg_port: 0,
            flight_port: 0,
            store: store.to_owned(),
            dir: dir.to_owned(),
            client: test_client(ca),
            args,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        this.spawn().await;
        this
    }

    async fn spawn(&mut self) {
        // A free port can be taken by another test between the probe and the bind: on
        // a first start, whose ports no client knows yet, pick others and start again.
        let first = self.pg_port == 0;
        for _ in 0..3 {
            if first {
                self.pg_port = free_port();
                self.flight_port = free_port();
            }
            if self.try_spawn(first).await {
                return;
            }
        }
        panic!("no free ports after three tries; log:\n{}", self.log());
    }

    /// Starts the server and waits until it is ready. With `may_retry`, false when it
    /// could not bind its ports; it panics on any other early exit.
    async fn try_spawn(&mut self, may_retry: bool) -> bool {
        let port = free_port();
        let logged_before = self.log().len();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_quiver"))
            .arg("serve")
            .args(&self.args)
            .arg("--http-addr")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--pg-addr")
            .arg(format!("127.0.0.1:{}", self.pg_port))
            .arg("--flight-addr")
            .arg(format!("127.0.0.1:{}", self.flight_port))
            .envs(
                (!self.args.iter().any(|a| a == "--admin-token-file"))
                    .then_some(("QUIVER_ADMIN_TOKEN", ADMIN)),
            )
            .env("QUIVER_LOG_FORMAT", "json")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn quiver");
        self.child = Some(child);
        let scheme = if self.args.iter().any(|a| a == "--tls-cert") {
            "https"
        } else {
            "http"
        };
        self.url = format!("{scheme}://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = self.client.get(format!("{}/ready", self.url)).send().await
                && r.status().is_success()
            {
                return true;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let log = self.log();
                if may_retry && log[logged_before..].contains("Address already in use") {
                    self.child = None;
                    return false;
                }
                panic!("quiver exited early ({status}); log:\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "server not ready in time; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The server's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().expect("the server runs").id()
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// SIGKILL, no chance to flush.
    pub(crate) fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub(crate) fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        // SAFETY-free: send the signal through the kill command.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts again with the same store and WAL.
    pub(crate) async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    /// Sets a flag's value for the next start.
    pub(crate) fn set_flag(&mut self, flag: &str, value: &str) {
        match self.args.iter().position(|a| a == flag) {
            Some(i) if i + 1 < self.args.len() => self.args[i + 1] = value.to_owned(),
            _ => self.args.extend([flag.to_owned(), value.to_owned()]),
        }
    }

    /// Stops with SIGTERM (which flushes everything to Delta) and starts again.
    pub(crate) async fn restart_clean(&mut self) {
        assert_eq!(
            self.terminate(),
            Some(0),
            "clean stop; log:\n{}",
            self.log()
        );
        self.spawn().await;
    }

    /// `POST /v1/sql` with a token, parameters and a format.
    pub(crate) async fn sql_as(
        &self,
        token: &str,
        sql: &str,
        params: serde_json::Value,
        format: &str,
    ) -> reqwest::Response {
        self.client
            .post(format!("{}/v1/sql?format={format}", self.url))
            .bearer_auth(token)
            .json(&serde_json::json!({"sql": sql, "params": params}))
            .send()
            .await
            .expect("request")
    }

    /// The `GET /v1/streams` entry of one stream.
    pub(crate) async fn stream_info(&self, stream: &str) -> serde_json::Value {
        let streams = self.get_json("/v1/streams").await;
        streams
            .as_array()
            .and_then(|list| list.iter().find(|v| v["name"] == stream))
            .cloned()
            .unwrap_or_else(|| panic!("no stream '{stream}' in {streams}"))
    }

    /// `GET path` as admin, as JSON.
    pub(crate) async fn get_json(&self, path: &str) -> serde_json::Value {
        self.client
            .get(format!("{}{path}", self.url))
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json body")
    }

    /// The `/metrics` text.
    pub(crate) async fn metrics_text(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .expect("request")
            .text()
            .await
            .expect("text")
    }

    /// Runs a query as admin and returns the `rows` of its JSON answer.
    pub(crate) async fn sql_rows(&self, sql: &str) -> serde_json::Value {
        let resp = self.sql_as(ADMIN, sql, serde_json::json!([]), "json").await;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.expect("json body");
        assert_eq!(status, 200, "{sql}: {body}");
        body["rows"].clone()
    }

    pub(crate) async fn post(
        &self,
        stream: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.client
            .post(format!("{}/v1/streams/{stream}/events", self.url))
            .bearer_auth(ADMIN)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request")
    }

    /// Posts NDJSON with another token.
    pub(crate) async fn post_as(
        &self,
        token: &str,
        stream: &str,
        body: String,
    ) -> reqwest::Response {
        self.client
            .post(format!("{}/v1/streams/{stream}/events", self.url))
            .bearer_auth(token)
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await
            .expect("request")
    }

    /// Posts one paid order line with the given event id.
    pub(crate) async fn post_order(&self, id: &str) -> reqwest::Response {
        self.post_as(
            ADMIN,
            "orders",
            order_line(id, "2026-11-25T10:00:00Z", "paid"),
        )
        .await
    }

    pub(crate) fn table_url(&self, stream: &str) -> url::Url {
        let base = if self.store.ends_with('/') {
            self.store.clone()
        } else {
            format!("{}/", self.store)
        };
        url::Url::parse(&format!("{base}tables/{stream}/")).expect("url")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs SQL over a stream's Delta table, as any outside Delta reader would.
pub(crate) async fn query_table(store: &str, table: url::Url, sql: &str) -> Vec<RecordBatch> {
    let store = quiver_engine::Store::open(store).expect("store");
    let mut t = DeltaTableBuilder::from_url(table.clone())
        .expect("builder")
        .with_storage_backend(store.object_store(), table)
        .build()
        .expect("table");
    t.load().await.expect("load table");
    let ctx = SessionContext::new();
    t.update_datafusion_session(&ctx.state()).expect("session");
    let provider = t.table_provider().await.expect("provider");
    ctx.register_table("t", provider).expect("register");
    ctx.sql(sql)
        .await
        .expect("plan")
        .collect()
        .await
        .expect("run")
}

pub(crate) fn single_i64(batches: &[RecordBatch]) -> i64 {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::Int64Type;
    batches[0].column(0).as_primitive::<Int64Type>().value(0)
}

pub(crate) fn strings(batches: &[RecordBatch], col: usize) -> Vec<String> {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::compute::cast;
    use datafusion::arrow::datatypes::DataType;
    let mut out = Vec::new();
    for b in batches {
        let c = cast(b.column(col), &DataType::Utf8).expect("cast");
        let s = c.as_string::<i32>();
        for i in 0..s.len() {
            out.push(s.value(i).to_owned());
        }
    }
    out
}

/// A request with a token and an optional JSON body; the status and the body as JSON
/// (or as a JSON string when it is not JSON).
pub(crate) async fn request(
    server: &TestServer,
    method: reqwest::Method,
    token: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut req = server
        .client
        .request(method, format!("{}{path}", server.url))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (status, body)
}

/// Waits until `f` returns true (polling), or panics after `secs`.
pub(crate) async fn eventually<F, Fut>(secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "condition not met in {secs}s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) fn order_line(id: &str, time: &str, status: &str) -> String {
    format!(
        r#"{{"event_id":"{id}","event_time":"{time}","order_id":"o-{id}","customer_id":"c1","warehouse_id":"W1","sku":"SKU-1","quantity":2,"unit_price":19.99,"status":"{status}","channel":"web"}}"#
    )
}

pub(crate) type Shared<T> = Arc<parking_lot::Mutex<T>>;
