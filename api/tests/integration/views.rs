//! Materialized views over HTTP: the KPI catalog at start, `/v1/views`, DDL rights,
//! views that equal their query after every kind of restart.

use serde_json::{Value, json};

use crate::common::{ADMIN, TestServer, VIEW_CLOCK_START, eventually, order_line};

async fn get(server: &TestServer, path: &str, token: &str) -> reqwest::Response {
    server
        .client
        .get(format!("{}{path}", server.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

fn inventory_line(id: &str, sku: &str, wh: &str, qty: i64) -> String {
    format!(
        r#"{{"event_id":"{id}","event_time":"2026-11-25T10:0{}:00Z","sku":"{sku}","warehouse_id":"{wh}","kind":"receipt","quantity":{qty}}}"#,
        qty.rem_euclid(10)
    )
}

/// The rows of every KPI view, and the same queries run ad hoc.
async fn views_and_queries(server: &TestServer) -> Vec<(String, Value, Value)> {
    let views: Value = get(server, "/v1/views", ADMIN).await.json().await.unwrap();
    let mut out = Vec::new();
    for v in views.as_array().unwrap() {
        let name = v["name"].as_str().unwrap().to_owned();
        let sql = v["sql"].as_str().unwrap();
        // The same SQL from the streams: the views it reads inlined as CTEs.
        let ctes: Vec<String> = views
            .as_array()
            .unwrap()
            .iter()
            .take_while(|w| w["name"] != v["name"])
            .map(|w| {
                format!(
                    "{} AS ({})",
                    w["name"].as_str().unwrap(),
                    w["sql"].as_str().unwrap()
                )
            })
            .collect();
        let adhoc = if ctes.is_empty() {
            format!("SELECT * FROM ({sql}) ORDER BY 1, 2")
        } else {
            format!(
                "WITH {} SELECT * FROM ({sql}) ORDER BY 1, 2",
                ctes.join(", ")
            )
        };
        let mine = server
            .sql_rows(&format!("SELECT * FROM {name} ORDER BY 1, 2"))
            .await;
        // Ad-hoc `now()` is the server's real time; the views' clock is the tests'.
        let adhoc = adhoc.replace("now()", &format!("TIMESTAMP '{VIEW_CLOCK_START}'"));
        let want = server.sql_rows(&adhoc).await;
        out.push((name, mine, want));
    }
    out
}

async fn assert_views_match(server: &TestServer, when: &str) {
    // Views trail acknowledged ingest by a micro-batch; give them a moment.
    eventually(10, || async {
        views_and_queries(server)
            .await
            .iter()
            .all(|(_, mine, want)| mine == want)
    })
    .await;
    for (name, mine, want) in views_and_queries(server).await {
        assert_eq!(mine, want, "view {name} {when}");
        assert!(mine.as_array().is_some(), "{name}");
    }
}

#[tokio::test]
async fn kpi_views_are_maintained_and_survive_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(dir.path(), &["--flush-interval", "200ms"]).await;

    let views: Value = get(&server, "/v1/views", ADMIN).await.json().await.unwrap();
    let summary: Vec<(String, String, Value)> = views
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_owned(),
                v["maintenance"].as_str().unwrap().to_owned(),
                v["key"].clone(),
            )
        })
        .collect();
    let expected = [
        ("revenue_per_minute", json!(["minute", "warehouse_id"])),
        ("hourly_sales_by_sku", json!(["hour", "sku"])),
        ("stock_on_hand", json!(["sku", "warehouse_id"])),
        ("low_stock", json!(["sku", "warehouse_id"])),
        ("orders_current", json!(["order_id", "sku"])),
        ("orders_by_status", json!(["status"])),
        ("units_sold", json!(["sku", "warehouse_id"])),
        ("sell_through", json!(["sku", "warehouse_id"])),
    ];
    assert_eq!(summary.len(), expected.len(), "{views:#}");
    for ((name, maintenance, key), (want_name, want_key)) in summary.iter().zip(expected) {
        assert_eq!(name, want_name);
        assert_eq!(maintenance, "incremental", "{name}");
        assert_eq!(key, &want_key, "{name}");
    }
    for v in views.as_array().unwrap() {
        assert!(v["version"].as_u64().is_some() && v["lag_ms"].as_u64().is_some());
    }

    // Orders move through statuses; stock goes up and down across the low mark.
    let mut n = 0;
    for round in 0..4 {
        let mut orders = String::new();
        let mut stock = String::new();
        for i in 0..25 {
            n += 1;
            let status = ["created", "paid", "shipped", "paid", "cancelled"][(i + round) % 5];
            let minute = (i * 7 + round * 3) % 50;
            orders.push_str(&order_line(
                &format!("r{round}-{i}"),
                &format!("2026-11-25T10:{minute:02}:00Z"),
                status,
            ));
            orders.push('\n');
            let qty = [40, -15, -30, 12, -8][(i + round) % 5];
            stock.push_str(&inventory_line(
                &format!("i{n}"),
                &format!("SKU-{}", i % 3),
                "W1",
                qty,
            ));
            stock.push('\n');
        }
        assert_eq!(
            server
                .post("orders", "application/x-ndjson", orders)
                .await
                .status(),
            200
        );
        assert_eq!(
            server
                .post("inventory", "application/x-ndjson", stock)
                .await
                .status(),
            200
        );
        assert_views_match(&server, &format!("after round {round}")).await;
    }

    let one: Value = get(&server, "/v1/views/stock_on_hand", ADMIN)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one["rows"].as_array().unwrap().len(), 3, "{one:#}");
    assert_eq!(
        one["columns"][2],
        json!({"name": "on_hand", "type": "bigint"})
    );
    assert!(one["version"].as_u64().unwrap() > 1);
    let missing = get(&server, "/v1/views/nope", ADMIN).await;
    assert_eq!(missing.status(), 404);

    let metrics = server.metrics_text().await;
    for m in [
        "quiver_view_changes_total{view=\"stock_on_hand\"}",
        "quiver_view_rows{view=\"low_stock\"}",
        "quiver_view_state_bytes{view=\"orders_current\",tier=\"memory\"}",
        "quiver_view_state_bytes{view=\"orders_current\",tier=\"disk\"}",
        "quiver_view_state_file_bytes",
        "quiver_view_batch_seconds_count",
    ] {
        assert!(metrics.contains(m), "{m} missing from /metrics");
    }
    let before: Vec<_> = views_and_queries(&server).await;
    // kill -9: views come back from the WAL (and an older checkpoint, if any).
    server.restart().await;
    assert_eq!(views_and_queries(&server).await, before, "after kill -9");
    // A clean stop checkpoints every view; the next start restores them as they were.
    server.restart_clean().await;
    assert_eq!(
        views_and_queries(&server).await,
        before,
        "after a clean restart"
    );
    assert!(
        server.log().contains("view restored from its checkpoint"),
        "a clean restart restores views from their checkpoint"
    );
}

#[tokio::test]
async fn views_are_created_and_dropped_by_admins_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), &["--kpi-dir", "none"]).await;
    let views: Value = get(&server, "/v1/views", ADMIN).await.json().await.unwrap();
    assert_eq!(views, json!([]), "--kpi-dir none loads no views");
    for i in 0..5 {
        let line = order_line(&format!("x{i}"), "2026-11-25T10:00:00Z", "paid");
        assert_eq!(
            server
                .post("orders", "application/x-ndjson", format!("{line}\n"))
                .await
                .status(),
            200
        );
    }
    let resp = server
        .client
        .post(format!("{}/v1/tokens", server.url))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "reader", "scopes": ["read"]}))
        .send()
        .await
        .unwrap();
    let reader = resp.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();

    let body = json!({"name": "paid_by_sku", "sql": "SELECT sku, COUNT(*) AS n, SUM(quantity) AS units FROM orders WHERE status = 'paid' GROUP BY sku"});
    let post = |token: String, body: Value| {
        let client = server.client.clone();
        let url = format!("{}/v1/views", server.url);
        async move {
            client
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(post(reader.clone(), body.clone()).await.status(), 403);
    let resp = post(ADMIN.into(), body.clone()).await;
    assert_eq!(resp.status(), 201);
    let created: Value = resp.json().await.unwrap();
    assert_eq!(created["maintenance"], "incremental");
    assert_eq!(created["key"], json!(["sku"]));
    // Filled from the events already there.
    assert_eq!(
        server.sql_rows("SELECT * FROM paid_by_sku").await,
        json!([["SKU-1", 5, 10]])
    );
    assert_eq!(post(ADMIN.into(), body).await.status(), 409);
    let bad = post(
        ADMIN.into(),
        json!({"name": "bad", "sql": "SELECT nope FROM orders"}),
    )
    .await;
    assert_eq!(bad.status(), 400);
    assert!(bad.text().await.unwrap().contains("nope"));
    let bad = post(
        ADMIN.into(),
        json!({"name": "bad", "sql": "SELECT * FROM missing_table"}),
    )
    .await;
    assert_eq!(bad.status(), 400);
    let bad = post(ADMIN.into(), json!({"name": "Bad Name", "sql": "SELECT 1"})).await;
    assert_eq!(bad.status(), 400);
    let bad = post(ADMIN.into(), json!({"name": "orders", "sql": "SELECT 1"})).await;
    assert_eq!(bad.status(), 409);
    let bad = post(
        ADMIN.into(),
        json!({"name": "v", "sql": "DELETE FROM orders"}),
    )
    .await;
    assert_eq!(bad.status(), 403);

    // A recompute view says so, and why.
    let resp = post(
        ADMIN.into(),
        json!({"name": "recent", "sql": "SELECT event_id FROM orders ORDER BY event_time DESC LIMIT 2"}),
    )
    .await;
    assert_eq!(resp.status(), 201);
    let created: Value = resp.json().await.unwrap();
    assert_eq!(created["maintenance"], "recompute");
    assert!(
        created["recompute_reason"]
            .as_str()
            .unwrap()
            .contains("Limit")
    );

    let delete = |token: &str, name: &str| {
        server
            .client
            .delete(format!("{}/v1/views/{name}", server.url))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(delete(&reader, "paid_by_sku").await.unwrap().status(), 403);
    assert_eq!(delete(ADMIN, "paid_by_sku").await.unwrap().status(), 204);
    assert_eq!(delete(ADMIN, "paid_by_sku").await.unwrap().status(), 404);
    let views: Value = get(&server, "/v1/views", &reader)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(views.as_array().unwrap().len(), 1);
    assert_eq!(get(&server, "/v1/views", "wrong").await.status(), 401);
}
