//! The command-line tools and table upkeep, end to end.

use std::process::Command;

use crate::common::*;

fn quiver(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run quiver");
    assert!(
        out.status.success(),
        "quiver {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn count_lines(s: &str, prefix: &str) -> usize {
    s.lines()
        .find(|l| l.contains(prefix))
        .and_then(|l| l.rsplit(": ").next())
        .and_then(|n| n.trim_end_matches(" events").parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn generate_then_load_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start(dir.path(), &[]).await;
    let mut expected = 0;
    for format in ["ndjson", "csv", "arrow"] {
        let out = dir.path().join(format);
        let printed = quiver(
            &[
                "generate",
                "--events",
                "3000",
                "--format",
                format,
                "--out",
                out.to_str().unwrap(),
                "--seed",
                "11",
                "--start",
                "2026-11-25T10:00:00Z",
            ],
            &[],
        );
        let orders = count_lines(&printed, "orders.");
        let inventory = count_lines(&printed, "inventory.");
        assert_eq!(orders + inventory, 3000, "{printed}");
        let file = out.join(format!("orders.{format}"));
        let env = [("QUIVER_URL", s.url.as_str()), ("QUIVER_TOKEN", ADMIN)];
        let loaded = quiver(
            &[
                "load",
                file.to_str().unwrap(),
                "--stream",
                "orders",
                "--batch",
                "700",
            ],
            &env,
        );
        assert!(
            loaded.contains(&format!("loaded {orders} events")),
            "{loaded}"
        );
        // Re-running the same load stores nothing twice (idempotency keys per chunk).
        quiver(
            &[
                "load",
                file.to_str().unwrap(),
                "--stream",
                "orders",
                "--batch",
                "700",
            ],
            &env,
        );
        // The three formats share event ids (same seed), so count distinct per format run.
        expected = orders;
    }
    assert_eq!(s.terminate(), Some(0));
    let n = query_table(
        &s.store,
        s.table_url("orders"),
        "SELECT COUNT(DISTINCT event_id) FROM t",
    )
    .await;
    assert_eq!(single_i64(&n), expected as i64);
    let total = query_table(&s.store, s.table_url("orders"), "SELECT COUNT(*) FROM t").await;
    // Each format was loaded once for real (the re-run was a replay): three copies.
    assert_eq!(single_i64(&total), 3 * expected as i64);
}

#[tokio::test]
async fn token_cli_creates_a_working_read_token() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path(), &[]).await;
    let out = quiver(
        &["token", "create", "--scope", "read", "--name", "bi"],
        &[("QUIVER_URL", s.url.as_str()), ("QUIVER_TOKEN", ADMIN)],
    );
    let token = out
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .expect("token printed")
        .trim()
        .to_owned();
    let r = s
        .client
        .get(format!("{}/v1/streams", s.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .post_as(
            &token,
            "orders",
            order_line("x", "2026-11-25T10:00:00Z", "paid"),
        )
        .await;
    assert_eq!(r.status(), 403);
}

#[tokio::test]
async fn upkeep_compacts_checkpoints_and_vacuums() {
    let dir = tempfile::tempdir().unwrap();
    // Upkeep is off while the small files are written, and on from the restart, so its
    // first pass sees all eight files whatever the machine's speed.
    let mut s = TestServer::start(
        dir.path(),
        &[
            "--flush-interval",
            "50ms",
            "--upkeep-interval",
            "0s",
            "--vacuum-retention",
            "0s",
        ],
    )
    .await;
    for i in 0..8 {
        let r = s.post_order(&format!("u-{i}")).await;
        assert_eq!(r.status(), 200);
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    }
    let part = dir.path().join("store/tables/orders/event_date=2026-11-25");
    let log = dir.path().join("store/tables/orders/_delta_log");
    let parquet_files = |p: &std::path::Path| {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "parquet"))
                    .count()
            })
            .unwrap_or(0)
    };
    eventually(20, || async {
        let n = query_table(&s.store, s.table_url("orders"), "SELECT COUNT(*) FROM t").await;
        single_i64(&n) == 8
    })
    .await;
    assert!(
        parquet_files(&part) > 2,
        "several small files before upkeep"
    );
    s.set_flag("--upkeep-interval", "500ms");
    s.restart_clean().await;
    eventually(30, || async {
        let checkpoint = std::fs::read_dir(&log)
            .map(|rd| {
                rd.flatten()
                    .any(|e| e.file_name().to_string_lossy().contains("checkpoint"))
            })
            .unwrap_or(false);
        checkpoint && parquet_files(&part) == 1
    })
    .await;
    // Upkeep counts its work once the whole pass (compaction, checkpoint, vacuum) has
    // returned, a moment after the files show it.
    let want = "quiver_table_compactions_total{stream=\"orders\"} 1";
    let mut metrics = s.metrics_text().await;
    for _ in 0..100 {
        if metrics.contains(want) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        metrics = s.metrics_text().await;
    }
    assert!(metrics.contains(want), "{metrics}");
    let n = query_table(&s.store, s.table_url("orders"), "SELECT COUNT(*) FROM t").await;
    assert_eq!(single_i64(&n), 8);
}

/// The README's first command: `quiver demo` serves, feeds itself, and stops cleanly.
#[tokio::test]
async fn demo_feeds_both_streams_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args([
            "demo",
            "--rate",
            "400",
            "--flush-interval",
            "500ms",
            "--upkeep-interval",
            "0s",
        ])
        .arg("--http-addr")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--store")
        .arg(format!("file://{}", dir.path().join("store").display()))
        .env("QUIVER_ADMIN_TOKEN", ADMIN)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    eventually(60, || async {
        let Ok(r) = client
            .get(format!("{url}/v1/streams"))
            .bearer_auth(ADMIN)
            .send()
            .await
        else {
            return false;
        };
        let Ok(v) = r.json::<serde_json::Value>().await else {
            return false;
        };
        let rows = |name: &str| {
            v.as_array()
                .and_then(|a| a.iter().find(|s| s["name"] == name))
                .and_then(|s| s["stored_events"].as_u64())
                .unwrap_or(0)
        };
        rows("orders") > 100 && rows("inventory") > 100
    })
    .await;
    // The demo schedules the built-in reports.
    let reports: serde_json::Value = client
        .get(format!("{url}/v1/reports"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let schedule = |name: &str| {
        reports["reports"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["name"] == name))
            .map(|r| r["schedule"].clone())
    };
    assert_eq!(
        schedule("daily_sales"),
        Some("0 7 * * *".into()),
        "{reports}"
    );
    assert_eq!(
        schedule("weekly_stock"),
        Some("0 7 * * MON".into()),
        "{reports}"
    );
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let n = query_table(
        &format!("file://{}", dir.path().join("store").display()),
        url::Url::parse(&format!(
            "file://{}/store/tables/orders/",
            dir.path().display()
        ))
        .unwrap(),
        "SELECT COUNT(DISTINCT status) FROM t",
    )
    .await;
    assert!(single_i64(&n) >= 2, "orders move through their lifecycle");
}
