//! Crash safety: SIGKILL at random moments during sustained ingest, many times over.
//! After each restart every acknowledged event is stored exactly once and no request
//! is half stored.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use crate::common::*;

const EVENTS_PER_REQUEST: usize = 40;
const WRITERS: usize = 4;
const ROUNDS: usize = 10;

#[derive(Debug, Default)]
struct Ledger {
    /// request id → whether the server said 200.
    requests: HashMap<String, bool>,
}

fn body(request: &str) -> String {
    (0..EVENTS_PER_REQUEST)
        .map(|i| order_line(&format!("{request}-e{i}"), "2026-11-25T10:00:00Z", "paid"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn kill_9_during_ingest_loses_nothing_acknowledged_and_stores_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start(
        dir.path(),
        &["--flush-interval", "100ms", "--wal-segment-bytes", "32768"],
    )
    .await;
    let ledger: Shared<Ledger> = Arc::default();
    for round in 0..ROUNDS {
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let url = format!("{}/v1/streams/orders/events", s.url);
            let client = s.client.clone();
            let ledger = Arc::clone(&ledger);
            writers.push(tokio::spawn(async move {
                for q in 0.. {
                    let id = format!("r{round}-w{w}-q{q}");
                    ledger.lock().requests.insert(id.clone(), false);
                    let r = client
                        .post(&url)
                        .bearer_auth(ADMIN)
                        .header("content-type", "application/x-ndjson")
                        .body(body(&id))
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == 200 => {
                            ledger.lock().requests.insert(id, true);
                        }
                        _ => break,
                    }
                }
            }));
        }
        let wait = rand::rng().random_range(150..1200);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        s.kill9();
        for w in writers {
            let _ = w.await;
        }
        s.restart().await;
    }
    assert_eq!(s.terminate(), Some(0), "log:\n{}", s.log());

    let rows = query_table(
        &s.store,
        s.table_url("orders"),
        "SELECT event_id, CAST(COUNT(*) AS VARCHAR) FROM t GROUP BY event_id",
    )
    .await;
    let ids = strings(&rows, 0);
    let counts = strings(&rows, 1);
    let stored: HashMap<String, usize> = ids
        .into_iter()
        .zip(counts.iter().map(|c| c.parse::<usize>().unwrap()))
        .collect();
    let dupes: Vec<_> = stored.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        dupes.is_empty(),
        "stored twice: {:?}",
        &dupes[..dupes.len().min(5)]
    );

    let ledger = ledger.lock();
    let acked = ledger.requests.values().filter(|a| **a).count();
    assert!(
        acked > ROUNDS * 2,
        "enough load was applied: {acked} requests acknowledged"
    );
    for (request, was_acked) in &ledger.requests {
        let present = (0..EVENTS_PER_REQUEST)
            .filter(|i| stored.contains_key(&format!("{request}-e{i}")))
            .count();
        if *was_acked {
            assert_eq!(
                present, EVENTS_PER_REQUEST,
                "acknowledged request {request} lost events"
            );
        } else {
            assert!(
                present == 0 || present == EVENTS_PER_REQUEST,
                "request {request} half stored: {present} of {EVENTS_PER_REQUEST}"
            );
        }
    }
    let total_stored: usize = stored.len();
    assert!(total_stored >= acked * EVENTS_PER_REQUEST);
}
