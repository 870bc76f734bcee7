//! Monitoring for real: a Prometheus server (Debian's package) scrapes a running
//! Quiver with the rules of `deploy/prometheus/rules.yml`; the key series arrive, a
//! rule fires when its condition is provoked, and every metric the rules and the
//! Grafana dashboards name is one Quiver exports. And the JSON logs tie a request id
//! to its WAL sequence and to the flush that stored it.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::common::{ADMIN, TestServer, eventually, free_port, order_line};

/// A Prometheus process, killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    client: reqwest::Client,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (host:port) every second with the rules file
    /// of the repository, its `for:` durations set to zero so alerts fire as soon as
    /// their condition holds (the durations themselves are covered by promtool's tests).
    async fn start(dir: &Path, target: &str) -> Self {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let rules = std::fs::read_to_string(repo.join("deploy/prometheus/rules.yml")).unwrap();
        let rules: String = rules
            .lines()
            .map(|l| match l.trim_start().strip_prefix("for:") {
                Some(_) => format!("{}for: 0s", &l[..l.len() - l.trim_start().len()]),
                None => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(dir.join("rules.yml"), rules).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: quiver\n    static_configs:\n      - targets: [\"{target}\"]\n",
            rules = dir.join("rules.yml").display()
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus is installed (Debian's package)");
        let this = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
        };
        let ready = format!("{}/-/ready", this.url);
        eventually(60, || async {
            matches!(this.client.get(&ready).send().await, Ok(r) if r.status().is_success())
        })
        .await;
        this
    }

    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let v: Value = self
            .client
            .get(format!("{}/api/v1/{path}", self.url))
            .query(query)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["status"], "success", "{v}");
        v["data"].clone()
    }

    /// The instant vector of `expr`.
    async fn query(&self, expr: &str) -> Vec<Value> {
        self.api("query", &[("query", expr)]).await["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

/// Metric names (`quiver_*`, `process_*`) in a rules file or a dashboard.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts_word && (rest.starts_with("quiver_") || rest.starts_with("process_")) {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            names.insert(rest[..end].to_owned());
            i += end;
        } else {
            i += 1;
        }
    }
    names
}

/// The family a sample name belongs to (`x_total` → `x`, `x_bucket` → `x`).
fn family(name: &str) -> &str {
    ["_total", "_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_quiver_and_an_alert_fires_when_provoked() {
    let dir = tempfile::tempdir().unwrap();
    // With scheduled backups on, so their series exist too (none runs in this test).
    let backups = format!("file://{}", dir.path().join("backups").display());
    let server = TestServer::start(
        dir.path(),
        &["--backup-to", &backups, "--backup-schedule", "0 0 0 1 1 *"],
    )
    .await;

    // Every metric the rules and dashboards use is declared by the server.
    let exposition = server.metrics_text().await;
    let declared: BTreeSet<&str> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut sources = vec![repo.join("deploy/prometheus/rules.yml")];
    for entry in std::fs::read_dir(repo.join("deploy/grafana/dashboards")).unwrap() {
        sources.push(entry.unwrap().path());
    }
    let mut checked = 0;
    for source in &sources {
        let text = std::fs::read_to_string(source).unwrap();
        for name in metric_names(&text) {
            assert!(
                declared.contains(family(&name)),
                "{} queries {name}, which Quiver does not export",
                source.display()
            );
            checked += 1;
        }
    }
    assert!(checked > 40, "only {checked} metric references found");

    let target = server.url.trim_start_matches("http://").to_owned();
    let prom = Prometheus::start(dir.path(), &target).await;
    eventually(30, || async {
        prom.query("up{job=\"quiver\"} == 1").await.len() == 1
    })
    .await;

    // Ingest some events so the ingest series exist, then check the key series.
    let body = (0..20)
        .map(|i| order_line(&format!("m{i}"), "2026-11-25T10:00:00Z", "paid"))
        .collect::<Vec<_>>()
        .join("\n");
    let (status, _) = post(&server, "/v1/streams/orders/events", body).await;
    assert_eq!(status, 200);
    for series in [
        "quiver_ingest_events_total{stream=\"orders\"}",
        "quiver_wal_fsync_seconds_bucket",
        "quiver_http_request_seconds_count",
        "process_resident_memory_bytes",
        "quiver_memory_limit_bytes",
        "quiver_view_freshness_seconds_count",
        "quiver_ws_connections",
    ] {
        eventually(30, || async { !prom.query(series).await.is_empty() }).await;
    }
    // The counter existed at zero before the first event; the scrape catches up.
    eventually(30, || async {
        prom.query("quiver_ingest_events_total{stream=\"orders\"} == 20")
            .await
            .len()
            == 1
    })
    .await;

    // No alert fires on a healthy server.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let firing: Vec<Value> = prom.api("alerts", &[]).await["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "firing")
        .cloned()
        .collect();
    assert!(firing.is_empty(), "{firing:?}");

    // Provoke one: a producer keeps sending rows that fail validation.
    let bad = r#"{"event_id":"x","event_time":"not a time"}"#.to_owned();
    let mut fired = None;
    for _ in 0..200 {
        let (status, _) = post(&server, "/v1/streams/orders/events", bad.clone()).await;
        assert_eq!(status, 400);
        let alerts = prom.api("alerts", &[]).await;
        fired = alerts["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["labels"]["alertname"] == "QuiverIngestBadInput" && a["state"] == "firing")
            .cloned();
        if fired.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fired = fired.unwrap_or_else(|| {
        panic!(
            "QuiverIngestBadInput never fired; prometheus log:\n{}",
            std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        )
    });
    assert_eq!(fired["labels"]["stream"], "orders", "{fired}");
    assert_eq!(fired["labels"]["severity"], "warning", "{fired}");
    assert!(
        fired["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("stream orders")
    );
}

async fn post(server: &TestServer, path: &str, body: String) -> (u16, reqwest::header::HeaderMap) {
    let resp = server
        .client
        .post(format!("{}{path}", server.url))
        .bearer_auth(ADMIN)
        .header("content-type", "application/x-ndjson")
        .header("x-request-id", "req-from-client-42")
        .body(body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.headers().clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_tie_a_request_to_its_wal_sequence_and_flush() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), &[]).await;
    let body = (0..5)
        .map(|i| order_line(&format!("l{i}"), "2026-11-25T10:00:00Z", "paid"))
        .collect::<Vec<_>>()
        .join("\n");
    let (status, headers) = post(&server, "/v1/streams/orders/events", body).await;
    assert_eq!(status, 200);
    // The client's id is kept and echoed; without one the server makes one.
    assert_eq!(headers["x-request-id"], "req-from-client-42");
    let made = server
        .client
        .get(format!("{}/health", server.url))
        .send()
        .await
        .unwrap();
    let generated = made.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(generated.len(), 16, "{generated}");

    let lines = || -> Vec<Value> {
        server
            .log()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not a JSON line: {l}")))
            .collect()
    };
    let accepted = lines()
        .into_iter()
        .find(|l| {
            l["fields"]["message"] == "events durable in the WAL"
                && l["span"]["request_id"] == "req-from-client-42"
        })
        .unwrap_or_else(|| panic!("no WAL line for the request:\n{}", server.log()));
    assert_eq!(accepted["fields"]["stream"], "orders");
    assert_eq!(accepted["fields"]["rows"], 5);
    let seq = accepted["fields"]["wal_seq"]
        .as_u64()
        .expect("a WAL sequence");
    // The flush that stored it names a sequence at or past it.
    eventually(20, || async {
        lines().iter().any(|l| {
            l["fields"]["message"] == "flushed to Delta"
                && l["fields"]["stream"] == "orders"
                && l["fields"]["wal_seq_through"]
                    .as_u64()
                    .is_some_and(|s| s >= seq)
        })
    })
    .await;
}
