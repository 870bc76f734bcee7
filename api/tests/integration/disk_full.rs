//! A full WAL disk: ingest answers 503 with Retry-After, loses and corrupts nothing, and
//! recovers by itself once flushes free log segments.

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

/// A tiny tmpfs, unmounted on drop (needs root, as on CI and the dev machines).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(path: &std::path::Path, bytes: u64) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount")
            .success();
        assert!(ok, "mounting a tmpfs needs root");
        Self(path.to_owned())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn request(id: usize) -> String {
    (0..60)
        .map(|i| order_line(&format!("df-{id}-{i}"), "2026-11-25T10:00:00Z", "paid"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn full_wal_disk_answers_503_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let wal = dir.path().join("wal");
    let _disk = SmallDisk::mount(&wal, 1 << 20);
    let mut s = TestServer::start(
        dir.path(),
        &["--wal-segment-bytes", "65536", "--flush-interval", "2s"],
    )
    .await;

    let mut acked = HashSet::new();
    let mut refused = 0;
    let mut id = 0;
    // Fill the disk faster than flushes free it.
    while refused == 0 && id < 400 {
        let r = s.post("orders", "application/x-ndjson", request(id)).await;
        match r.status().as_u16() {
            200 => {
                acked.insert(id);
            }
            503 => {
                assert!(r.headers().get("retry-after").is_some());
                let body: serde_json::Value = r.json().await.unwrap();
                assert!(
                    body["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("disk is full"),
                    "{body}"
                );
                refused += 1;
            }
            other => panic!("unexpected status {other}: {}", r.text().await.unwrap()),
        }
        id += 1;
    }
    assert!(refused > 0, "the disk never filled");
    assert!(!acked.is_empty());

    // Once flushes commit and delete segments, writes are taken again.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = s.post("orders", "application/x-ndjson", request(id)).await;
        if r.status() == 200 {
            acked.insert(id);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ingest did not recover after the disk freed up"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        id += 1;
    }

    // A crash now replays a log that was never corrupted by the failed writes.
    s.restart().await;
    assert_eq!(s.terminate(), Some(0), "log:\n{}", s.log());
    let rows = query_table(&s.store, s.table_url("orders"), "SELECT event_id FROM t").await;
    let stored: Vec<String> = strings(&rows, 0);
    let unique: HashSet<&String> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len(), "nothing stored twice");
    for a in &acked {
        for i in 0..60 {
            assert!(
                unique.contains(&format!("df-{a}-{i}")),
                "acknowledged df-{a}-{i} lost"
            );
        }
    }
}
