//! The forecast job end to end in-process: orders ingested into a real engine on a
//! local store, the job run twice, `forecasts` read back through SQL, and a second
//! engine on the same store finding the table.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, StringArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use quiver_engine::{Engine, EngineConfig, EngineMetrics, StreamSchema};
use quiver_ingest::{Format, decode};

use super::*;

fn config(store: &std::path::Path, wal: &std::path::Path) -> EngineConfig {
    let mut c = EngineConfig::new(format!("file://{}", store.display()), wal);
    c.upkeep_interval = Duration::ZERO;
    c.table_refresh_interval = Duration::from_millis(200);
    c
}

/// 70 days of order lines before `today` plus some on `today`:
/// - SKU-1 in W1 sells 5 paid units a day; 50 cancelled units a day and 100 units
///   today must not count, so its history is constant;
/// - SKU-2 in W1 sells a weekly pattern (3 + weekday);
/// - SKU-3 in W2 sold for the first 20 days only, so it has stopped.
fn history(today: NaiveDate) -> String {
    let mut lines = Vec::new();
    let mut n = 0;
    let mut line = |day: NaiveDate, sku: &str, wh: &str, qty: i64, status: &str| {
        n += 1;
        lines.push(format!(
            r#"{{"event_id":"e{n}","event_time":"{day}T12:00:00Z","order_id":"o{n}","customer_id":"c1","warehouse_id":"{wh}","sku":"{sku}","quantity":{qty},"unit_price":"9.99","status":"{status}","channel":"web"}}"#
        ));
    };
    for back in 1..=70 {
        let day = today - chrono::Duration::days(back);
        line(day, "SKU-1", "W1", 5, "paid");
        line(day, "SKU-1", "W1", 50, "cancelled");
        line(day, "SKU-2", "W1", 3 + (back % 7), "paid");
        if back > 50 {
            line(day, "SKU-3", "W2", 4, "paid");
        }
    }
    line(today, "SKU-1", "W1", 100, "paid");
    lines.join("\n")
}

async fn rows(engine: &Engine, sql: &str) -> Vec<Vec<String>> {
    let batches = engine
        .query_session()
        .context()
        .sql(sql)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let mut out = Vec::new();
    for b in batches {
        let cols: Vec<_> = b
            .columns()
            .iter()
            .map(|c| cast(c, &DataType::Utf8).unwrap())
            .collect();
        for i in 0..b.num_rows() {
            out.push(
                cols.iter()
                    .map(|c| {
                        let s = c.as_any().downcast_ref::<StringArray>().unwrap();
                        if s.is_null(i) {
                            "NULL".into()
                        } else {
                            s.value(i).to_owned()
                        }
                    })
                    .collect(),
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forecasts_are_written_whole_read_by_sql_and_replaced_by_the_next_run() {
    let store = tempfile::tempdir().unwrap();
    let wal = tempfile::tempdir().unwrap();
    let metrics = Arc::new(EngineMetrics::unregistered());
    let engine = Engine::open(config(store.path(), wal.path()), Arc::clone(&metrics))
        .await
        .unwrap();
    let today = NaiveDate::from_ymd_opt(2026, 12, 6).unwrap();
    let batch = decode(
        &StreamSchema::orders(),
        Format::Ndjson,
        history(today).as_bytes(),
    )
    .unwrap();
    engine.ingest("orders", batch, None).await.unwrap();

    let first = run_forecast(&engine, &DemandConfig::default(), today, 2)
        .await
        .unwrap();
    assert_eq!(first.series, 3);
    assert_eq!(first.rows, 3 * 14);
    assert_eq!(
        first.history_end,
        NaiveDate::from_ymd_opt(2026, 12, 5).unwrap()
    );

    let per_series = rows(
        &engine,
        "SELECT sku, warehouse_id, count(*), min(date), max(date), count(DISTINCT run_id), \
         min(model), min(fallback), max(yhat) FROM forecasts GROUP BY sku, warehouse_id \
         ORDER BY sku",
    )
    .await;
    let day = |s: &str| s.to_owned();
    assert_eq!(per_series.len(), 3, "{per_series:?}");
    for r in &per_series {
        assert_eq!(r[2], "14", "{r:?}");
        assert_eq!(
            (r[3].as_str(), r[4].as_str()),
            ("2026-12-06", "2026-12-19"),
            "{r:?}"
        );
        assert_eq!(r[5], "1", "{r:?}");
    }
    // Constant 5 a day: the cancelled lines and today's 100 were left out.
    assert_eq!(
        per_series[0][7..],
        [day("constant"), day("5.0")],
        "{per_series:?}"
    );
    // A weekly pattern gets a chosen model, not a fallback.
    assert_eq!(per_series[1][7], "NULL", "{per_series:?}");
    assert!(["mstl_ets", "seasonal_naive"].contains(&per_series[1][6].as_str()));
    assert_eq!(
        per_series[2][7..],
        [day("stopped"), day("0.0")],
        "{per_series:?}"
    );

    // A second run replaces the rows in one commit: the same count, one run id.
    let second = run_forecast(&engine, &DemandConfig::default(), today, 2)
        .await
        .unwrap();
    assert_eq!(second.version, first.version + 1);
    let after = rows(
        &engine,
        "SELECT count(*), min(run_id), max(run_id) FROM forecasts",
    )
    .await;
    assert_eq!(
        after,
        vec![vec![
            day("42"),
            second.run_id.clone(),
            second.run_id.clone()
        ]]
    );

    // Another engine on the same store finds the table when it opens.
    let wal2 = tempfile::tempdir().unwrap();
    let other = Engine::open(config(store.path(), wal2.path()), metrics)
        .await
        .unwrap();
    assert_eq!(other.result_tables(), vec!["forecasts".to_owned()]);
    let seen = rows(&other, "SELECT count(*), min(run_id) FROM forecasts").await;
    assert_eq!(seen, vec![vec![day("42"), second.run_id.clone()]]);

    // A stream's name is refused.
    let err = engine
        .replace_result_table("orders", vec![])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("stream or a view"), "{err}");
    other.shutdown().await.unwrap();
    engine.shutdown().await.unwrap();
}
