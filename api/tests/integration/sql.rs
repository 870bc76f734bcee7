//! `POST /v1/sql` end to end: the .slt files, exactly-once reads around flushes and
//! restarts, every result format read back by a real reader, refusals and limits.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Int64Type, TimeUnit};
use serde_json::{Value, json};
use sqllogictest::{DBOutput, DefaultColumnType};

use crate::common::{ADMIN, TestServer, metric, order_line};

fn sql_tests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../sql/tests")
}

/// Loads sql/tests/data: the `_1` files end up in Delta (table version 1), the `_2`
/// files stay in the live buffer.
pub(crate) async fn fixture_server(dir: &Path, extra: &[&str]) -> TestServer {
    let mut args = vec!["--flush-interval", "1h"];
    args.extend_from_slice(extra);
    let mut server = TestServer::start(dir, &args).await;
    let data = sql_tests_dir().join("data");
    for part in ["1", "2"] {
        for stream in ["orders", "inventory"] {
            let body = std::fs::read(data.join(format!("{stream}_{part}.csv"))).unwrap();
            let resp = server.post(stream, "text/csv", body).await;
            assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
        }
        if part == "1" {
            server.restart_clean().await;
        }
    }
    server
}

/// sqllogictest's view of Quiver: statements go over HTTP as JSON.
struct HttpDb {
    client: reqwest::Client,
    url: String,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct SltError(String);

#[async_trait::async_trait]
impl sqllogictest::AsyncDB for HttpDb {
    type Error = SltError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, SltError> {
        let resp = self
            .client
            .post(format!("{}/v1/sql", self.url))
            .bearer_auth(ADMIN)
            .json(&json!({ "sql": sql }))
            .send()
            .await
            .map_err(|e| SltError(e.to_string()))?;
        let ok = resp.status().is_success();
        let body: Value = resp.json().await.map_err(|e| SltError(e.to_string()))?;
        if !ok {
            let e = &body["error"];
            return Err(SltError(format!(
                "{}: {}",
                e["code"].as_str().unwrap_or(""),
                e["message"].as_str().unwrap_or("")
            )));
        }
        let types = body["columns"]
            .as_array()
            .map(|cols| {
                cols.iter()
                    .map(|c| {
                        let t = c["type"].as_str().unwrap_or("");
                        let base = t.split(' ').next().unwrap_or("");
                        if matches!(base, "bigint" | "integer" | "smallint" | "tinyint") {
                            DefaultColumnType::Integer
                        } else if matches!(base, "double" | "real") || base.starts_with("decimal") {
                            DefaultColumnType::FloatingPoint
                        } else {
                            DefaultColumnType::Text
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let rows = body["rows"]
            .as_array()
            .map(|rows| {
                rows.iter()
                    .map(|row| {
                        row.as_array()
                            .map(|cells| cells.iter().map(cell).collect())
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(DBOutput::Rows { types, rows })
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "quiver"
    }

    async fn sleep(dur: Duration) {
        tokio::time::sleep(dur).await;
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::String(s) if s.is_empty() => "(empty)".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[tokio::test]
async fn slt_files_pass() {
    let dir = tempfile::tempdir().unwrap();
    let server = fixture_server(dir.path(), &[]).await;
    let mut files: Vec<PathBuf> = std::fs::read_dir(sql_tests_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "slt files: {files:?}");
    for file in files {
        let (client, url) = (server.client.clone(), server.url.clone());
        let mut runner = sqllogictest::Runner::new(move || {
            let db = HttpDb {
                client: client.clone(),
                url: url.clone(),
            };
            async move { Ok::<_, SltError>(db) }
        });
        runner.with_column_validator(sqllogictest::strict_column_validator);
        if let Err(e) = runner.run_file_async(&file).await {
            panic!("{}: {}", file.display(), e.display(true));
        }
    }
    assert!(!Path::new("/tmp/quiver-slt-copy.csv").exists());
}

#[tokio::test]
async fn reads_see_every_acknowledged_event_once_while_flushes_run() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
    let dir = tempfile::tempdir().unwrap();
    // Tiny, frequent flushes, so queries keep racing commits and buffer releases.
    let server = TestServer::start(
        dir.path(),
        &["--flush-interval", "20ms", "--flush-bytes", "3000"],
    )
    .await;
    // One task ingests 60 requests of 7 events; the other queries all the while. Every
    // answer holds each event once, and at least every event acknowledged before the
    // query started and at most those sent before it ended.
    let (sent, acked, done) = (AtomicU64::new(0), AtomicU64::new(0), AtomicBool::new(false));
    let ingest = async {
        for round in 0..60 {
            let body: String = (0..7)
                .map(|i| {
                    order_line(&format!("r{round}-{i}"), "2026-11-25T10:00:00Z", "paid") + "\n"
                })
                .collect();
            sent.fetch_add(7, SeqCst);
            let resp = server.post("orders", "application/x-ndjson", body).await;
            assert_eq!(resp.status(), 200);
            acked.fetch_add(7, SeqCst);
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        done.store(true, SeqCst);
    };
    let query = async {
        let (mut queries, mut split, mut raced) = (0, 0, 0);
        let mut versions = std::collections::BTreeSet::new();
        while !done.load(SeqCst) {
            let lo = acked.load(SeqCst);
            let before = server.stream_info("orders").await;
            let rows = server
                .sql_rows("SELECT COUNT(*), COUNT(DISTINCT event_id) FROM orders")
                .await;
            let after = server.stream_info("orders").await["table_version"].as_u64();
            let hi = sent.load(SeqCst);
            let (n, distinct) = (rows[0][0].as_u64().unwrap(), rows[0][1].as_u64().unwrap());
            assert_eq!(n, distinct, "an event was read twice: {rows}");
            assert!(
                lo <= n && n <= hi,
                "{n} events read; {lo} acknowledged, {hi} sent"
            );
            queries += 1;
            let version = before["table_version"].as_u64();
            versions.insert(version);
            split += usize::from(
                before["stored_events"].as_u64() > Some(0)
                    && before["buffered_events"].as_u64() > Some(0),
            );
            raced += usize::from(after > version);
        }
        (queries, split, raced, versions.len())
    };
    let ((), (queries, split, raced, versions)) = tokio::join!(ingest, query);
    // The reads met the table at several versions, often with events on both sides of
    // a flush (in Delta and still buffered), and some overlapped a commit.
    eprintln!(
        "{queries} queries: {split} over a split stream, {raced} across a commit, {versions} versions"
    );
    assert!(
        versions >= 3,
        "{versions} table versions seen in {queries} queries"
    );
    assert!(
        split >= 3,
        "{split} of {queries} queries read a stream split between Delta and the buffer"
    );
    assert_eq!(
        server
            .sql_rows("SELECT COUNT(*), COUNT(DISTINCT event_id) FROM orders")
            .await,
        json!([[420, 420]])
    );
}

/// The KPI catalog of docs/CONTRACTS.md as ad-hoc queries, with a total order on each.
const KPI_QUERIES: [&str; 8] = [
    "SELECT date_bin(INTERVAL '1 minute', event_time) AS minute, warehouse_id, SUM(quantity * unit_price) AS revenue, COUNT(*) AS paid_lines, COUNT(DISTINCT order_id) AS orders FROM orders WHERE status = 'paid' GROUP BY 1, 2 ORDER BY 1, 2",
    "SELECT date_bin(INTERVAL '1 hour', event_time) AS hour, sku, SUM(quantity) AS units, AVG(unit_price) AS avg_price, MIN(unit_price) AS min_price, MAX(unit_price) AS max_price, COUNT(DISTINCT customer_id) AS customers FROM orders WHERE status = 'paid' GROUP BY 1, 2 ORDER BY 1, 2",
    "SELECT sku, warehouse_id, SUM(quantity) AS on_hand, MAX(event_time) AS last_movement, COUNT(*) AS movements FROM inventory GROUP BY sku, warehouse_id ORDER BY 1, 2",
    "SELECT sku, warehouse_id, on_hand FROM (SELECT sku, warehouse_id, SUM(quantity) AS on_hand FROM inventory GROUP BY sku, warehouse_id) WHERE on_hand < 20 ORDER BY 1, 2",
    "SELECT DISTINCT ON (order_id, sku) order_id, sku, customer_id, warehouse_id, status, quantity, unit_price, event_time FROM orders ORDER BY order_id, sku, event_time DESC",
    "WITH c AS (SELECT DISTINCT ON (order_id, sku) status, quantity, unit_price FROM orders ORDER BY order_id, sku, event_time DESC) SELECT status, COUNT(*) AS lines, SUM(quantity * unit_price) AS value, MAX(quantity * unit_price) AS largest_line FROM c GROUP BY status ORDER BY status",
    "SELECT sku, warehouse_id, SUM(quantity) AS units_sold FROM orders WHERE status = 'paid' GROUP BY sku, warehouse_id ORDER BY 1, 2",
    "WITH s AS (SELECT sku, warehouse_id, SUM(quantity) AS on_hand FROM inventory GROUP BY 1, 2), u AS (SELECT sku, warehouse_id, SUM(quantity) AS units_sold FROM orders WHERE status = 'paid' GROUP BY 1, 2) SELECT s.sku, s.warehouse_id, s.on_hand, COALESCE(u.units_sold, 0) AS units_sold FROM s LEFT JOIN u ON s.sku = u.sku AND s.warehouse_id = u.warehouse_id ORDER BY 1, 2",
];

async fn kpi_answers(server: &TestServer) -> Vec<Value> {
    let mut out = Vec::new();
    for q in KPI_QUERIES {
        out.push(server.sql_rows(q).await);
    }
    out
}

#[tokio::test]
async fn answers_are_the_same_before_and_after_flush_kill_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(dir.path(), &["--flush-interval", "1h"]).await;
    let data = sql_tests_dir().join("data");
    for file in ["orders_1", "inventory_1", "orders_2", "inventory_2"] {
        let stream = file.split('_').next().unwrap();
        let body = std::fs::read(data.join(format!("{file}.csv"))).unwrap();
        assert_eq!(server.post(stream, "text/csv", body).await.status(), 200);
    }
    // Everything is in the live buffer.
    let before = kpi_answers(&server).await;
    assert!(
        before
            .iter()
            .all(|rows| !rows.as_array().unwrap().is_empty())
    );
    assert_eq!(
        before[3],
        json!([["S1", "W1", 3], ["S2", "W2", 6], ["S4", "W2", 7]])
    );

    // kill -9: the buffer is rebuilt from the WAL.
    server.kill9();
    server.restart().await;
    assert_eq!(
        kpi_answers(&server).await,
        before,
        "after kill -9 and WAL replay"
    );

    // A clean stop flushes everything to Delta; now it is all read from Parquet.
    server.restart_clean().await;
    let counts = server
        .sql_rows("SELECT (SELECT COUNT(*) FROM table_at_version('orders', 1)) AS v1, (SELECT COUNT(*) FROM orders) AS now")
        .await;
    assert_eq!(
        counts,
        json!([[18, 18]]),
        "orders are all in Delta version 1"
    );
    assert_eq!(kpi_answers(&server).await, before, "after a flush");

    server.restart_clean().await;
    assert_eq!(kpi_answers(&server).await, before, "after a clean restart");
}

#[tokio::test]
async fn every_format_is_read_back_by_a_real_reader() {
    let dir = tempfile::tempdir().unwrap();
    let server = fixture_server(dir.path(), &[]).await;
    let q =
        "SELECT event_id, event_time, quantity, unit_price, channel FROM orders ORDER BY event_id";
    let get = |format: &'static str| {
        let server = &server;
        async move {
            let resp = server.sql_as(ADMIN, q, json!([]), format).await;
            assert_eq!(resp.status(), 200, "{format}");
            let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
            (ct, resp.bytes().await.unwrap())
        }
    };

    let (ct, body) = get("json").await;
    assert_eq!(ct, "application/json");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v["columns"],
        json!([
            {"name": "event_id", "type": "text"},
            {"name": "event_time", "type": "timestamptz"},
            {"name": "quantity", "type": "bigint"},
            {"name": "unit_price", "type": "decimal(18,2)"},
            {"name": "channel", "type": "text"}
        ])
    );
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 18);
    assert_eq!(
        rows[0],
        json!(["o1", "2026-11-24T23:58:10Z", 2, "10.00", "web"])
    );
    let o7 = rows.iter().find(|r| r[0] == "o7").unwrap();
    assert_eq!(o7, &json!(["o7", "2026-11-25T00:01:15Z", 1, "0.10", null]));

    let (ct, body) = get("ndjson").await;
    assert_eq!(ct, "application/x-ndjson");
    let lines: Vec<Value> = std::str::from_utf8(&body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 18);
    assert_eq!(
        lines[0],
        json!({"event_id": "o1", "event_time": "2026-11-24T23:58:10Z", "quantity": 2, "unit_price": "10.00", "channel": "web"})
    );

    let (ct, body) = get("csv").await;
    assert!(ct.starts_with("text/csv"));
    let mut reader = csv::Reader::from_reader(body.as_ref());
    assert_eq!(
        reader.headers().unwrap(),
        vec![
            "event_id",
            "event_time",
            "quantity",
            "unit_price",
            "channel"
        ]
    );
    let records: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(records.len(), 18);
    assert_eq!(
        &records[0],
        vec!["o1", "2026-11-24T23:58:10Z", "2", "10.00", "web"]
    );

    let check_batches = |batches: Vec<arrow::record_batch::RecordBatch>, what: &str| {
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, 18, "{what}");
        let schema = batches[0].schema();
        assert_eq!(
            schema.field(1).data_type(),
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            "{what}"
        );
        assert_eq!(
            schema.field(3).data_type(),
            &DataType::Decimal128(18, 2),
            "{what}"
        );
        let quantity: i64 = batches
            .iter()
            .flat_map(|b| b.column(2).as_primitive::<Int64Type>().values().to_vec())
            .sum();
        assert_eq!(quantity, 48, "{what}");
        let nulls: usize = batches.iter().map(|b| b.column(4).null_count()).sum();
        assert_eq!(nulls, 3, "{what}");
    };

    let (ct, body) = get("arrow").await;
    assert_eq!(ct, "application/vnd.apache.arrow.stream");
    let reader =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(body), None).unwrap();
    check_batches(reader.map(Result::unwrap).collect(), "arrow");

    let (ct, body) = get("parquet").await;
    assert_eq!(ct, "application/vnd.apache.parquet");
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(body)
        .unwrap()
        .build()
        .unwrap();
    check_batches(reader.map(Result::unwrap).collect(), "parquet");

    // An empty result is still a well-formed result.
    let resp = server
        .sql_as(
            ADMIN,
            "SELECT sku FROM orders WHERE false",
            json!([]),
            "csv",
        )
        .await;
    assert_eq!(resp.text().await.unwrap(), "sku\n");
    let resp = server
        .sql_as(
            ADMIN,
            "SELECT sku FROM orders WHERE false",
            json!([]),
            "json",
        )
        .await;
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"columns": [{"name": "sku", "type": "text"}], "rows": []})
    );

    // A result far larger than what is held back before the status line streams whole.
    let resp = server
        .sql_as(
            ADMIN,
            "SELECT value, value * 2 AS twice FROM generate_series(1, 300000)",
            json!([]),
            "json",
        )
        .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 300_000);
    let sum: i64 = rows.iter().map(|r| r[1].as_i64().unwrap()).sum();
    assert_eq!(sum, 300_000 * 300_001);
    assert!(v.get("error").is_none());

    let resp = server.sql_as(ADMIN, "SELECT 1", json!([]), "xml").await;
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn parameters_are_bound_by_position_and_type() {
    let dir = tempfile::tempdir().unwrap();
    let server = fixture_server(dir.path(), &[]).await;
    let q = "SELECT COUNT(*) FROM orders WHERE status = $1 AND quantity >= $2 AND event_time >= $3 AND unit_price < $4";
    let resp = server
        .sql_as(
            ADMIN,
            q,
            json!(["paid", 2, "2026-11-25T00:00:00Z", "100.00"]),
            "json",
        )
        .await;
    assert_eq!(resp.status(), 200);
    // o6 and o10: paid, on the 25th, two or more units, under 100.00.
    assert_eq!(resp.json::<Value>().await.unwrap()["rows"], json!([[2]]));

    let resp = server.sql_as(ADMIN, q, json!(["paid", 2]), "json").await;
    assert_eq!(resp.status(), 400);
    let body = resp.json::<Value>().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("4 parameter"),
        "{body}"
    );

    let resp = server
        .sql_as(
            ADMIN,
            q,
            json!(["paid", "two", "2026-11-25T00:00:00Z", 1]),
            "json",
        )
        .await;
    assert_eq!(resp.status(), 400);
    let body = resp.json::<Value>().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("parameter $2"),
        "{body}"
    );

    // A parameter is a value, never SQL.
    let resp = server
        .sql_as(
            ADMIN,
            "SELECT COUNT(*) FROM orders WHERE event_id = $1",
            json!(["o1' OR '1'='1"]),
            "json",
        )
        .await;
    assert_eq!(resp.json::<Value>().await.unwrap()["rows"], json!([[0]]));
}

#[tokio::test]
async fn hostile_sql_is_refused_for_everyone_and_touches_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let server = fixture_server(dir.path(), &[]).await;
    let secret = dir.path().join("secret.csv");
    std::fs::write(&secret, "password\nhunter2\n").unwrap();
    let target = dir.path().join("exfiltrated");
    let reader = make_token(&server, "reader", &["read"]).await;
    let hostile = [
        format!(
            "CREATE EXTERNAL TABLE s STORED AS CSV LOCATION '{}'",
            secret.display()
        ),
        format!("COPY orders TO '{}/o.parquet'", target.display()),
        format!(
            "COPY (SELECT * FROM orders) TO '{}' STORED AS CSV",
            target.display()
        ),
        format!("EXPLAIN ANALYZE COPY (SELECT 1) TO '{}'", target.display()),
        "SET datafusion.execution.target_partitions = 64".to_owned(),
        "INSERT INTO orders SELECT * FROM orders".to_owned(),
        "DROP TABLE orders".to_owned(),
        "CREATE TABLE x AS SELECT * FROM orders".to_owned(),
        "DELETE FROM inventory".to_owned(),
        "CREATE VIEW v AS SELECT 1".to_owned(),
        "CREATE SCHEMA s".to_owned(),
        "PREPARE p AS SELECT 1".to_owned(),
    ];
    for token in [ADMIN, reader.as_str()] {
        for sql in &hostile {
            let resp = server.sql_as(token, sql, json!([]), "json").await;
            assert_eq!(resp.status(), 403, "{sql}");
            let body: Value = resp.json().await.unwrap();
            assert_eq!(
                body["error"]["code"], "statement_not_allowed",
                "{sql}: {body}"
            );
        }
        // Paths are not tables, and no function reads files.
        for sql in [
            format!("SELECT * FROM '{}'", secret.display()),
            format!("SELECT * FROM read_csv('{}')", secret.display()),
            format!("SELECT * FROM read_parquet('{}')", secret.display()),
        ] {
            let resp = server.sql_as(token, &sql, json!([]), "json").await;
            assert_eq!(resp.status(), 400, "{sql}");
            assert!(!resp.text().await.unwrap().contains("hunter2"));
        }
    }
    assert!(!target.exists(), "nothing was written");
    assert_eq!(
        server.sql_rows("SELECT COUNT(*) FROM orders").await,
        json!([[18]])
    );
}

async fn make_token(server: &TestServer, name: &str, scopes: &[&str]) -> String {
    let resp = server
        .client
        .post(format!("{}/v1/tokens", server.url))
        .bearer_auth(ADMIN)
        .json(&json!({"name": name, "scopes": scopes}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    resp.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn create_stream_needs_admin_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(dir.path(), &[]).await;
    let reader = make_token(&server, "reader", &["read", "ingest"]).await;
    let ddl = "CREATE STREAM shipments (event_id TEXT NOT NULL, event_time TIMESTAMP NOT NULL, carrier TEXT NOT NULL, weight_kg DOUBLE, cost DECIMAL(18,2), express BOOLEAN)";

    let resp = server.sql_as(&reader, ddl, json!([]), "json").await;
    assert_eq!(resp.status(), 403);
    let resp = server.sql_as(ADMIN, ddl, json!([]), "json").await;
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    let resp = server.sql_as(ADMIN, ddl, json!([]), "json").await;
    assert_eq!(resp.status(), 409);
    let resp = server
        .sql_as(
            ADMIN,
            &ddl.replace("STREAM", "STREAM IF NOT EXISTS"),
            json!([]),
            "json",
        )
        .await;
    assert_eq!(resp.status(), 200);

    for (bad, why) in [
        ("CREATE STREAM s1 (carrier TEXT)", "event_time"),
        (
            "CREATE STREAM s2 (event_time TIMESTAMP NOT NULL, blob BYTEA)",
            "blob",
        ),
        (
            "CREATE STREAM s3 (event_time TIMESTAMP NOT NULL, x INT PRIMARY KEY)",
            "x",
        ),
        (
            "CREATE STREAM Bad (event_time TIMESTAMP NOT NULL)",
            "lower-case",
        ),
        (
            "CREATE STREAM orders (event_time TIMESTAMP NOT NULL)",
            "already exists",
        ),
    ] {
        let resp = server.sql_as(ADMIN, bad, json!([]), "json").await;
        assert!(resp.status().is_client_error(), "{bad}");
        let msg = resp.text().await.unwrap();
        assert!(msg.contains(why), "{bad}: {msg}");
    }

    let line = r#"{"event_id":"s1","event_time":"2026-11-25T10:00:00Z","carrier":"dhl","weight_kg":1.5,"cost":"12.30","express":true}"#;
    let resp = server
        .post_as(&reader, "shipments", format!("{line}\n"))
        .await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let q = "SELECT carrier, weight_kg, cost, express, event_date FROM shipments";
    let expected = json!([["dhl", 1.5, "12.30", true, "2026-11-25"]]);
    assert_eq!(server.sql_rows(q).await, expected);

    server.restart().await;
    assert_eq!(server.sql_rows(q).await, expected, "after kill -9");
    server.restart_clean().await;
    assert_eq!(
        server.sql_rows(q).await,
        expected,
        "after a flush and restart"
    );

    // A declared stream feeds views like the built-in ones.
    let view = "CREATE MATERIALIZED VIEW shipping_cost AS SELECT carrier, SUM(cost) AS cost, COUNT(*) AS parcels FROM shipments GROUP BY carrier";
    let resp = server.sql_as(&reader, view, json!([]), "json").await;
    assert_eq!(resp.status(), 403);
    let resp = server.sql_as(ADMIN, view, json!([]), "json").await;
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    let resp = server
        .post_as(
            &reader,
            "shipments",
            format!("{}\n", line.replace("s1", "s2")),
        )
        .await;
    assert_eq!(resp.status(), 200);
    crate::common::eventually(10, || async {
        server.sql_rows("SELECT * FROM shipping_cost").await == json!([["dhl", "24.60", 2]])
    })
    .await;
    let resp = server
        .sql_as(
            &reader,
            "DROP MATERIALIZED VIEW shipping_cost",
            json!([]),
            "json",
        )
        .await;
    assert_eq!(resp.status(), 403);
}

#[tokio::test]
async fn time_travel_reads_older_versions() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(dir.path(), &["--flush-interval", "1h"]).await;
    for i in 0..3 {
        server.post_order(&format!("a{i}")).await;
    }
    server.restart_clean().await; // version 1: 3 events
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let between = chrono::Utc::now().to_rfc3339();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for i in 0..2 {
        server.post_order(&format!("b{i}")).await;
    }
    server.restart_clean().await; // version 2: 5 events

    let rows = server
        .sql_rows(&format!(
            "SELECT (SELECT COUNT(*) FROM table_at_version('orders', 1)) AS v1, \
                    (SELECT COUNT(*) FROM table_at_version('orders', 2)) AS v2, \
                    (SELECT COUNT(*) FROM table_at_time('orders', '{between}')) AS t, \
                    (SELECT COUNT(*) FROM orders VERSION AS OF 1) AS v1_again, \
                    (SELECT COUNT(*) FROM orders TIMESTAMP AS OF '{between}') AS t_again, \
                    (SELECT COUNT(*) FROM orders) AS now"
        ))
        .await;
    assert_eq!(rows, json!([[3, 5, 3, 3, 3, 5]]));
    // Before the table existed there were no events.
    let before = server
        .sql_rows("SELECT COUNT(*) FROM orders TIMESTAMP AS OF '2001-01-01T00:00:00Z'")
        .await;
    assert_eq!(before, json!([[0]]));

    for (sql, why) in [
        ("SELECT * FROM table_at_version('orders', 99)", "version 99"),
        (
            "SELECT * FROM table_at_version('nope', 1)",
            "unknown stream",
        ),
        (
            "SELECT * FROM table_at_time('orders', 'yesterday')",
            "RFC 3339",
        ),
    ] {
        let resp = server.sql_as(ADMIN, sql, json!([]), "json").await;
        assert_eq!(resp.status(), 400, "{sql}");
        let msg = resp.text().await.unwrap();
        assert!(msg.contains(why), "{sql}: {msg}");
    }
}

#[tokio::test]
async fn limits_end_runaway_queries_and_the_server_stays_healthy() {
    let dir = tempfile::tempdir().unwrap();
    // A result cap below the megabyte held back before the status line: every limit
    // here is hit before the answer starts.
    std::fs::create_dir_all(dir.path().join("spill")).unwrap();
    let spill_dir = dir.path().join("spill").display().to_string();
    let server = fixture_server(
        dir.path(),
        &[
            "--query-timeout",
            "5s",
            "--query-memory-limit",
            "20000000",
            "--max-result-bytes",
            "1000000",
            "--query-spill-dir",
            spill_dir.as_str(),
        ],
    )
    .await;

    let started = Instant::now();
    let resp = server
        .sql_as(
            ADMIN,
            "SELECT SUM(value) FROM generate_series(1, 100000000000)",
            json!([]),
            "json",
        )
        .await;
    assert_eq!(error_of(resp).await, (400, "query_timeout".to_owned()));
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "{:?}",
        started.elapsed()
    );

    // Over the memory limit, an aggregation spills to disk and completes…
    let spills = |text: &str| metric(text, "quiver_sql_spills_total");
    let spilled_before = spills(&server.metrics_text().await);
    let resp = server
        .sql_as(
            ADMIN,
            "SELECT value % 3000000 AS k, COUNT(*) AS n FROM generate_series(1, 6000000) GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1",
            json!([]),
            "json",
        )
        .await;
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["rows"], json!([[0, 2]]), "{body}");
    let metrics = server.metrics_text().await;
    assert!(
        spills(&metrics) > spilled_before,
        "the aggregation did not spill:\n{metrics}"
    );
    assert!(metric(&metrics, "quiver_sql_spilled_bytes_total") > 0.0);
    // …leaving no spill file behind; what cannot spill fails with a clear error.
    let leftovers = walk_files(&dir.path().join("spill"));
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let resp = server
        .sql_as(
            ADMIN,
            "SELECT array_length(array_agg(value)) FROM generate_series(1, 5000000)",
            json!([]),
            "json",
        )
        .await;
    assert_eq!(
        error_of(resp).await,
        (400, "memory_limit_exceeded".to_owned())
    );

    let resp = server
        .sql_as(
            ADMIN,
            "SELECT * FROM orders a, orders b, orders c, inventory d",
            json!([]),
            "json",
        )
        .await;
    assert_eq!(error_of(resp).await, (400, "result_too_large".to_owned()));

    assert_healthy_within_a_second(&server).await;
    assert_eq!(
        server.sql_rows("SELECT COUNT(*) FROM orders").await,
        json!([[18]])
    );
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains("quiver_sql_queries_total{outcome=\"query_timeout\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_result_cut_short_after_the_status_line_is_never_taken_for_whole() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), &["--max-result-bytes", "3000000"]).await;
    let big = "SELECT value FROM generate_series(1, 2000000)";
    // JSON ends with an error member…
    let resp = server.sql_as(ADMIN, big, json!([]), "json").await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "result_too_large", "{}", v["error"]);
    assert!(v["rows"].as_array().unwrap().len() > 100_000);
    // …NDJSON with an error line…
    let resp = server.sql_as(ADMIN, big, json!([]), "ndjson").await;
    let text = resp.text().await.unwrap();
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "result_too_large");
    // …and CSV and Arrow transfers are cut off. (Parquet is counted as sent, compressed:
    // two million small integers fit under the cap.)
    for format in ["csv", "arrow"] {
        let resp = server.sql_as(ADMIN, big, json!([]), format).await;
        assert_eq!(resp.status(), 200, "{format}");
        assert!(resp.bytes().await.is_err(), "{format}");
    }
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk_files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

async fn error_of(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_owned(),
    )
}

#[tokio::test]
async fn queries_past_the_concurrency_limit_wait_then_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(
        dir.path(),
        &[
            "--max-concurrent-queries",
            "1",
            "--query-queue-timeout",
            "200ms",
            "--query-timeout",
            "4s",
        ],
    )
    .await;
    let runaway = {
        let (client, url) = (server.client.clone(), server.url.clone());
        tokio::spawn(async move {
            client
                .post(format!("{url}/v1/sql"))
                .bearer_auth(ADMIN)
                .json(&json!({"sql": "SELECT SUM(value) FROM generate_series(1, 100000000000)"}))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    // Wait until the runaway query holds the only slot.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server
        .metrics_text()
        .await
        .contains("quiver_sql_active_queries 1")
    {
        assert!(Instant::now() < deadline, "the first query never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resp = server.sql_as(ADMIN, "SELECT 1", json!([]), "json").await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(error_of(resp).await.1, "too_many_queries");

    assert_eq!(runaway.await.unwrap(), 400, "the runaway query timed out");
    assert_eq!(server.sql_rows("SELECT 1").await, json!([[1]]));
    assert!(
        server
            .metrics_text()
            .await
            .contains("quiver_sql_active_queries 0")
    );
}

#[tokio::test]
async fn huge_expressions_neither_crash_nor_stall_the_server() {
    let dir = tempfile::tempdir().unwrap();
    // A deadline far below what planning 4,900 terms takes on any machine (seconds
    // here), and far above what `SELECT 1 + 1` needs.
    let server = TestServer::start(dir.path(), &["--query-timeout", "300ms"]).await;
    let sum = |n: usize| format!("SELECT {}", vec!["1"; n].join(" + "));

    // Longer than the token limit: refused before planning.
    let resp = server.sql_as(ADMIN, &sum(10_001), json!([]), "json").await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the limit is 10000"),
        "{body}"
    );

    // Under it but slow to plan (deep recursion on the query threads' large stacks):
    // the deadline answers, and the server lives on.
    let started = Instant::now();
    let resp = server.sql_as(ADMIN, &sum(4_900), json!([]), "json").await;
    assert_eq!(error_of(resp).await, (400, "query_timeout".to_owned()));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert_healthy_within_a_second(&server).await;
    assert_eq!(server.sql_rows("SELECT 1 + 1").await, json!([[2]]));
}

async fn assert_healthy_within_a_second(server: &TestServer) {
    let health = server
        .client
        .get(format!("{}/health", server.url))
        .timeout(Duration::from_secs(1))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}
