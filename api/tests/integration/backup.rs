//! Backups and recovery with the real binary: `quiver backup` (incremental, listed,
//! verified), `quiver restore` (latest, to a point in time, refusing a corrupted or
//! incomplete backup and a non-empty store), `quiver verify`, a backup to S3
//! (moto), and the disaster-recovery drill: scheduled backups under continuous ingest,
//! kill -9, store and WAL deleted, restore, start, and exactly the events acknowledged
//! before the last backup's cut present once.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{ADMIN, TestServer, eventually, metric, order_line};

/// Runs `quiver <args>` with `env`; stdout on success, stderr as the error.
fn quiver(args: &[&str], env: &[(&str, &str)]) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args(args)
        .envs(env.iter().copied())
        .env("QUIVER_LOG", "warn")
        .output()
        .expect("quiver runs");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Sends `n` orders with ids `<prefix>-<i>` in one request.
async fn send(server: &TestServer, prefix: &str, n: usize) {
    let body: Vec<String> = (0..n)
        .map(|i| order_line(&format!("{prefix}-{i}"), "2026-11-25T10:00:00Z", "paid"))
        .collect();
    let r = server
        .client
        .post(format!("{}/v1/streams/orders/events", server.url))
        .bearer_auth(ADMIN)
        .header("content-type", "application/x-ndjson")
        .body(body.join("\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// Waits until the `orders` table (not the buffer) holds `n` events.
async fn flushed(server: &TestServer, n: u64) {
    eventually(30, || async {
        server.stream_info("orders").await["stored_events"].as_u64() == Some(n)
    })
    .await;
}

async fn count(server: &TestServer, sql: &str) -> i64 {
    server.sql_rows(sql).await[0][0].as_i64().unwrap()
}

fn manifests(dir: &Path) -> Vec<Value> {
    let mut out: Vec<Value> = std::fs::read_dir(dir.join("backups"))
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path().join("manifest.json");
            serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
        })
        .collect();
    out.sort_by_key(|m| m["id"].as_str().unwrap().to_owned());
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_is_incremental_restores_to_a_point_in_time_and_refuses_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), &[]).await;
    let store = server.store.clone();
    let to = format!("file://{}", dir.path().join("backups").display());
    send(&server, "first", 300).await;
    flushed(&server, 300).await;
    let out = quiver(&["backup", "--store", &store, "--to", &to], &[]).unwrap();
    assert!(out.starts_with("backup "), "{out}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let between = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    send(&server, "second", 200).await;
    flushed(&server, 500).await;
    quiver(&["backup", "--store", &store, "--to", &to], &[]).unwrap();

    // Two backups; the second copied only what was new.
    let backups = dir.path().join("backups");
    let list = manifests(&backups);
    assert_eq!(list.len(), 2);
    let total: u64 = list[1]["files"]
        .as_object()
        .unwrap()
        .values()
        .map(|f| f["size"].as_u64().unwrap())
        .sum();
    let copied = list[1]["copied_bytes"].as_u64().unwrap();
    assert!(copied < total / 2, "copied {copied} of {total} bytes");
    assert!(
        list[1]["tables"]["orders"]["version"].as_u64()
            > list[0]["tables"]["orders"]["version"].as_u64()
    );
    let listed = quiver(&["backup", "list", "--to", &to], &[]).unwrap();
    for m in &list {
        assert!(listed.contains(m["id"].as_str().unwrap()), "{listed}");
    }
    quiver(&["verify", "--store", &store], &[]).unwrap();
    let verified = quiver(&["verify", "--backups", &to], &[]).unwrap();
    assert_eq!(verified.lines().count(), 2, "{verified}");

    // The latest backup, restored and served by a new server with a new WAL.
    let restored = dir.path().join("r1");
    let r1 = format!("file://{}", restored.join("store").display());
    quiver(&["restore", "--from", &to, "--store", &r1], &[]).unwrap();
    let again = TestServer::start(&restored, &[]).await;
    assert_eq!(count(&again, "SELECT count(*) FROM orders").await, 500);
    assert_eq!(
        count(&again, "SELECT count(DISTINCT event_id) FROM orders").await,
        500
    );
    view_equals_recompute(&again, 500).await;
    drop(again);

    // To a point in time between the two ingests: the first 300 only.
    let pitr = dir.path().join("r2");
    let r2 = format!("file://{}", pitr.join("store").display());
    let at = between.to_rfc3339();
    let out = quiver(
        &["restore", "--from", &to, "--store", &r2, "--at", &at],
        &[],
    )
    .unwrap();
    assert!(out.contains("orders at version"), "{out}");
    let old = TestServer::start(&pitr, &[]).await;
    assert_eq!(count(&old, "SELECT count(*) FROM orders").await, 300);
    assert_eq!(
        count(
            &old,
            "SELECT count(*) FROM orders WHERE event_id LIKE 'second-%'"
        )
        .await,
        0
    );
    drop(old);

    // Not into a store that holds something.
    let err = quiver(&["restore", "--from", &to, "--store", &r2], &[]).unwrap_err();
    assert!(err.contains("is not empty"), "{err}");

    // A corrupted file is named, by verify and by restore; so is a missing one.
    let parquet = std::fs::read_dir(backups.join("objects/tables/orders"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.is_dir()
                && p.file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .starts_with("event_date")
        })
        .map(|d| {
            std::fs::read_dir(d)
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .path()
        })
        .expect("a data file in the backup");
    let name = parquet.file_name().unwrap().to_str().unwrap().to_owned();
    let mut bytes = std::fs::read(&parquet).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&parquet, &bytes).unwrap();
    let err = quiver(&["verify", "--backups", &to], &[]).unwrap_err();
    assert!(err.contains(&name) && err.contains("corrupted"), "{err}");
    let r3 = format!("file://{}", dir.path().join("r3/store").display());
    let err = quiver(&["restore", "--from", &to, "--store", &r3], &[]).unwrap_err();
    assert!(err.contains(&name) && err.contains("corrupted"), "{err}");
    std::fs::remove_file(&parquet).unwrap();
    let err = quiver(&["restore", "--from", &to, "--store", &r3], &[]).unwrap_err();
    assert!(err.contains(&name) && err.contains("missing"), "{err}");

    // verify --store names a data file a table references and the store lost.
    let live = dir.path().join("store/tables/orders");
    let lost = walk(&live)
        .into_iter()
        .find(|p| {
            p.extension().is_some_and(|e| e == "parquet")
                && !p.to_str().unwrap().contains("_delta_log")
        })
        .unwrap();
    std::fs::remove_file(&lost).unwrap();
    let err = quiver(&["verify", "--store", &store], &[]).unwrap_err();
    assert!(
        err.contains(lost.file_name().unwrap().to_str().unwrap()) && err.contains("missing"),
        "{err}"
    );
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// An acknowledged request: when, and its event ids.
type Acked = (chrono::DateTime<chrono::Utc>, Vec<String>);

#[tokio::test(flavor = "multi_thread")]
async fn disaster_recovery_drill() {
    let dir = tempfile::tempdir().unwrap();
    let to = format!("file://{}", dir.path().join("backups").display());
    let store = format!("file://{}", dir.path().join("store").display());
    let target = format!("file://{}", dir.path().join("recovered/store").display());
    drill(dir.path(), &store, &to, &target, &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn disaster_recovery_drill_on_s3() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = crate::s3::start_s3(dir.path()).await;
    let env = crate::s3::s3_env(&s3.endpoint);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    drill(
        dir.path(),
        "s3://quiver-test/drill-store",
        "s3://quiver-test/drill-backups",
        "s3://quiver-test/drill-restored",
        &env,
    )
    .await;
}

/// Deletes everything under the store `url` (a folder, or a prefix of moto's S3).
fn destroy(url: &str, env: &[(&str, &str)]) {
    if let Some(path) = url.strip_prefix("file://") {
        std::fs::remove_dir_all(path).unwrap();
        return;
    }
    let (bucket, prefix) = url.trim_start_matches("s3://").split_once('/').unwrap();
    let script = "import boto3, os, sys\n\
        s3 = boto3.resource('s3', endpoint_url=os.environ['AWS_ENDPOINT_URL'])\n\
        b = s3.Bucket(sys.argv[1])\n\
        b.objects.filter(Prefix=sys.argv[2] + '/').delete()\n\
        assert not list(b.objects.filter(Prefix=sys.argv[2] + '/'))\n";
    let out = Command::new("python3")
        .args(["-c", script, bucket, prefix])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The drill: scheduled backups every 2 s of `store` to `to` under continuous ingest,
/// kill -9, the store and the WAL destroyed, the latest backup restored into `target`
/// and served; then exactly the events acknowledged before its cut, once each.
async fn drill(dir: &Path, store: &str, to: &str, target: &str, env: &[(&str, &str)]) {
    let mut server = TestServer::start_with(
        dir,
        store,
        &["--backup-to", to, "--backup-schedule", "*/2 * * * * *"],
        env,
    )
    .await;
    // Continuous ingest: each request's ids and when it was acknowledged.
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let (acked, stop) = (Arc::clone(&acked), Arc::clone(&stop));
        let (client, url) = (server.client.clone(), server.url.clone());
        tokio::spawn(async move {
            let mut q = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                q += 1;
                let ids: Vec<String> = (0..20).map(|i| format!("dr-{q}-{i}")).collect();
                let body: Vec<String> = ids
                    .iter()
                    .map(|id| order_line(id, "2026-11-25T10:00:00Z", "paid"))
                    .collect();
                let r = client
                    .post(format!("{url}/v1/streams/orders/events"))
                    .bearer_auth(ADMIN)
                    .header("content-type", "application/x-ndjson")
                    .body(body.join("\n"))
                    .send()
                    .await;
                if matches!(&r, Ok(r) if r.status() == 200) {
                    acked.lock().unwrap().push((chrono::Utc::now(), ids));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // At least three scheduled backups, then a little more ingest, then disaster.
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(
        &server.metrics_text().await,
        "quiver_backup_succeeded_total",
    ) < 3.0
    {
        if Instant::now() > deadline {
            let log = server.log();
            let lines: Vec<&str> = log.lines().filter(|l| l.contains("backup")).collect();
            panic!(
                "fewer than 3 backups in 60 s; backup log lines:\n{}",
                lines.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.kill9();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sender.await;
    destroy(store, env);
    std::fs::remove_dir_all(dir.join("wal")).unwrap();

    // Restore the latest backup into a new store and start on it: the RTO.
    let listed = quiver(&["backup", "list", "--to", to, "--json"], env).unwrap();
    let last: Value = serde_json::from_str(listed.lines().last().unwrap()).unwrap();
    let cut: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(last["complete_before"].clone()).expect("a scheduled backup's cut");
    let recovered = dir.join("recovered");
    std::fs::create_dir_all(&recovered).unwrap();
    let rto = Instant::now();
    quiver(&["restore", "--from", to, "--store", target], env).unwrap();
    let back = TestServer::start_with(&recovered, target, &[], env).await;
    let rto = rto.elapsed();

    let present: BTreeSet<String> = back
        .sql_rows("SELECT event_id FROM orders")
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[0].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        count(&back, "SELECT count(*) FROM orders").await as usize,
        present.len(),
        "an event stored twice"
    );
    let acked: Vec<Acked> = std::mem::take(&mut *acked.lock().unwrap());
    let mut before_cut = 0;
    let sent: BTreeSet<&str> = acked
        .iter()
        .flat_map(|(_, ids)| ids.iter().map(String::as_str))
        .collect();
    for (at, ids) in &acked {
        if *at < cut {
            for id in ids {
                assert!(
                    present.contains(id),
                    "{id}, acknowledged before the cut, is lost"
                );
                before_cut += 1;
            }
        }
    }
    // Nothing that was not acknowledged: what a backup holds was flushed, and a flush
    // follows the acknowledgement.
    for id in &present {
        assert!(
            sent.contains(id.as_str()),
            "{id} is present but was never acknowledged"
        );
    }
    assert!(before_cut > 100, "only {before_cut} events before the cut");
    let last_ack = acked.iter().map(|(at, _)| *at).max().unwrap();
    let rpo = (last_ack - cut).to_std().unwrap_or_default();
    println!(
        "drill on {store}: {} events acknowledged, {before_cut} before the cut, {} restored; \
         RPO {:.2} s (last acknowledgement to the backup's cut), RTO {:.2} s (restore and start to ready)",
        sent.len(),
        present.len(),
        rpo.as_secs_f64(),
        rto.as_secs_f64()
    );
    view_equals_recompute(&back, present.len() as i64).await;
}

/// The views built on the restored table (`orders_current`, then `orders_by_status`
/// over it) equal the same SQL run from scratch, and hold `lines` order lines.
async fn view_equals_recompute(server: &TestServer, lines: i64) {
    let scratch_sql = "SELECT status, count(*) AS lines FROM (SELECT DISTINCT ON (order_id, sku) \
                       order_id, sku, status FROM orders ORDER BY order_id, sku, event_time DESC) \
                       GROUP BY status ORDER BY status";
    // The views are filled from the restored table as the server starts.
    let mut tries = 0;
    loop {
        let view = server
            .sql_rows("SELECT status, lines FROM orders_by_status ORDER BY status")
            .await;
        let scratch = server.sql_rows(scratch_sql).await;
        let total: i64 = view
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r[1].as_i64().unwrap())
            .sum();
        if (view == scratch && total == lines) || tries == 50 {
            assert_eq!(view, scratch);
            assert_eq!(total, lines);
            return;
        }
        tries += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_to_s3_and_restore_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = crate::s3::start_s3(dir.path()).await;
    let env = crate::s3::s3_env(&s3.endpoint);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = TestServer::start(dir.path(), &[]).await;
    send(&server, "s3", 250).await;
    flushed(&server, 250).await;
    let to = "s3://quiver-test/backups";
    let copied = |out: String| -> u64 {
        let tail = out.rsplit("copied ").next().unwrap().to_owned();
        tail.split(", ")
            .nth(1)
            .unwrap()
            .trim_end_matches(" bytes\n")
            .parse()
            .unwrap()
    };
    let first = copied(quiver(&["backup", "--store", &server.store, "--to", to], &env).unwrap());
    // A second backup with nothing new copies only what is rewritten in place.
    let second = copied(quiver(&["backup", "--store", &server.store, "--to", to], &env).unwrap());
    assert!(second * 4 < first, "copied {first} then {second} bytes");
    let listed = quiver(&["backup", "list", "--to", to], &env).unwrap();
    assert_eq!(listed.lines().count(), 2, "{listed}");
    quiver(&["verify", "--backups", to], &env).unwrap();
    drop(server);
    // Into an S3 store, then served from it.
    let target = "s3://quiver-test/restored";
    quiver(&["restore", "--from", to, "--store", target], &env).unwrap();
    quiver(&["verify", "--store", target], &env).unwrap();
    let back_dir = dir.path().join("back");
    std::fs::create_dir_all(&back_dir).unwrap();
    let back = TestServer::start_with(&back_dir, target, &[], &env).await;
    assert_eq!(
        count(&back, "SELECT count(DISTINCT event_id) FROM orders").await,
        250
    );
}
