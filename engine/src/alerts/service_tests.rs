//! Rules running in a real engine, on a clock the tests move by hand: evaluated on the
//! view's change sets, timed by FOR and KEEP FIRING FOR, kept across a restart, readable
//! over SQL.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, Decimal128Array, Int64Array, StringArray, TimestampMicrosecondArray};
use arrow::record_batch::RecordBatch;
use futures::StreamExt as _;

use super::{AlertState, Clock, parse_create_alert};
use crate::query::Prepared;
use crate::schema::StreamSchema;
use crate::{Engine, EngineConfig, EngineMetrics};

const STOCK: &str = include_str!("../../../sql/kpis/03_stock_on_hand.sql");
const START_MS: i64 = 1_800_000_000_000;

fn config(store: &str, wal: &std::path::Path, clock: &Clock) -> EngineConfig {
    let mut c = EngineConfig::new(store, wal);
    c.upkeep_interval = Duration::ZERO;
    c.views.definitions = vec![STOCK.to_owned()];
    c.alerts.clock = clock.clone();
    c
}

async fn open(store: &str, wal: &std::path::Path, clock: &Clock) -> Engine {
    Engine::open(
        config(store, wal, clock),
        Arc::new(EngineMetrics::unregistered()),
    )
    .await
    .unwrap()
}

/// One inventory movement per (sku, warehouse, quantity).
fn movements(seq: &mut u64, rows: &[(&str, &str, i64)]) -> RecordBatch {
    let ids: Vec<String> = rows
        .iter()
        .map(|_| {
            *seq += 1;
            format!("m{seq}")
        })
        .collect();
    RecordBatch::try_new(
        Arc::clone(StreamSchema::inventory().input_schema()),
        vec![
            Arc::new(StringArray::from(ids)),
            Arc::new(
                TimestampMicrosecondArray::from(vec![START_MS * 1000; rows.len()])
                    .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
            Arc::new(StringArray::from(vec!["adjustment"; rows.len()])),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
            Arc::new(
                Decimal128Array::from(vec![None::<i128>; rows.len()])
                    .with_precision_and_scale(18, 2)
                    .unwrap(),
            ),
        ],
    )
    .unwrap()
}

async fn move_stock(engine: &Engine, seq: &mut u64, rows: &[(&str, &str, i64)]) {
    engine
        .ingest("inventory", movements(seq, rows), None)
        .await
        .unwrap();
    engine.views().views_settled().await;
}

/// Waits (in real time) until `check` holds; the evaluator runs on its own task.
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn key_states(engine: &Engine, alert: &str) -> Vec<(String, AlertState)> {
    engine
        .alerts()
        .get(alert)
        .unwrap()
        .keys
        .into_iter()
        .map(|k| (k.key, k.state))
        .collect()
}

fn told(engine: &Engine) -> Vec<(String, AlertState)> {
    let mut n = engine.alerts().notifications(false, 100);
    n.reverse();
    n.into_iter()
        .map(|n| (n.key.to_string(), n.state))
        .collect()
}

async fn sql(engine: &Engine, query: &str) -> Vec<RecordBatch> {
    let session = engine.query_session();
    let Prepared::Query(plan) = session.prepare(query, &[]).await.unwrap() else {
        panic!("not a query: {query}");
    };
    let mut stream = session.execute(*plan).await.unwrap();
    let mut out = Vec::new();
    while let Some(b) = stream.next().await {
        out.push(b.unwrap());
    }
    out
}

const K1: &str = r#"{"sku":"S1","warehouse_id":"W1"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_goes_pending_firing_resolved_and_a_restart_does_not_fire_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", dir.path().join("store").display());
    let wal = dir.path().join("wal");
    let clock = Clock::manual(START_MS);
    let engine = open(&store, &wal, &clock).await;
    let rule = parse_create_alert(
        "CREATE ALERT low ON stock_on_hand WHERE on_hand < 5 FOR 1m KEEP FIRING FOR 30s",
    )
    .unwrap();
    engine.alerts().create(&engine, rule, false).await.unwrap();
    let mut seq = 0;
    move_stock(&engine, &mut seq, &[("S1", "W1", 10), ("S2", "W1", 10)]).await;
    move_stock(&engine, &mut seq, &[("S1", "W1", -7)]).await;
    until("S1 pending", || {
        key_states(&engine, "low") == [(K1.to_owned(), AlertState::Pending)]
    })
    .await;
    clock.advance(Duration::from_secs(59));
    engine.alerts().wake();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(told(&engine).is_empty(), "nothing before FOR ran out");
    clock.advance(Duration::from_secs(2));
    engine.alerts().wake();
    until("S1 firing", || told(&engine).len() == 1).await;
    assert_eq!(told(&engine), [(K1.to_owned(), AlertState::Firing)]);

    // Down and up again while firing: the key carries on firing, nothing is sent again.
    engine.shutdown().await.unwrap();
    drop(engine);
    let engine = open(&store, &wal, &clock).await;
    until("the rule loaded", || {
        key_states(&engine, "low") == [(K1.to_owned(), AlertState::Firing)]
    })
    .await;
    engine.alerts().wake();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(told(&engine), [(K1.to_owned(), AlertState::Firing)]);

    // Back above the line: resolved only once KEEP FIRING FOR has run out, counted from
    // when the evaluator saw the row leave (it runs on its own task).
    move_stock(&engine, &mut seq, &[("S1", "W1", 10)]).await;
    until("S1 seen leaving", || {
        engine.alerts().get("low").unwrap().keys[0].left == Some(START_MS + 61_000)
    })
    .await;
    clock.advance(Duration::from_secs(29));
    engine.alerts().wake();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(told(&engine).len(), 1);
    clock.advance(Duration::from_secs(2));
    engine.alerts().wake();
    until("S1 resolved", || told(&engine).len() == 2).await;
    assert_eq!(told(&engine)[1], (K1.to_owned(), AlertState::Resolved));
    assert!(key_states(&engine, "low").is_empty());

    // Both surfaces of SQL: the notifications table and SHOW ALERTS.
    let rows = sql(
        &engine,
        "SELECT alert, state, key FROM notifications ORDER BY id",
    )
    .await;
    let states: Vec<String> = rows
        .iter()
        .flat_map(|b| {
            let s = b.column(1).as_any().downcast_ref::<StringArray>().unwrap();
            (0..s.len())
                .map(|i| s.value(i).to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(states, ["firing", "resolved"]);
    let shown = sql(&engine, "SHOW ALERTS").await;
    assert_eq!(shown.iter().map(RecordBatch::num_rows).sum::<usize>(), 1);
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_flapping_inside_for_tells_nobody() {
    let wal = tempfile::tempdir().unwrap();
    let clock = Clock::manual(START_MS);
    let engine = open("memory://", wal.path(), &clock).await;
    let rule =
        parse_create_alert("CREATE ALERT low ON stock_on_hand WHERE on_hand < 5 FOR 1m").unwrap();
    engine.alerts().create(&engine, rule, false).await.unwrap();
    let mut seq = 0;
    move_stock(&engine, &mut seq, &[("S1", "W1", 10)]).await;
    for _ in 0..5 {
        move_stock(&engine, &mut seq, &[("S1", "W1", -7)]).await;
        until("pending", || !key_states(&engine, "low").is_empty()).await;
        clock.advance(Duration::from_secs(40));
        move_stock(&engine, &mut seq, &[("S1", "W1", 7)]).await;
        until("left", || key_states(&engine, "low").is_empty()).await;
        clock.advance(Duration::from_secs(40));
        engine.alerts().wake();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(told(&engine).is_empty(), "{:?}", told(&engine));
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rules_are_refused_with_the_reason() {
    let wal = tempfile::tempdir().unwrap();
    let engine = open("memory://", wal.path(), &Clock::manual(START_MS)).await;
    for (sql, says) in [
        (
            "CREATE ALERT a ON nowhere WHERE x > 1",
            "there is no view 'nowhere'",
        ),
        (
            "CREATE ALERT a ON stock_on_hand WHERE quantity < 5",
            "quantity",
        ),
        (
            "CREATE ALERT a ON stock_on_hand WHERE last_movement < true",
            "stock_on_hand",
        ),
        (
            "CREATE ALERT a ON stock_on_hand WHERE on_hand",
            "not true or false",
        ),
        (
            "CREATE ALERT a ON stock_on_hand WHERE on_hand < 1 NOTIFY webhook 'http://x/' SECRET 'whsec_c2hvcnQ='",
            "16 bytes",
        ),
    ] {
        let rule = parse_create_alert(sql).unwrap();
        let e = engine
            .alerts()
            .create(&engine, rule, false)
            .await
            .expect_err(sql)
            .to_string();
        assert!(e.contains(says), "{sql}: {e}");
    }
    let ok = parse_create_alert("CREATE ALERT a ON stock_on_hand WHERE on_hand < 1").unwrap();
    engine
        .alerts()
        .create(&engine, ok.clone(), false)
        .await
        .unwrap();
    let again = engine
        .alerts()
        .create(&engine, ok.clone(), false)
        .await
        .expect_err("twice")
        .to_string();
    assert!(again.contains("already exists"), "{again}");
    assert!(!engine.alerts().create(&engine, ok, true).await.unwrap().1);
    engine.shutdown().await.unwrap();
}
