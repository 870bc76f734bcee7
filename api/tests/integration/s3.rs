//! The `s3://` store against a real S3-compatible server (moto's S3 server, served one
//! request at a time by `tests/s3_server.py` so that put-if-absent is atomic as on S3),
//! including two Quiver writers committing to one table at once, each with its own
//! views and view checkpoints on the shared prefix.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use object_store::ObjectStore as _;
use object_store::ObjectStoreExt as _;
use serde_json::Value;

use crate::common::*;

pub(crate) struct S3Server {
    child: Child,
    pub(crate) endpoint: String,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) async fn start_s3(dir: &std::path::Path) -> S3Server {
    let port = free_port();
    let python = std::env::var("QUIVER_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let log = std::fs::File::create(dir.join("s3.log")).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/s3_server.py");
    let child = Command::new(python)
        .args([script, "127.0.0.1", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start moto's S3 server (pip install 'moto[server]')");
    let endpoint = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.get(&endpoint).send().await.is_err() {
        assert!(Instant::now() < deadline, "S3 server did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = client
        .put(format!("{endpoint}/quiver-test"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "create bucket: {}", r.status());
    S3Server { child, endpoint }
}

pub(crate) fn s3_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ENDPOINT_URL", endpoint.into()),
        ("AWS_ALLOW_HTTP", "true".into()),
    ]
}

#[tokio::test]
async fn s3_store_with_two_concurrent_writers() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = start_s3(dir.path()).await;
    let env = s3_env(&s3.endpoint);
    for (k, v) in &env {
        // The test process reads the table back through the same variables.
        #[expect(
            unsafe_code,
            reason = "test-only; no other thread reads these variables"
        )]
        // SAFETY: the variables are only read by this test's own store client.
        unsafe {
            std::env::set_var(k, v)
        };
    }
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let store = "s3://quiver-test/lake";
    let d1 = dir.path().join("a");
    let d2 = dir.path().join("b");
    std::fs::create_dir_all(&d1).unwrap();
    std::fs::create_dir_all(&d2).unwrap();
    let (mut a, mut b) = tokio::join!(
        TestServer::start_with(&d1, store, &["--flush-interval", "50ms"], &env_ref),
        TestServer::start_with(&d2, store, &["--flush-interval", "50ms"], &env_ref),
    );

    let send = |s: &TestServer, prefix: &'static str| {
        let url = format!("{}/v1/streams/orders/events", s.url);
        let client = s.client.clone();
        async move {
            let mut acked = BTreeSet::new();
            for q in 0..40 {
                let body: Vec<String> = (0..25)
                    .map(|i| {
                        order_line(&format!("{prefix}-{q}-{i}"), "2026-11-25T10:00:00Z", "paid")
                    })
                    .collect();
                let r = client
                    .post(&url)
                    .bearer_auth(ADMIN)
                    .header("content-type", "application/x-ndjson")
                    .body(body.join("\n"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                let accepted = r.json::<Value>().await.unwrap()["accepted"].as_u64();
                assert_eq!(accepted, Some(25));
                acked.extend((0..25).map(|i| format!("{prefix}-{q}-{i}")));
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            acked
        }
    };
    let (acked_a, acked_b) = tokio::join!(send(&a, "a"), send(&b, "b"));
    let (na, nb) = (acked_a.len() as u64, acked_b.len() as u64);
    // Each server picks up the other's commits and queries see all of them.
    for server in [&a, &b] {
        wait_for_count(server, na + nb).await;
    }
    // A server that writes nothing still sees new commits of the other.
    let more: String = (0..5)
        .map(|i| order_line(&format!("b-late-{i}"), "2026-11-25T11:00:00Z", "paid") + "\n")
        .collect();
    assert_eq!(
        b.post("orders", "application/x-ndjson", more)
            .await
            .status(),
        200
    );
    wait_for_count(&a, na + nb + 5).await;
    let mut acked: BTreeSet<String> = acked_a.union(&acked_b).cloned().collect();
    acked.extend((0..5).map(|i| format!("b-late-{i}")));
    let (na, nb) = (na, nb + 5);
    // Each server's views hold what came in through it (views are fed by their own
    // node's log; see docs/ARCHITECTURE.md).
    let units_a = own_units_sold(&a, "a-").await;
    let units_b = own_units_sold(&b, "b-").await;
    assert_eq!(a.terminate(), Some(0), "log a:\n{}", a.log());
    assert_eq!(b.terminate(), Some(0), "log b:\n{}", b.log());

    // Two nodes, two checkpoints, each under its own node id.
    let shared = quiver_engine::Store::open(store).unwrap();
    let listed: Vec<_> = futures::StreamExt::collect::<Vec<_>>(
        shared
            .object_store()
            .list(Some(&shared.path("_quiver/nodes").unwrap())),
    )
    .await;
    let checkpoints: BTreeSet<String> = listed
        .into_iter()
        .filter_map(Result::ok)
        .map(|m| m.location.to_string())
        .filter(|p| p.ends_with("/views/checkpoint.bin"))
        .collect();
    assert_eq!(checkpoints.len(), 2, "{checkpoints:?}");

    let table = a.table_url("orders");
    let rows = query_table(
        store,
        table.clone(),
        "SELECT COUNT(*), COUNT(DISTINCT event_id) FROM t",
    )
    .await;
    let per_writer = query_table(
        store,
        table.clone(),
        "SELECT substr(event_id, 1, 1) AS w, CAST(COUNT(*) AS VARCHAR) AS n FROM t GROUP BY substr(event_id, 1, 1)",
    )
    .await;
    assert_eq!(
        single_i64(&rows) as u64,
        na + nb,
        "no commit was lost; per writer {:?}; versions both writers believe they committed: {:?}",
        strings(&per_writer, 0)
            .into_iter()
            .zip(strings(&per_writer, 1))
            .collect::<Vec<_>>(),
        committed_versions(&a.log())
            .intersection(&committed_versions(&b.log()))
            .collect::<Vec<_>>(),
    );
    // Every acknowledged event is in the table once, and nothing else is.
    let ids = query_table(store, table.clone(), "SELECT event_id FROM t").await;
    let stored: Vec<String> = strings(&ids, 0);
    let stored_set: BTreeSet<String> = stored.iter().cloned().collect();
    assert_eq!(stored.len(), stored_set.len(), "an event was stored twice");
    let lost: Vec<&String> = acked.difference(&stored_set).collect();
    let extra: Vec<&String> = stored_set.difference(&acked).collect();
    assert!(
        lost.is_empty() && extra.is_empty(),
        "acknowledged but lost: {lost:?}; stored but never acknowledged: {extra:?}"
    );
    // SQL over the s3:// table, through the server, sees both writers' events once;
    // each server comes back from its own checkpoint with the views it had.
    a.restart().await;
    b.restart().await;
    assert_eq!(
        a.sql_rows("SELECT COUNT(*), COUNT(DISTINCT event_id) FROM orders")
            .await,
        serde_json::json!([[na + nb, na + nb]])
    );
    for (server, units, prefix) in [(&a, &units_a, "a-"), (&b, &units_b, "b-")] {
        let restored = server
            .log()
            .lines()
            .filter(|l| l.contains("view restored from its checkpoint"))
            .count();
        assert!(
            restored >= 8,
            "{prefix}: {restored} views restored; log:\n{}",
            server.log()
        );
        assert_eq!(
            &own_units_sold(server, prefix).await,
            units,
            "{prefix} after the restart"
        );
    }
    // Many commits from both writers interleaved in one log.
    let log = quiver_engine::Store::open(store).unwrap();
    let list: Vec<_> = futures::StreamExt::collect::<Vec<_>>(
        log.object_store()
            .list(Some(&log.path("tables/orders/_delta_log").unwrap())),
    )
    .await;
    let commits = list
        .into_iter()
        .filter_map(Result::ok)
        .filter(|m| m.location.as_ref().ends_with(".json"))
        .count();
    assert!(commits > 4, "expected many commits, got {commits}");

    // A report's file goes to the same S3 store, and comes back from it.
    crate::reports::create(
        &a,
        serde_json::json!({"name": "on_s3", "format": "csv", "queries": [
            {"sql": "SELECT COUNT(*) AS n FROM orders"}]}),
    )
    .await;
    let run = crate::reports::run_to_end(&a, "on_s3", None).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    let (bytes, _, _) = crate::reports::download(&a, &run).await;
    assert_eq!(
        String::from_utf8(bytes).unwrap(),
        format!("n\n{}\n", na + nb)
    );
    let key = format!("reports/on_s3/{}.csv", run["id"].as_str().unwrap());
    let meta = log
        .object_store()
        .head(&log.path(&key).unwrap())
        .await
        .expect("the report file is in the bucket");
    assert_eq!(Some(meta.size), run["bytes"].as_u64());
}

/// The `units_sold` view on `server`, checked against a recompute over the events
/// whose id starts with `prefix` (those ingested through that server).
async fn own_units_sold(server: &TestServer, prefix: &str) -> Value {
    let want = server
        .sql_rows(&format!(
            "SELECT sku, warehouse_id, SUM(quantity) FROM orders \
             WHERE status = 'paid' AND event_id LIKE '{prefix}%' GROUP BY 1, 2 ORDER BY 1, 2"
        ))
        .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let view = server
            .sql_rows("SELECT sku, warehouse_id, units_sold FROM units_sold ORDER BY 1, 2")
            .await;
        if view == want {
            return view;
        }
        assert!(
            Instant::now() < deadline,
            "{prefix}: view {view}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `SELECT COUNT(*) FROM orders` on `server` is `want`.
async fn wait_for_count(server: &TestServer, want: u64) {
    let want = serde_json::json!([[want]]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let seen = server.sql_rows("SELECT COUNT(*) FROM orders").await;
        if seen == want {
            return;
        }
        assert!(Instant::now() < deadline, "still {seen}, want {want}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The Delta versions a server logged as its own flush commits.
fn committed_versions(log: &str) -> std::collections::BTreeSet<u64> {
    log.lines()
        .filter(|l| l.contains("flushed to Delta"))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["fields"]["version"].as_u64())
        .collect()
}
