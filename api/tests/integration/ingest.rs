//! Ingest end to end: every format lands in Delta with the right types and partitions;
//! bad input is refused clearly and stores nothing; auth and idempotency.

use datafusion::arrow::datatypes::{DataType, TimeUnit};
use serde_json::Value;

use crate::common::*;

const ORDERS_CSV: &str = "event_id,event_time,order_id,customer_id,warehouse_id,sku,quantity,unit_price,status,channel\n\
c-1,2026-11-24T23:59:59Z,o1,c1,W1,SKU-1,1,5.00,created,web\n\
c-2,1795564800000,o1,c1,W1,SKU-1,1,5.00,paid,\n";

fn arrow_inventory() -> Vec<u8> {
    let body = r#"{"event_id":"a-1","event_time":"2026-11-25T08:00:00Z","sku":"SKU-9","warehouse_id":"W2","kind":"receipt","quantity":100,"unit_cost":3.10}
{"event_id":"a-2","event_time":"2026-11-25T09:00:00Z","sku":"SKU-9","warehouse_id":"W2","kind":"sale","quantity":-4}"#;
    let batch = quiver_ingest::decode(
        &quiver_engine::StreamSchema::inventory(),
        quiver_ingest::Format::Ndjson,
        body.as_bytes(),
    )
    .unwrap();
    let mut buf = Vec::new();
    let mut w =
        datafusion::arrow::ipc::writer::StreamWriter::try_new(&mut buf, &batch.schema()).unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();
    drop(w);
    buf
}

#[tokio::test]
async fn every_format_lands_in_delta_with_types_and_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start(dir.path(), &[]).await;

    let ndjson = [
        order_line("n-1", "2026-11-25T10:00:00Z", "created"),
        order_line("n-2", "2026-11-25T10:05:00.250Z", "paid"),
    ]
    .join("\n");
    let r = s.post("orders", "application/x-ndjson", ndjson).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["accepted"], 2);

    let json = format!("[{}]", order_line("j-1", "2026-11-26T00:00:00Z", "shipped"));
    let r = s.post("orders", "application/json", json).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    let r = s.post("orders", "text/csv", ORDERS_CSV).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    let r = s
        .post(
            "inventory",
            "application/vnd.apache.arrow.stream",
            arrow_inventory(),
        )
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(r.json::<Value>().await.unwrap()["accepted"], 2);

    // Row counts are visible at once (buffer) and after flushes (table).
    let orders_info = s.stream_info("orders").await;
    assert_eq!(orders_info["rows"], 5, "{orders_info}");
    assert_eq!(orders_info["partition_by"][0], "event_date");

    // A clean shutdown flushes everything and exits 0.
    assert_eq!(s.terminate(), Some(0), "log:\n{}", s.log());

    let orders = s.table_url("orders");
    let rows = query_table(&s.store, orders.clone(), "SELECT event_id, CAST(event_time AS VARCHAR), CAST(unit_price AS VARCHAR), CAST(event_date AS VARCHAR), channel FROM t ORDER BY event_id").await;
    let ids = strings(&rows, 0);
    assert_eq!(ids, ["c-1", "c-2", "j-1", "n-1", "n-2"]);
    let dates = strings(&rows, 3);
    assert_eq!(
        dates,
        [
            "2026-11-24",
            "2026-11-25",
            "2026-11-26",
            "2026-11-25",
            "2026-11-25"
        ]
    );
    let prices = strings(&rows, 2);
    assert_eq!(prices[0], "5.00");
    assert_eq!(prices[3], "19.99");
    let times = strings(&rows, 1);
    assert!(
        times[4].starts_with("2026-11-25T10:05:00.250"),
        "{}",
        times[4]
    );

    // Types as stored.
    let schema = query_table(&s.store, orders.clone(), "SELECT * FROM t LIMIT 1").await[0].schema();
    assert_eq!(
        schema.field_with_name("event_time").unwrap().data_type(),
        &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
    );
    assert_eq!(
        schema.field_with_name("unit_price").unwrap().data_type(),
        &DataType::Decimal128(18, 2)
    );

    // Partition folders, Parquet with zstd.
    let parts: Vec<_> = walk(&dir.path().join("store/tables/orders"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    assert!(!parts.is_empty());
    assert!(
        parts
            .iter()
            .all(|p| p.display().to_string().contains("event_date=2026-11-2"))
    );
    let file = std::fs::File::open(&parts[0]).unwrap();
    let meta = parquet_meta(file);
    assert!(meta.contains("ZSTD"), "{meta}");

    let inv = query_table(
        &s.store,
        s.table_url("inventory"),
        "SELECT SUM(quantity), COUNT(*) FROM t",
    )
    .await;
    assert_eq!(single_i64(&inv), 96);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn parquet_meta(file: std::fs::File) -> String {
    use datafusion::parquet::file::reader::{FileReader, SerializedFileReader};
    let r = SerializedFileReader::new(file).unwrap();
    let md = r.metadata();
    format!("{:?}", md.row_group(0).column(0).compression())
}

async fn error_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    (status, body["error"].clone())
}

#[tokio::test]
async fn bad_input_is_refused_clearly_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start(dir.path(), &["--max-body-bytes", "4096"]).await;
    let good = order_line("g-1", "2026-11-25T10:00:00Z", "paid");
    let nd = "application/x-ndjson";

    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "malformed json",
            format!("{good}\n{{\"event_id\":"),
            400,
            "invalid_rows",
        ),
        (
            "wrong type",
            good.replace(r#""quantity":2"#, r#""quantity":"2""#),
            400,
            "invalid_rows",
        ),
        (
            "missing field",
            good.replace(r#""sku":"SKU-1","#, ""),
            400,
            "invalid_rows",
        ),
        (
            "unknown field",
            good.replace(r#""channel":"web""#, r#""channel":"web","x":1"#),
            400,
            "invalid_rows",
        ),
        (
            "bad enum",
            good.replace("\"paid\"", "\"teleported\""),
            400,
            "invalid_rows",
        ),
        (
            "negative quantity",
            good.replace(r#""quantity":2"#, r#""quantity":-2"#),
            400,
            "invalid_rows",
        ),
        (
            "bad timestamp",
            good.replace("2026-11-25T10:00:00Z", "not-a-time"),
            400,
            "invalid_rows",
        ),
        ("empty body", String::new(), 400, "empty_body"),
    ];
    for (what, body, status, code) in cases {
        if what == "empty body" {
            let (st, err) = error_of(s.post("orders", nd, body).await).await;
            assert_eq!(
                (st, err["code"].as_str().unwrap()),
                (status, code),
                "{what}"
            );
            continue;
        }
        // A good row first: the whole request must still be refused.
        let (st, err) = error_of(s.post("orders", nd, format!("{good}\n{body}")).await).await;
        assert_eq!(st, status, "{what}: {err}");
        assert_eq!(err["code"], code, "{what}: {err}");
        let details = err["details"].as_array().unwrap();
        assert!(!details.is_empty(), "{what}");
        // Row 1 is the good one; the problem is on row 2 or later.
        assert!(
            details.iter().all(|d| d["row"].as_u64().unwrap() >= 2),
            "{what}: {err}"
        );
        assert!(!err["message"].as_str().unwrap().is_empty());
    }

    // The details name the column and the reason.
    let (_, err) = error_of(
        s.post(
            "orders",
            nd,
            good.replace(r#""quantity":2"#, r#""quantity":0"#),
        )
        .await,
    )
    .await;
    assert_eq!(err["details"][0]["row"], 1);
    assert_eq!(err["details"][0]["column"], "quantity");
    assert!(
        err["details"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("> 0")
    );

    let (st, err) = error_of(s.post("orders", nd, "x".repeat(5000)).await).await;
    assert_eq!(
        (st, err["code"].as_str().unwrap()),
        (413, "payload_too_large")
    );
    let (st, err) = error_of(s.post("orders", "text/plain", good.clone()).await).await;
    assert_eq!(
        (st, err["code"].as_str().unwrap()),
        (415, "unsupported_media_type")
    );
    let (st, err) = error_of(s.post("returns", nd, good.clone()).await).await;
    assert_eq!((st, err["code"].as_str().unwrap()), (404, "unknown_stream"));

    // Auth: missing, wrong, and a read-only token.
    let url = format!("{}/v1/streams/orders/events", s.url);
    let r = s
        .client
        .post(&url)
        .header("content-type", nd)
        .body(good.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.0, 401);
    let r = s
        .client
        .post(&url)
        .bearer_auth("qv_nope_nope")
        .header("content-type", nd)
        .body(good.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.0, 401);
    let made: Value = s
        .client
        .post(format!("{}/v1/tokens", s.url))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"name": "dash", "scopes": ["read"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let read_token = made["token"].as_str().unwrap().to_owned();
    let r = s
        .client
        .post(&url)
        .bearer_auth(&read_token)
        .header("content-type", nd)
        .body(good.clone())
        .send()
        .await
        .unwrap();
    let (st, err) = error_of(r).await;
    assert_eq!((st, err["code"].as_str().unwrap()), (403, "forbidden"));
    // The read token can list streams but not tokens.
    let r = s
        .client
        .get(format!("{}/v1/streams", s.url))
        .bearer_auth(&read_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let streams: Value = r.json().await.unwrap();
    assert_eq!(streams.as_array().unwrap().len(), 2);
    let r = s
        .client
        .get(format!("{}/v1/tokens", s.url))
        .bearer_auth(&read_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // Rejects are counted by reason.
    let metrics = s
        .client
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("quiver_ingest_rejects_total{stream=\"orders\",reason=\"invalid_rows\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("quiver_wal_fsync_seconds"));
    // How the server's memory splits, read when scraped: live allocations, what the
    // allocator holds, and the process's RSS.
    let allocated = metric(&metrics, "quiver_memory_allocated_bytes ");
    let resident = metric(&metrics, "quiver_memory_allocator_resident_bytes ");
    let rss = metric(&metrics, "process_resident_memory_bytes ");
    assert!(allocated > 1e6, "allocated {allocated}");
    assert!(
        resident >= allocated,
        "resident {resident} < allocated {allocated}"
    );
    assert!(rss > 1e6, "rss {rss}");

    // Nothing of any refused request was stored.
    assert_eq!(s.terminate(), Some(0));
    let n = query_table(&s.store, s.table_url("orders"), "SELECT COUNT(*) FROM t").await;
    assert_eq!(single_i64(&n), 0);
}

#[tokio::test]
async fn idempotency_keys_and_tokens() {
    let dir = tempfile::tempdir().unwrap();
    // One WAL segment per write and frequent view checkpoints, so a flush can delete
    // the segment that holds a key.
    let mut s = TestServer::start(
        dir.path(),
        &[
            "--wal-segment-bytes",
            "1",
            "--view-checkpoint-interval",
            "200ms",
        ],
    )
    .await;
    let body = [
        order_line("k-1", "2026-11-25T10:00:00Z", "created"),
        order_line("k-2", "2026-11-25T10:00:01Z", "created"),
    ]
    .join("\n");
    let first = s.send_keyed("batch-1", body.clone()).await;
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let again = s.send_keyed("batch-1", body.clone()).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers().get("idempotent-replayed").unwrap(), "true");
    assert_eq!(again.json::<Value>().await.unwrap()["accepted"], 2);
    // Same key, different body: refused.
    let other = s
        .send_keyed(
            "batch-1",
            order_line("k-3", "2026-11-25T10:00:02Z", "created"),
        )
        .await;
    assert_eq!(other.status(), 422);

    // Keys survive a crash (kill -9) and a flush that deletes the WAL segment.
    s.restart().await;
    let after_crash = s.send_keyed("batch-1", body.clone()).await;
    assert_eq!(
        after_crash.headers().get("idempotent-replayed").unwrap(),
        "true"
    );
    eventually(20, || async {
        let n = query_table(&s.store, s.table_url("orders"), "SELECT COUNT(*) FROM t").await;
        single_i64(&n) == 2
    })
    .await;
    // The key is gone from the log: no segment left holds it.
    let holding_key = || {
        std::fs::read_dir(dir.path().join("wal"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".wal"))
            .filter(|e| {
                let bytes = std::fs::read(e.path()).unwrap_or_default();
                bytes.windows(7).any(|w| w == b"batch-1")
            })
            .count()
    };
    eventually(20, || async { holding_key() == 0 }).await;
    assert!(metric(&s.metrics_text().await, "quiver_wal_segments_deleted_total") > 0.0);
    s.restart().await;
    let after_flush = s.send_keyed("batch-1", body).await;
    assert_eq!(
        after_flush
            .headers()
            .get("idempotent-replayed")
            .map(|v| v.to_str().unwrap().to_owned()),
        Some("true".to_owned()),
        "{:?} {:?} log:\n{}",
        std::fs::read_dir(dir.path().join("wal"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect::<Vec<_>>(),
        after_flush.status(),
        s.log()
    );

    // Token lifecycle.
    let made: Value = s
        .client
        .post(format!("{}/v1/tokens", s.url))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"name": "feeder", "scopes": ["ingest"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = made["token"].as_str().unwrap().to_owned();
    let id = made["id"].as_str().unwrap().to_owned();
    let listed: Value = s.get_json("/v1/tokens").await;
    assert!(listed.to_string().contains(&id));
    assert!(
        !listed.to_string().contains(&token),
        "secrets are never listed"
    );
    let stored: String = std::fs::read_dir(dir.path().join("store/_quiver/catalog/tokens"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert!(stored.contains(&id), "the token's record is in the catalog");
    assert!(!stored.contains(&token), "tokens are stored hashed");
    let r = s
        .post_as(
            &token,
            "orders",
            order_line("t-1", "2026-11-25T10:00:00Z", "paid"),
        )
        .await;
    assert_eq!(r.status(), 200);
    let r = s
        .client
        .delete(format!("{}/v1/tokens/{id}", s.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = s
        .post_as(
            &token,
            "orders",
            order_line("t-2", "2026-11-25T10:00:00Z", "paid"),
        )
        .await;
    assert_eq!(r.status(), 401);

    assert_eq!(s.terminate(), Some(0));
    let n = query_table(&s.store, s.table_url("orders"), "SELECT COUNT(*) FROM t").await;
    assert_eq!(single_i64(&n), 3);
}

impl TestServer {
    async fn send_keyed(&self, key: &str, body: String) -> reqwest::Response {
        self.client
            .post(format!("{}/v1/streams/orders/events", self.url))
            .bearer_auth(ADMIN)
            .header("content-type", "application/x-ndjson")
            .header("idempotency-key", key)
            .body(body)
            .send()
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn per_token_rate_limit_answers_429() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start(dir.path(), &["--ingest-rate-limit", "2"]).await;
    let mut statuses = Vec::new();
    for i in 0..6 {
        let r = s.post_order(&format!("rl-{i}")).await;
        if r.status() == 429 {
            assert!(r.headers().get("retry-after").is_some());
        }
        statuses.push(r.status().as_u16());
    }
    let limited = statuses.iter().filter(|s| **s == 429).count();
    let accepted = statuses.iter().filter(|s| **s == 200).count();
    assert!(limited >= 1 && accepted >= 2, "{statuses:?}");
    assert_eq!(s.terminate(), Some(0));
    let n = query_table(&s.store, s.table_url("orders"), "SELECT COUNT(*) FROM t").await;
    assert_eq!(
        single_i64(&n),
        accepted as i64,
        "refused requests stored nothing"
    );
}

/// A request whose events, encoded for the write-ahead log, exceed one record's limit is
/// refused with 413 before anything is written; one just under the limit is stored and
/// survives a kill -9. The body limit is raised well above, so it is the record limit
/// that answers.
#[tokio::test]
async fn a_request_past_the_wal_record_limit_is_refused_and_one_under_it_survives() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 64 << 10;
    let limit_arg = limit.to_string();
    let mut s = TestServer::start(
        dir.path(),
        &[
            "--max-wal-record-bytes",
            &limit_arg,
            "--max-body-bytes",
            "16777216",
        ],
    )
    .await;
    let body = |tag: &str, n: usize| {
        (0..n)
            .map(|i| order_line(&format!("{tag}-{i}"), "2026-11-25T10:00:00Z", "paid"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // The largest request that fits, found by bisection from outside.
    let (mut fits, mut refused) = (1usize, 20_000usize);
    let mut stored = 0usize;
    let mut refusal = Value::Null;
    let mut attempt = 0;
    while refused - fits > 1 {
        let n = (fits + refused) / 2;
        attempt += 1;
        // Tags of one length, so requests of n events encode to the same size.
        let b = body(&format!("t{attempt:02}"), n);
        assert!(b.len() < 16 << 20);
        let r = s.post("orders", "application/x-ndjson", b).await;
        match r.status().as_u16() {
            200 => {
                fits = n;
                stored += n;
            }
            413 => {
                refused = n;
                refusal = error_of(r).await.1;
            }
            other => panic!("{other}: {}", r.text().await.unwrap()),
        }
    }
    assert!(
        fits > 10,
        "a 64 KiB record holds more than {fits} order lines"
    );
    assert_eq!(refusal["code"], "payload_too_large", "{refusal}");
    let message = refusal["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("{limit}-byte limit of one write-ahead log record")),
        "{message}"
    );
    // Just under: stored (again, under a fresh tag). Just over: refused again.
    let r = s
        .post("orders", "application/x-ndjson", body("und", fits))
        .await;
    assert_eq!(r.status(), 200);
    stored += fits;
    let r = s
        .post("orders", "application/x-ndjson", body("ovr", fits + 1))
        .await;
    assert_eq!(r.status(), 413);

    s.restart().await;
    let count = s.sql_rows("SELECT COUNT(*) FROM orders").await;
    assert_eq!(count[0][0].as_u64(), Some(stored as u64));
    let under = s
        .sql_rows("SELECT COUNT(*) FROM orders WHERE event_id LIKE 'und-%'")
        .await;
    assert_eq!(under[0][0].as_u64(), Some(fits as u64));
    let over = s
        .sql_rows("SELECT COUNT(*) FROM orders WHERE event_id LIKE 'ovr-%'")
        .await;
    assert_eq!(over[0][0].as_u64(), Some(0));
}
