//! The jobs end to end in-process: orders and stock ingested into a real engine on a
//! local store, the jobs run, their tables read back through SQL, and a second engine
//! on the same store finding them.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, StringArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use quiver_engine::{Engine, EngineConfig, EngineMetrics, StreamSchema};
use quiver_ingest::{Format, decode};

use super::*;
use crate::demand::DemandConfig;

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

/// Stock: SKU-1/W1 has 30 units (five days of its constant 5 a day), SKU-2/W1 has
/// 1,000 (far more than two weeks of sales); SKU-3/W2 has no movements at all.
fn stock(today: NaiveDate) -> String {
    [("SKU-1", 40), ("SKU-1", -10), ("SKU-2", 1000)]
        .iter()
        .enumerate()
        .map(|(n, (sku, qty))| {
            let kind = if *qty > 0 { "receipt" } else { "adjustment" };
            format!(
                r#"{{"event_id":"i{n}","event_time":"{today}T01:00:00Z","sku":"{sku}","warehouse_id":"W1","kind":"{kind}","quantity":{qty},"unit_cost":"2.50"}}"#
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn at_noon(day: NaiveDate) -> DateTime<Utc> {
    day.and_hms_opt(12, 0, 0).unwrap().and_utc()
}

async fn forecast(engine: &Engine, today: NaiveDate) -> RunSummary {
    let s = run_job(
        engine,
        &Run::new(JobKind::Forecast),
        &JobConfig {
            threads: 2,
            ..JobConfig::default()
        },
        at_noon(today),
    )
    .await;
    assert_eq!(s.state, RunState::Succeeded, "{s:?}");
    s
}

/// An engine on a fresh local store.
async fn open(store: &tempfile::TempDir, wal: &tempfile::TempDir) -> Engine {
    Engine::open(
        config(store.path(), wal.path()),
        Arc::new(EngineMetrics::unregistered()),
    )
    .await
    .unwrap()
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
    let batch = decode(
        &StreamSchema::inventory(),
        Format::Ndjson,
        stock(today).as_bytes(),
    )
    .unwrap();
    engine.ingest("inventory", batch, None).await.unwrap();

    let first = forecast(&engine, today).await;
    assert_eq!(first.series, 3);
    assert_eq!(first.rows, 3 * 14);
    assert_eq!(DemandConfig::default().horizon, 14);
    assert_eq!(
        first.history_end,
        Some(NaiveDate::from_ymd_opt(2026, 12, 5).unwrap())
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
    assert!(
        ["mstl_ets", "ridge_features", "seasonal_naive"].contains(&per_series[1][6].as_str()),
        "{per_series:?}"
    );
    assert_eq!(
        per_series[2][7..],
        [day("stopped"), day("0.0")],
        "{per_series:?}"
    );

    // Stock-out risk: 30 units at 5 a day run out on the sixth day, for sure (a
    // constant series has no spread); 1,000 units outlast two weeks; nothing on hand is
    // out on the first day.
    let risk = rows(
        &engine,
        "SELECT sku, on_hand, days_of_cover, stockout_date, stockout_probability \
         FROM stockout_risk ORDER BY sku",
    )
    .await;
    assert_eq!(
        risk[0],
        ["SKU-1", "30.0", "6.0", "2026-12-11", "1.0"].map(day),
        "{risk:?}"
    );
    assert_eq!(
        (
            risk[1][0].as_str(),
            risk[1][1].as_str(),
            risk[1][3].as_str()
        ),
        ("SKU-2", "1000.0", "NULL"),
        "{risk:?}"
    );
    assert!(risk[1][4].parse::<f64>().unwrap() < 0.01, "{risk:?}");
    assert_eq!(risk[2][..2], ["SKU-3", "0.0"].map(day), "{risk:?}");

    // The fitted model of each series, with its parameters and backtest.
    let models = rows(
        &engine,
        "SELECT sku, model, fallback, params, backtest_folds FROM forecast_models ORDER BY sku",
    )
    .await;
    assert_eq!(models.len(), 3, "{models:?}");
    assert_eq!(models[0][2], "constant", "{models:?}");
    assert_eq!(models[0][3], r#"{"value":5.0}"#, "{models:?}");
    assert_eq!(models[1][2], "NULL", "{models:?}");
    assert_ne!(
        models[1][4], "NULL",
        "a chosen model has a backtest: {models:?}"
    );

    // A second run replaces the rows in one commit: the same count, one run id.
    let second = forecast(&engine, today).await;
    assert_eq!(second.tables["forecasts"], first.tables["forecasts"] + 1);
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
    assert_eq!(
        other.result_tables(),
        [
            "forecast_models",
            "forecasts",
            "model_runs",
            "stockout_risk"
        ]
        .map(String::from)
    );
    // Each run is in model_runs, and the first run's forecasts are still there as an
    // older Delta version.
    let runs = rows(
        &other,
        "SELECT run_id, kind, state, series, rows, error FROM model_runs ORDER BY started",
    )
    .await;
    assert_eq!(
        runs,
        [&first, &second].map(|s| vec![
            s.run_id.clone(),
            day("forecast"),
            day("succeeded"),
            day("3"),
            day("42"),
            day("NULL")
        ])
    );
    let seen = rows(&other, "SELECT count(*), min(run_id) FROM forecasts").await;
    assert_eq!(seen, vec![vec![day("42"), second.run_id.clone()]]);
    let first_version = first.tables["forecasts"];
    let then = rows(
        &other,
        // What `forecasts VERSION AS OF n` becomes (the rewrite is tested in the engine
        // and end to end over HTTP).
        &format!(
            "SELECT count(*), min(run_id) FROM table_at_version('forecasts', {first_version})"
        ),
    )
    .await;
    assert_eq!(then, vec![vec![day("42"), first.run_id.clone()]]);

    // A stream's name is refused.
    let err = engine
        .replace_result_table("orders", vec![])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("stream or a view"), "{err}");
    other.shutdown().await.unwrap();
    engine.shutdown().await.unwrap();
}

/// Ten days of paid order lines, one a minute per warehouse (W1–W4), following a
/// smooth daily shape with random noise, W1, W2 and W4 alternating SKU-A and SKU-B,
/// W3 selling SKU-C;
/// then three things a person would want to hear about:
/// - one minute of W1 five hours ago sold 60 units (a revenue-per-minute spike);
/// - SKU-B sold 2,000 units in W2 in one line 30 hours ago (an hourly-units spike, out
///   of the 24 h revenue-per-minute window);
/// - W3 sold nothing for the last 12 hours while the others went on (unlike its peers).
fn anomaly_history(now: DateTime<Utc>) -> (String, [DateTime<Utc>; 2]) {
    let minute = |m: i64| DateTime::from_timestamp((now.timestamp() / 60 - m) * 60, 0).unwrap();
    let spike_minute = minute(5 * 60);
    let spike_hour = minute(30 * 60);
    let mut lines = Vec::new();
    let mut line = |t: DateTime<Utc>, wh: &str, sku: &str, qty: i64| {
        let n = lines.len();
        lines.push(format!(
            r#"{{"event_id":"a{n}","event_time":"{}","order_id":"o{n}","customer_id":"c1","warehouse_id":"{wh}","sku":"{sku}","quantity":{qty},"unit_price":"9.99","status":"paid","channel":"web"}}"#,
            t.to_rfc3339()
        ));
    };
    // Noise of up to ±2 units, random so no season or trend can explain it.
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(31);
    for m in 1..=10 * 24 * 60 {
        let t = minute(m);
        let hour = f64::from(t.format("%H").to_string().parse::<u32>().unwrap());
        let base = 6.0 + 3.0 * (hour / 24.0 * std::f64::consts::TAU).sin();
        for wh in ["W1", "W2", "W3", "W4"].iter() {
            if *wh == "W3" && m <= 12 * 60 {
                continue;
            }
            let noise = f64::from(rand::Rng::random_range(&mut rng, -2_i32..=2));
            let qty = if *wh == "W1" && t == spike_minute {
                60
            } else {
                (base + noise).round() as i64
            };
            // W3 sells its own SKU, so its stop is not a level shift of the others'.
            let sku = match (*wh, m % 2) {
                ("W3", _) => "SKU-C",
                (_, 0) => "SKU-A",
                _ => "SKU-B",
            };
            line(t, wh, sku, qty);
        }
    }
    line(spike_hour, "W2", "SKU-B", 2000);
    (lines.join("\n"), [spike_minute, spike_hour])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anomalies_finds_the_spikes_and_the_warehouse_that_stopped() {
    let (store, wal) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let engine = open(&store, &wal).await;
    let now = DateTime::parse_from_rfc3339("2026-12-06T12:00:30Z")
        .unwrap()
        .with_timezone(&Utc);
    let (history, [spike_minute, spike_hour]) = anomaly_history(now);
    let batch = decode(&StreamSchema::orders(), Format::Ndjson, history.as_bytes()).unwrap();
    engine.ingest("orders", batch, None).await.unwrap();

    let run = Run::new(JobKind::Anomalies);
    let s = run_job(&engine, &run, &JobConfig::default(), now).await;
    assert_eq!(s.state, RunState::Succeeded, "{s:?}");
    assert_eq!(s.run_id, run.id);
    // Four warehouses by minute, three SKUs by hour, four warehouses by hour.
    assert_eq!(s.series, 11, "{s:?}");

    let found = rows(
        &engine,
        "SELECT kind, coalesce(warehouse_id, sku), time, end_time, value, expected, reason \
         FROM anomalies ORDER BY kind, time",
    )
    .await;
    let of = |kind: &str| -> Vec<&Vec<String>> { found.iter().filter(|r| r[0] == kind).collect() };
    let stamp = |t: DateTime<Utc>| t.format("%Y-%m-%dT%H:%M:%SZ").to_string();

    // The minute spike is found where it was put, with its value and a lower expected
    // one; W2, which had nothing unusual within the last day, has no point flagged.
    let minutes = of("revenue_per_minute");
    let spike = minutes
        .iter()
        .find(|r| r[1] == "W1" && r[2] == stamp(spike_minute))
        .unwrap_or_else(|| panic!("the minute spike was not found: {found:?}"));
    assert_eq!(spike[4], format!("{:.1}", 60.0 * 9.99), "{spike:?}");
    assert!(spike[5].parse::<f64>().unwrap() < 150.0, "{spike:?}");
    assert!(!spike[6].is_empty());
    assert!(minutes.iter().all(|r| r[1] != "W2"), "{minutes:?}");
    // W1 has the spike only (precision): nothing else in W1 is out of band.
    assert_eq!(
        minutes.iter().filter(|r| r[1] == "W1").count(),
        1,
        "{minutes:?}"
    );

    let hours = of("hourly_units");
    let hour_start = DateTime::from_timestamp(spike_hour.timestamp() / 3600 * 3600, 0).unwrap();
    assert!(
        hours
            .iter()
            .any(|r| r[1] == "SKU-B" && r[2] == stamp(hour_start)),
        "the hourly spike was not found: {hours:?}"
    );
    // Precision: besides the spike, SKU-A and SKU-B (240 hours each, nothing unusual)
    // have at most 1% of their hours flagged. At 3.5 robust standard deviations a
    // normal remainder is past the band about once in 2,000 points; 1% leaves room for
    // the daily shape's edges and still fails if the band were too narrow.
    let false_alarms = hours
        .iter()
        .filter(|r| (r[1] == "SKU-A" || r[1] == "SKU-B") && r[2] != stamp(hour_start))
        .count();
    assert!(false_alarms <= 4, "{false_alarms} false alarms: {hours:?}");

    // W3's silence is found as unlike its peers, within the hours it was silent,
    // although W2's 2,000-unit hour is in the same window; the only other warehouse
    // called an outlier is W2, in that hour.
    let peers = of("peer_outlier");
    let silent_from = now - chrono::Duration::hours(13);
    assert!(
        peers.iter().any(|p| p[1] == "W3"),
        "W3's stop was not found: {peers:?}"
    );
    assert!(
        peers
            .iter()
            .any(|p| p[1] == "W2" && p[2] == stamp(hour_start)),
        "W2's spike hour was not found: {peers:?}"
    );
    for p in &peers {
        match p[1].as_str() {
            "W2" => assert_eq!(p[2], stamp(hour_start), "{peers:?}"),
            "W3" => assert!(
                DateTime::parse_from_rfc3339(&p[2]).unwrap() >= silent_from,
                "{p:?}"
            ),
            other => panic!("{other} called an outlier: {peers:?}"),
        }
    }

    // model_runs says what was found, by kind.
    assert_eq!(
        s.models.get("peer_outlier").copied(),
        Some(peers.len() as u64)
    );
    let recorded = rows(
        &engine,
        &format!(
            "SELECT kind, state, rows FROM model_runs WHERE run_id = '{}'",
            run.id
        ),
    )
    .await;
    assert_eq!(
        recorded,
        vec![vec![
            "anomalies".to_owned(),
            "succeeded".into(),
            s.rows.to_string()
        ]]
    );
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_run_writes_nothing_and_says_so() {
    let (store, wal) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let engine = open(&store, &wal).await;
    let today = NaiveDate::from_ymd_opt(2026, 12, 6).unwrap();
    let batch = decode(
        &StreamSchema::orders(),
        Format::Ndjson,
        history(today).as_bytes(),
    )
    .unwrap();
    engine.ingest("orders", batch, None).await.unwrap();
    let first = forecast(&engine, today).await;

    let run = Run::new(JobKind::Forecast);
    run.progress.cancel();
    let s = run_job(&engine, &run, &JobConfig::default(), at_noon(today)).await;
    assert_eq!(s.state, RunState::Cancelled, "{s:?}");
    assert_eq!(s.error.as_deref(), Some("the job was cancelled"));
    // The first run's forecasts stand; the cancelled run is in model_runs.
    let seen = rows(
        &engine,
        "SELECT count(DISTINCT run_id), min(run_id) FROM forecasts",
    )
    .await;
    assert_eq!(seen, vec![vec!["1".to_owned(), first.run_id.clone()]]);
    let runs = rows(&engine, "SELECT state FROM model_runs ORDER BY started").await;
    assert_eq!(
        runs,
        vec![vec!["succeeded".to_owned()], vec!["cancelled".into()]]
    );
    engine.shutdown().await.unwrap();
}
