//! WebSocket push with a real client (tokio-tungstenite): the subscriber rule over random
//! batches with filters, resume after a reconnect, a slow reader beside a fast one,
//! refusals and limits; and the JavaScript client under Node.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{SinkExt as _, StreamExt as _};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::common::{ADMIN, TestServer, metric};

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// One subscription's local copy of its view.
#[derive(Debug, Default)]
struct Copy {
    key_idx: Vec<usize>,
    version: u64,
    rows: HashMap<String, Value>,
    snapshots: usize,
    deltas: usize,
    coalesced: usize,
    resumed: usize,
}

impl Copy {
    fn key_of(&self, row: &Value) -> String {
        let key: Vec<Value> = self.key_idx.iter().map(|&i| row[i].clone()).collect();
        Value::Array(key).to_string()
    }

    fn sorted_rows(&self) -> Vec<Value> {
        let mut rows: Vec<Value> = self.rows.values().cloned().collect();
        rows.sort_by_key(|r| r.to_string());
        rows
    }
}

/// A push client that keeps a local copy per subscription and checks version order.
struct Client {
    ws: Ws,
    subs: HashMap<String, Copy>,
    errors: Vec<Value>,
    /// Ack → arrival of each delta, in milliseconds.
    latencies: Vec<f64>,
    /// Types of the other frames received (pong, unsubscribed, …).
    seen: Vec<String>,
    /// The same frames' types with their subscription id.
    acks: Vec<(String, String)>,
    /// Snapshots and deltas that came for an id with no subscription.
    strays: Vec<Value>,
    closed: Option<(u16, String)>,
}

fn ws_url(server: &TestServer) -> String {
    format!("{}/v1/ws", server.url.replacen("http://", "ws://", 1))
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1e3
}

impl Client {
    fn new(ws: Ws) -> Self {
        Self {
            ws,
            subs: HashMap::new(),
            errors: Vec::new(),
            latencies: Vec::new(),
            seen: Vec::new(),
            acks: Vec::new(),
            strays: Vec::new(),
            closed: None,
        }
    }

    /// Connects without authenticating, or with `header_token` in the header.
    async fn open(server: &TestServer, header_token: Option<&str>) -> Self {
        let mut req = ws_url(server).into_client_request().unwrap();
        if let Some(token) = header_token {
            req.headers_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("connect");
        Self::new(ws)
    }

    /// Connects; the token goes in the header, or in a first message when `header` is false.
    async fn connect(server: &TestServer, token: &str, header: bool) -> Self {
        let mut c = Self::open(server, header.then_some(token)).await;
        if !header {
            c.send(json!({"type": "auth", "token": token})).await;
        }
        c
    }

    async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    async fn subscribe(&mut self, id: &str, view: &str, filter: Value, from: Option<u64>) {
        let mut m = json!({"type": "subscribe", "id": id, "view": view});
        if !filter.is_null() {
            m["filter"] = filter;
        }
        if let Some(v) = from {
            m["from_version"] = json!(v);
        }
        self.subs.entry(id.to_owned()).or_default();
        self.send(m).await;
    }

    /// Reads one message (or times out) and applies it.
    async fn step(&mut self, wait: Duration) -> Option<Value> {
        let msg = tokio::time::timeout(wait, self.ws.next()).await.ok()??;
        match msg {
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(&t).expect("frames are JSON");
                self.apply(&v);
                Some(v)
            }
            Ok(Message::Close(frame)) => {
                self.closed = Some(
                    frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new())),
                );
                None
            }
            Ok(_) => Some(Value::Null),
            Err(_) => {
                self.closed.get_or_insert((1006, String::new()));
                None
            }
        }
    }

    fn apply(&mut self, v: &Value) {
        let id = v["id"].as_str().unwrap_or_default().to_owned();
        let kind = v["type"].as_str().unwrap();
        if matches!(kind, "snapshot" | "delta") && !self.subs.contains_key(&id) {
            self.strays.push(v.clone());
            return;
        }
        match kind {
            "snapshot" => {
                let copy = self.subs.get_mut(&id).expect("snapshot for a subscription");
                let columns: Vec<&str> = v["columns"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["name"].as_str().unwrap())
                    .collect();
                copy.key_idx = v["key"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|k| {
                        columns
                            .iter()
                            .position(|c| c == &k.as_str().unwrap())
                            .unwrap()
                    })
                    .collect();
                copy.version = v["version"].as_u64().unwrap();
                copy.rows = HashMap::new();
                for row in v["rows"].as_array().unwrap() {
                    let k = copy.key_of(row);
                    copy.rows.insert(k, row.clone());
                }
                copy.snapshots += 1;
            }
            "subscribed" => {
                let copy = self.subs.get_mut(&id).unwrap();
                copy.version = v["version"].as_u64().unwrap();
                copy.resumed += 1;
            }
            "delta" => {
                let copy = self.subs.get_mut(&id).expect("delta for a subscription");
                let version = v["version"].as_u64().unwrap();
                assert!(
                    version > copy.version,
                    "{id}: delta {version} after version {}",
                    copy.version
                );
                copy.version = version;
                for key in v["deletes"].as_array().unwrap() {
                    copy.rows.remove(&key.to_string());
                }
                for row in v["upserts"].as_array().unwrap() {
                    let k = copy.key_of(row);
                    copy.rows.insert(k, row.clone());
                }
                copy.deltas += 1;
                if v["coalesced"] == true {
                    copy.coalesced += 1;
                }
                if let Some(t) = v["acked_at"].as_f64() {
                    self.latencies.push(now_ms() - t);
                }
            }
            "error" => self.errors.push(v.clone()),
            other => {
                self.seen.push(other.to_owned());
                self.acks.push((other.to_owned(), id));
            }
        }
    }

    /// Reads until `done` holds, for at most `secs`.
    async fn until(&mut self, secs: u64, mut done: impl FnMut(&Self) -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !done(self) {
            if Instant::now() > deadline || self.closed.is_some() {
                return false;
            }
            self.step(Duration::from_millis(100)).await;
        }
        true
    }

    /// The next error frame.
    async fn error(&mut self) -> Value {
        let before = self.errors.len();
        assert!(
            self.until(10, |c| c.errors.len() > before).await,
            "no error frame came"
        );
        self.errors[before].clone()
    }
}

/// A subscription, the SQL that gives its filtered rows, and the view.
struct Case {
    id: &'static str,
    view: &'static str,
    filter: Value,
    sql: &'static str,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            id: "all",
            view: "stock_on_hand",
            filter: Value::Null,
            sql: "SELECT * FROM stock_on_hand",
        },
        Case {
            id: "w1",
            view: "stock_on_hand",
            filter: json!({"warehouse_id": "W1"}),
            sql: "SELECT * FROM stock_on_hand WHERE warehouse_id = 'W1'",
        },
        Case {
            id: "plenty",
            view: "stock_on_hand",
            filter: json!({"on_hand": {"gte": 20, "lt": 60}}),
            sql: "SELECT * FROM stock_on_hand WHERE on_hand >= 20 AND on_hand < 60",
        },
        Case {
            id: "low",
            view: "low_stock",
            filter: json!({"sku": {"in": ["SKU-1", "SKU-2"]}}),
            sql: "SELECT * FROM low_stock WHERE sku IN ('SKU-1', 'SKU-2')",
        },
        Case {
            id: "status",
            view: "orders_by_status",
            filter: Value::Null,
            sql: "SELECT * FROM orders_by_status",
        },
        Case {
            id: "rev",
            view: "revenue_per_minute",
            filter: json!({"warehouse_id": "W2"}),
            sql: "SELECT * FROM revenue_per_minute WHERE warehouse_id = 'W2'",
        },
        Case {
            id: "open",
            view: "orders_current",
            filter: json!({"status": {"in": ["paid", "shipped"]}}),
            sql: "SELECT * FROM orders_current WHERE status IN ('paid', 'shipped')",
        },
    ]
}

/// One random round of inventory and order events.
async fn ingest_round(server: &TestServer, rng: &mut StdRng, round: usize, n: usize) {
    ingest_skus(server, rng, round, n, 5).await;
}

/// [`ingest_round`] over `skus` different SKUs.
async fn ingest_skus(server: &TestServer, rng: &mut StdRng, round: usize, n: usize, skus: usize) {
    let mut inv = String::new();
    let mut orders = String::new();
    for i in 0..n {
        let sku = format!("SKU-{}", rng.random_range(1..=skus));
        let wh = format!("W{}", rng.random_range(1..=3));
        let qty: i64 = if rng.random_bool(0.6) {
            rng.random_range(1..=30)
        } else {
            -rng.random_range(1..=25)
        };
        let kind = if qty > 0 { "receipt" } else { "sale" };
        inv.push_str(&format!(
            r#"{{"event_id":"i-{round}-{i}","event_time":"2026-11-25T10:{:02}:{:02}Z","sku":"{sku}","warehouse_id":"{wh}","kind":"{kind}","quantity":{qty}}}"#,
            rng.random_range(0..5),
            rng.random_range(0..60)
        ));
        inv.push('\n');
        let status =
            ["created", "paid", "shipped", "delivered", "cancelled"][rng.random_range(0..5)];
        orders.push_str(&format!(
            r#"{{"event_id":"o-{round}-{i}","event_time":"2026-11-25T10:{:02}:{:02}Z","order_id":"ord-{}","customer_id":"c{}","warehouse_id":"{wh}","sku":"{sku}","quantity":{},"unit_price":"{}.{:02}","status":"{status}"}}"#,
            rng.random_range(0..5),
            rng.random_range(0..60),
            rng.random_range(0..40),
            rng.random_range(0..9),
            rng.random_range(1..5),
            rng.random_range(1..40),
            rng.random_range(0..100)
        ));
        orders.push('\n');
    }
    for (stream, body) in [("inventory", inv), ("orders", orders)] {
        let r = server.post(stream, "application/x-ndjson", body).await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
}

async fn view_version(server: &TestServer, view: &str) -> u64 {
    server.get_json(&format!("/v1/views/{view}")).await["version"]
        .as_u64()
        .unwrap()
}

/// The view's version, or `None` while acknowledged events are still to be applied
/// (`lag_ms` is 0 only when nothing is pending).
async fn caught_up_version(server: &TestServer, view: &str) -> Option<u64> {
    let info = server.get_json(&format!("/v1/views/{view}")).await;
    (info["lag_ms"].as_u64() == Some(0)).then(|| info["version"].as_u64().unwrap())
}

/// The rows `sql` gives and the view's version, read while the view has applied every
/// acknowledged event and its version holds still (which it does within seconds once
/// ingest stops; a view that never settles fails). A version that merely held still
/// for one query is not enough: on a busy machine the maintainer can be mid-batch.
async fn settled(server: &TestServer, view: &str, sql: &str) -> (u64, Vec<Value>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(before) = caught_up_version(server, view).await {
            let rows = sorted(&server.sql_rows(sql).await);
            if caught_up_version(server, view).await == Some(before) {
                return (before, rows);
            }
        }
        assert!(
            Instant::now() < deadline,
            "{view} did not catch up and hold still for one query in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sorted(rows: &Value) -> Vec<Value> {
    let mut rows = rows.as_array().unwrap().clone();
    rows.sort_by_key(|r| r.to_string());
    rows
}

/// Waits until every subscription's copy equals its SQL; unfiltered ones must also
/// have reached the view's version.
async fn check_converged(
    server: &TestServer,
    clients: &mut [&mut Client],
    cases: &[Case],
    round: usize,
) {
    for case in cases {
        let client = clients
            .iter_mut()
            .find(|c| c.subs.contains_key(case.id))
            .unwrap();
        let (version, want) = settled(server, case.view, case.sql).await;
        let exact = case.filter.is_null();
        let ok = client
            .until(20, |c| {
                let copy = &c.subs[case.id];
                (!exact || copy.version == version) && copy.sorted_rows() == want
            })
            .await;
        assert!(
            ok,
            "round {round}: '{}' on {} (version {} of {version}) differs from SQL:\n mine {:?}\n want {:?}\n errors {:?}",
            case.id,
            case.view,
            client.subs[case.id].version,
            client.subs[case.id].sorted_rows(),
            want,
            client.errors
        );
    }
}

#[tokio::test]
async fn subscribers_follow_views_through_random_batches_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), &["--view-history", "16"]).await;
    let mut rng = StdRng::seed_from_u64(0x5EED);
    ingest_round(&server, &mut rng, 0, 40).await;

    let cases = cases();
    // Two connections: one authenticated by header, one by a first message.
    let mut a = Client::connect(&server, ADMIN, true).await;
    let mut b = Client::connect(&server, ADMIN, false).await;
    for (i, case) in cases.iter().enumerate() {
        let c = if i < 4 { &mut a } else { &mut b };
        c.subscribe(case.id, case.view, case.filter.clone(), None)
            .await;
    }
    check_converged(&server, &mut [&mut a, &mut b], &cases, 0).await;
    assert!(
        a.subs
            .values()
            .chain(b.subs.values())
            .all(|s| s.snapshots == 1)
    );

    for round in 1..=8 {
        let n = rng.random_range(5..60);
        ingest_round(&server, &mut rng, round, n).await;
        check_converged(&server, &mut [&mut a, &mut b], &cases, round).await;
    }
    let deltas: usize = a
        .subs
        .values()
        .chain(b.subs.values())
        .map(|s| s.deltas)
        .sum();
    assert!(deltas >= 8, "only {deltas} deltas arrived");
    assert!(
        a.errors.is_empty() && b.errors.is_empty(),
        "{:?} {:?}",
        a.errors,
        b.errors
    );

    // Reconnect with resume: the missed changes arrive as deltas, with no new snapshot.
    let versions: Vec<(String, u64)> = a.subs.iter().map(|(k, s)| (k.clone(), s.version)).collect();
    let saved: HashMap<String, Copy> = std::mem::take(&mut a.subs);
    drop(a);
    ingest_round(&server, &mut rng, 100, 30).await;
    let mut a = Client::connect(&server, ADMIN, true).await;
    a.subs = saved;
    for (id, version) in &versions {
        let case = cases.iter().find(|c| c.id == id).unwrap();
        let filter = case.filter.clone();
        a.send(json!({"type": "subscribe", "id": id, "view": case.view, "filter": filter, "from_version": version}))
            .await;
    }
    check_converged(&server, &mut [&mut a, &mut b], &cases, 100).await;
    for (id, copy) in &a.subs {
        assert_eq!(copy.snapshots, 1, "{id} was resent a snapshot on resume");
        assert_eq!(copy.resumed, 1, "{id} did not resume");
    }

    // A resume from further back than the kept history, or from a version the view never
    // had, gets a fresh snapshot instead.
    let old = a.subs["all"].version;
    for round in 200..230 {
        ingest_round(&server, &mut rng, round, 3).await;
        if view_version(&server, "stock_on_hand").await > old + 20 {
            break;
        }
    }
    // After its acknowledgement, an unsubscribed id gets nothing more, while another
    // unfiltered subscription of the same connection to the same view still moves.
    a.subscribe("witness", "stock_on_hand", Value::Null, None)
        .await;
    assert!(a.until(10, |c| c.subs["witness"].snapshots == 1).await);
    a.send(json!({"type": "unsubscribe", "id": "all"})).await;
    assert!(
        a.until(10, |c| c
            .acks
            .iter()
            .any(|(t, id)| t == "unsubscribed" && id == "all"))
            .await,
        "no unsubscribed frame for 'all'"
    );
    let gone = a.subs.remove("all").unwrap();
    ingest_round(&server, &mut rng, 199, 10).await;
    let moved = view_version(&server, "stock_on_hand").await;
    assert!(moved > gone.version);
    assert!(
        a.until(20, |c| c.subs["witness"].version >= moved).await,
        "the witness stopped at {} before {moved}",
        a.subs["witness"].version
    );
    assert!(
        a.strays.is_empty(),
        "frames for unsubscribed ids: {:?}",
        a.strays
    );
    a.subs.insert("all".into(), gone);
    a.send(
        json!({"type": "subscribe", "id": "all2", "view": "stock_on_hand", "from_version": old}),
    )
    .await;
    a.subs.insert("all2".into(), Copy::default());
    assert!(
        a.until(10, |c| c.subs["all2"].snapshots == 1).await,
        "no snapshot for an old resume"
    );
    a.send(json!({"type": "subscribe", "id": "future", "view": "stock_on_hand", "from_version": 1u64 << 40}))
        .await;
    a.subs.insert("future".into(), Copy::default());
    assert!(
        a.until(10, |c| c.subs["future"].snapshots == 1).await,
        "no snapshot for a future version"
    );
    // The snapshot may be one the group encoded earlier, followed by the deltas since.
    let want = sorted(&server.sql_rows("SELECT * FROM stock_on_hand").await);
    assert!(
        a.until(10, |c| c.subs["future"].sorted_rows() == want)
            .await,
        "the future resume's copy {:?} never reached {want:?}",
        a.subs["future"].sorted_rows()
    );

    let metrics = server.metrics_text().await;
    for name in [
        "quiver_ws_connections ",
        "quiver_ws_subscriptions ",
        "quiver_ws_deltas_sent_total ",
        "quiver_ws_snapshots_sent_total ",
        "quiver_ws_queue_bytes ",
        "quiver_ws_coalesced_total ",
        "quiver_ws_catch_ups_total ",
        "quiver_ws_resnapshots_total ",
        "quiver_ws_delivery_seconds_count ",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    assert!(metrics.contains("quiver_ws_connections 2"), "{metrics}");
}

#[tokio::test]
async fn a_later_subscriber_gets_the_shared_snapshot_and_the_deltas_since() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), &[]).await;
    let mut rng = StdRng::seed_from_u64(0xCAFE);
    ingest_round(&server, &mut rng, 0, 40).await;
    let cases: Vec<Case> = cases()
        .into_iter()
        .filter(|c| c.id == "w1" || c.id == "open")
        .collect();
    // The first subscriber of each (view, filter) has its snapshot encoded.
    let mut first = Client::connect(&server, ADMIN, true).await;
    for case in &cases {
        first
            .subscribe(case.id, case.view, case.filter.clone(), None)
            .await;
    }
    check_converged(&server, &mut [&mut first], &cases, 0).await;
    // The views move on.
    for round in 1..=3 {
        ingest_round(&server, &mut rng, round, 30).await;
        check_converged(&server, &mut [&mut first], &cases, round).await;
    }
    // A later subscriber of the same (view, filter) is served that snapshot, older than
    // the view now, followed by the kept deltas since: it must still equal SQL.
    let mut later = Client::connect(&server, ADMIN, true).await;
    for case in &cases {
        let now = view_version(&server, case.view).await;
        later
            .subscribe(case.id, case.view, case.filter.clone(), None)
            .await;
        assert!(
            later.until(10, |c| c.subs[case.id].snapshots == 1).await,
            "{}: no snapshot",
            case.id
        );
        let snapshot_version = later.subs[case.id].version;
        assert!(
            snapshot_version < now,
            "{}: the snapshot (version {snapshot_version}) was encoded again, not shared (view at {now})",
            case.id
        );
    }
    check_converged(&server, &mut [&mut later], &cases, 4).await;
    assert!(
        later
            .subs
            .values()
            .all(|s| s.deltas > 0 && s.snapshots == 1),
        "the shared snapshot is followed by deltas"
    );
    // And both keep following new changes.
    ingest_round(&server, &mut rng, 5, 30).await;
    check_converged(&server, &mut [&mut first, &mut later], &cases, 5).await;
}

/// A view with a temporal filter, followed over the WebSocket on the real clock: rows
/// come in as events arrive and go out, as deletes, once they are older than the
/// window; the view and ad-hoc SQL with `now()` agree it is then empty.
#[tokio::test]
async fn rows_that_age_out_of_a_temporal_view_reach_subscribers_as_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let start = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let server = TestServer::start(dir.path(), &["--view-clock-start", start.as_str()]).await;
    let created = server
        .sql_as(
            ADMIN,
            "CREATE MATERIALIZED VIEW fresh_lines AS SELECT event_id, sku, event_time FROM orders \
             WHERE event_time > now() - INTERVAL '3 seconds'",
            json!([]),
            "json",
        )
        .await;
    assert_eq!(created.status(), 201, "{}", created.text().await.unwrap());
    let mut client = Client::connect(&server, ADMIN, true).await;
    client
        .subscribe("fresh", "fresh_lines", Value::Null, None)
        .await;
    assert!(client.until(10, |c| c.subs["fresh"].snapshots == 1).await);
    let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let body: String = (0..3)
        .map(|i| {
            format!(
                "{{\"event_id\":\"t-{i}\",\"event_time\":\"{at}\",\"order_id\":\"o{i}\",\"customer_id\":\"c1\",\"warehouse_id\":\"W1\",\"sku\":\"S{i}\",\"quantity\":1,\"unit_price\":\"1.00\",\"status\":\"paid\"}}\n"
            )
        })
        .collect();
    let r = server.post("orders", "application/x-ndjson", body).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let arrived = Instant::now();
    assert!(
        client.until(10, |c| c.subs["fresh"].rows.len() == 3).await,
        "the rows never arrived: {:?}",
        client.subs["fresh"].rows
    );
    let deltas_in = client.subs["fresh"].deltas;
    assert!(
        client.until(15, |c| c.subs["fresh"].rows.is_empty()).await,
        "the rows never left: {:?}",
        client.subs["fresh"].rows
    );
    // Not before they were three seconds old.
    assert!(
        arrived.elapsed() >= Duration::from_millis(2500),
        "{:?}",
        arrived.elapsed()
    );
    assert!(client.subs["fresh"].deltas > deltas_in);
    assert!(client.errors.is_empty(), "{:?}", client.errors);
    assert_eq!(
        server.sql_rows("SELECT count(*) FROM fresh_lines").await,
        json!([[0]])
    );
    assert_eq!(
        server
            .sql_rows("SELECT count(*) FROM orders WHERE event_time > now() - INTERVAL '3 seconds'")
            .await,
        json!([[0]])
    );
    assert_eq!(
        server.sql_rows("SELECT count(*) FROM orders").await,
        json!([[3]])
    );
}

/// A client whose socket reads nothing: a tiny receive buffer, so the server's writes
/// block and its queue fills.
async fn stalled_client(server: &TestServer) -> Ws {
    let addr: std::net::SocketAddr = server.url.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let mut req = ws_url(server).into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    let (ws, _) = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(tcp))
        .await
        .unwrap();
    ws
}

#[tokio::test]
async fn a_slow_reader_converges_while_a_fast_one_keeps_up() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(
        dir.path(),
        &["--ws-queue-bytes", "262144", "--ws-write-timeout", "60s"],
    )
    .await;
    let mut rng = StdRng::seed_from_u64(7);
    ingest_skus(&server, &mut rng, 0, 3000, 3000).await;

    let mut fast = Client::connect(&server, ADMIN, true).await;
    fast.subscribe("cur", "stock_on_hand", Value::Null, None)
        .await;
    assert!(fast.until(10, |c| c.subs["cur"].snapshots == 1).await);

    let mut slow = Client::new(stalled_client(&server).await);
    // The same view under several ids, so the slow connection's share of frames grows
    // faster than the socket buffers can hide.
    let slow_ids = ["cur", "cur2", "cur3", "cur4", "cur5", "cur6"];
    for id in slow_ids {
        slow.subscribe(id, "stock_on_hand", Value::Null, None).await;
    }
    // Let the snapshots arrive, then stop reading.
    assert!(
        slow.until(20, |c| slow_ids.iter().all(|id| c.subs[*id].snapshots == 1))
            .await
    );

    // Rounds while the slow reader reads nothing and the fast one reads all along, until
    // the socket buffers between the server and the slow reader are full and its queue
    // passes the bound (it is then marked to catch up from the kept deltas).
    let mut ingest_ms = Vec::new();
    let backed_up = |metrics: &str| {
        [
            "quiver_ws_catch_ups_total ",
            "quiver_ws_coalesced_total ",
            "quiver_ws_resnapshots_total ",
        ]
        .iter()
        .any(|name| {
            metrics
                .lines()
                .any(|l| l.starts_with(name) && !l.ends_with(" 0"))
        })
    };
    for round in 1..=400 {
        let t = Instant::now();
        ingest_skus(&server, &mut rng, round, 400, 3000).await;
        ingest_ms.push(t.elapsed().as_millis());
        while fast.step(Duration::from_millis(5)).await.is_some() {}
        if round % 10 == 0 && backed_up(&server.metrics_text().await) {
            // A few more rounds with the slow reader marked to catch up.
            for extra in 1..=10 {
                ingest_skus(&server, &mut rng, 1000 + extra, 400, 3000).await;
                while fast.step(Duration::from_millis(5)).await.is_some() {}
            }
            break;
        }
    }
    let (version, want) = settled(&server, "stock_on_hand", "SELECT * FROM stock_on_hand").await;
    assert!(
        fast.until(20, |c| c.subs["cur"].version == version
            && c.subs["cur"].sorted_rows() == want)
            .await,
        "the fast reader did not keep up: version {} of {version}, {} rows of {}, {} coalesced, {} snapshots; first difference {:?}",
        fast.subs["cur"].version,
        fast.subs["cur"].rows.len(),
        want.len(),
        fast.subs["cur"].coalesced,
        fast.subs["cur"].snapshots,
        fast.subs["cur"]
            .sorted_rows()
            .iter()
            .zip(&want)
            .find(|(a, b)| a != b)
    );
    assert_eq!(
        fast.subs["cur"].coalesced, 0,
        "the fast reader was coalesced"
    );
    assert_eq!(
        fast.subs["cur"].snapshots, 1,
        "the fast reader was resnapshotted"
    );
    let mut lat = fast.latencies.clone();
    lat.sort_by(f64::total_cmp);
    let worst = lat.last().copied().unwrap_or_default();
    // The slow reader's writes may block for up to the 60 s write timeout. Had the fast
    // reader or ingest waited for it, they would show that wait; the bound is a quarter
    // of it, so a loaded machine's slower maintenance does not trip it. (Latency itself
    // is measured by `benches/push.sh`, not here.)
    assert!(
        worst < 15_000.0,
        "fast reader latency up to {worst:.0} ms: {lat:?}"
    );
    let worst_ingest = ingest_ms.iter().max().unwrap();
    assert!(*worst_ingest < 15_000, "an ingest took {worst_ingest} ms");

    let metrics = server.metrics_text().await;
    let count = |name: &str| metric(&metrics, name);
    assert!(
        count("quiver_ws_coalesced_total")
            + count("quiver_ws_catch_ups_total")
            + count("quiver_ws_resnapshots_total")
            >= 1.0,
        "the slow reader was neither coalesced nor resnapshotted:\n{metrics}"
    );
    assert!(
        count("quiver_ws_queue_bytes") <= 2.0 * 262144.0,
        "queue over its bound"
    );

    // Now it reads: it converges to the same rows through coalesced deltas or a snapshot.
    assert!(
        slow.until(60, |c| slow_ids.iter().all(|id| c.subs[*id].version
            == version
            && c.subs[*id].sorted_rows() == want))
            .await,
        "the slow reader did not converge (version {} of {version})",
        slow.subs["cur"].version
    );
    // Held back: it got coalesced deltas or snapshots beyond its first, or was replayed
    // the group's kept deltas instead of queueing them (a catch-up).
    let extra_frames = slow
        .subs
        .values()
        .map(|s| s.coalesced + s.snapshots)
        .sum::<usize>()
        - slow_ids.len();
    assert!(
        extra_frames as f64 + count("quiver_ws_catch_ups_total") > 0.0,
        "the slow reader got every delta one by one, as queued"
    );
}

/// A stalled reader whose backlog passes its bound is caught up from the group's kept
/// deltas folded per key: it gets `"coalesced"` frames (fewer than the versions it
/// missed, since the rounds hit the same keys), no second snapshot, and ends equal to
/// SQL. The bound is tiny, so any backlog is past it once the socket buffers are full.
#[tokio::test]
async fn a_backlog_past_the_bound_arrives_folded_per_key() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(
        dir.path(),
        &["--ws-queue-bytes", "1024", "--ws-write-timeout", "60s"],
    )
    .await;
    let mut rng = StdRng::seed_from_u64(11);
    // 100 SKUs in 3 warehouses: every round changes most of the same 300 keys.
    ingest_skus(&server, &mut rng, 0, 500, 100).await;
    let mut slow = Client::new(stalled_client(&server).await);
    // The same view under several ids, so the socket buffers fill in fewer rounds.
    let ids = ["a", "b", "c", "d", "e", "f", "g", "h"];
    for id in ids {
        slow.subscribe(id, "stock_on_hand", Value::Null, None).await;
    }
    assert!(
        slow.until(20, |c| ids.iter().all(|id| c.subs[*id].snapshots == 1))
            .await
    );
    let first = slow.subs["a"].version;

    // 8 subscriptions × 300 keys × about 80 bytes is about 190 KB of frames a round:
    // 60 rounds are about 11 MB, more than the socket buffers between server and
    // client hold, so the later rounds pile up behind a blocked write.
    for round in 1..=60 {
        ingest_skus(&server, &mut rng, round, 2000, 100).await;
    }
    let (version, want) = settled(&server, "stock_on_hand", "SELECT * FROM stock_on_hand").await;
    let missed = version - first;
    assert!(
        missed < 200,
        "{missed} versions: past the kept deltas a snapshot would come instead"
    );

    assert!(
        slow.until(60, |c| ids.iter().all(
            |id| c.subs[*id].version == version && c.subs[*id].sorted_rows() == want
        ))
        .await,
        "the stalled reader did not converge (version {} of {version})",
        slow.subs["a"].version
    );
    for id in ids {
        let copy = &slow.subs[id];
        assert_eq!(copy.snapshots, 1, "{id} was caught up by a snapshot");
    }
    let folded: usize = ids.iter().map(|id| slow.subs[*id].coalesced).sum();
    let frames: usize = ids.iter().map(|id| slow.subs[*id].deltas).sum();
    assert!(folded >= 1, "no folded frame in {frames} delta frames");
    assert!(
        (frames as u64) < missed * ids.len() as u64,
        "{frames} delta frames for {missed} versions on {} subscriptions: nothing was folded",
        ids.len()
    );
    let metrics = server.metrics_text().await;
    assert!(metric(&metrics, "quiver_ws_coalesced_total ") >= folded as f64);
    assert_eq!(metric(&metrics, "quiver_ws_resnapshots_total "), 0.0);
}

/// Memory stays bounded however many clients stall: past `--ws-total-queue-bytes` (the
/// pending deltas of all connections together) a subscription that already has deltas
/// pending is caught up later from its group's kept deltas instead of queueing more, so
/// the queues hold at most the budget plus one delta per connection, well below what
/// each connection's own bound (1 MiB here) would allow. Every stalled reader still
/// converges to SQL.
#[tokio::test]
async fn stalled_readers_together_stay_within_the_queue_budget() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 16 * 1024;
    let server = TestServer::start(
        dir.path(),
        &[
            "--ws-total-queue-bytes",
            &budget.to_string(),
            "--ws-queue-bytes",
            "1048576",
            "--ws-write-timeout",
            "60s",
        ],
    )
    .await;
    let mut rng = StdRng::seed_from_u64(13);
    ingest_skus(&server, &mut rng, 0, 500, 100).await;
    let ids = ["a", "b", "c", "d", "e", "f", "g", "h"];
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut c = Client::new(stalled_client(&server).await);
        for id in ids {
            c.subscribe(id, "stock_on_hand", Value::Null, None).await;
        }
        assert!(
            c.until(20, |c| ids.iter().all(|id| c.subs[*id].snapshots == 1))
                .await
        );
        stalled.push(c);
    }

    // As in the folded backlog test, about 190 KB of frames a round per connection:
    // the socket buffers fill within a few rounds and the rest waits in the queues.
    let mut peak: f64 = 0.0;
    for round in 1..=40 {
        ingest_skus(&server, &mut rng, round, 2000, 100).await;
        let metrics = server.metrics_text().await;
        peak = peak.max(metric(&metrics, "quiver_ws_queue_bytes "));
    }
    let metrics = server.metrics_text().await;
    assert!(
        metric(&metrics, "quiver_ws_catch_ups_total ") > 0.0,
        "the queues never overflowed: the test put no pressure on them"
    );
    // One delta of this view is at most 300 keys of about 80 bytes.
    let one_delta = 300.0 * 100.0;
    let bound = budget as f64 + stalled.len() as f64 * one_delta;
    assert!(
        peak <= bound,
        "queues held {peak} bytes, past the budget of {budget} plus one delta per connection ({bound})"
    );

    let (version, want) = settled(&server, "stock_on_hand", "SELECT * FROM stock_on_hand").await;
    for (n, c) in stalled.iter_mut().enumerate() {
        assert!(
            c.until(60, |c| ids.iter().all(
                |id| c.subs[*id].version == version && c.subs[*id].sorted_rows() == want
            ))
            .await,
            "stalled reader {n} did not converge (version {} of {version})",
            c.subs["a"].version
        );
    }
}

/// Encoded snapshots are held within `--ws-snapshot-bytes`: while a stalled client is
/// still being written a large snapshot, a new snapshot waits, and goes out once that
/// client has been dropped for slowness. The waiting subscriber still equals SQL, and
/// no snapshot stays held once nobody is being written one.
#[tokio::test]
async fn a_new_snapshot_waits_while_the_snapshot_budget_is_spent() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(
        dir.path(),
        &["--ws-snapshot-bytes", "1", "--ws-write-timeout", "2s"],
    )
    .await;
    let mut rng = StdRng::seed_from_u64(0xB0D6E7);
    // About 140,000 order lines: a snapshot of about 10 MB, more than the socket
    // buffers between the server and a client that reads nothing can take.
    for round in 0..16 {
        ingest_skus(&server, &mut rng, round, 10_000, 160_000).await;
    }
    // The view must hold them all before the snapshot is taken.
    let lines = server
        .sql_rows("SELECT count(*) FROM (SELECT DISTINCT order_id, sku FROM orders)")
        .await[0][0]
        .clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.sql_rows("SELECT count(*) FROM orders_current").await[0][0] != lines {
        assert!(Instant::now() < deadline, "the view never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut stalled = Client::new(stalled_client(&server).await);
    stalled
        .subscribe("all", "orders_current", Value::Null, None)
        .await;
    // Its snapshot is encoded, and stuck in the socket until the write timeout.
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&server.metrics_text().await, "quiver_ws_snapshot_bytes ") == 0.0 {
        assert!(
            Instant::now() < deadline,
            "the stalled client's snapshot was never made"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let case = cases().into_iter().find(|c| c.id == "open").unwrap();
    let mut waiting = Client::connect(&server, ADMIN, true).await;
    let asked = Instant::now();
    waiting
        .subscribe(case.id, case.view, case.filter.clone(), None)
        .await;
    assert!(
        waiting.until(30, |c| c.subs[case.id].snapshots == 1).await,
        "no snapshot once the stalled client was dropped"
    );
    let waited = asked.elapsed();
    let metrics = server.metrics_text().await;
    assert!(
        metric(&metrics, "quiver_ws_snapshot_waits_total ") >= 1.0,
        "the new snapshot did not wait:\n{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("quiver_ws_closed_total{code=\"slow\"}") && !l.ends_with(" 0")),
        "the stalled client was not dropped as slow:\n{metrics}"
    );
    // It waited for the stalled client's write timeout (2 s), less the time taken
    // before it asked.
    assert!(
        waited >= Duration::from_millis(500),
        "waited only {waited:?}"
    );
    check_converged(&server, &mut [&mut waiting], std::slice::from_ref(&case), 0).await;
}

/// Opens a TCP connection and sends a WebSocket upgrade request with `extra_headers`
/// (each ending in CRLF).
async fn send_upgrade(server: &TestServer, extra_headers: &str) -> tokio::net::TcpStream {
    let addr = server.url.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    tcp
}

/// Sends a raw upgrade request and returns the status line and headers.
async fn raw_upgrade(server: &TestServer, extra_headers: &str) -> String {
    let mut tcp = send_upgrade(server, extra_headers).await;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).to_string()
}

#[tokio::test]
async fn refusals_errors_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(
        dir.path(),
        &[
            "--ws-max-connections-per-token",
            "3",
            "--ws-max-subscriptions-per-token",
            "3",
            "--ws-max-message-bytes",
            "2048",
            "--ws-allowed-origins",
            "https://dash.example.com",
            "--ws-idle-timeout",
            "1s",
            "--ws-ping-interval",
            "200ms",
        ],
    )
    .await;

    // Wrong token in the header: refused before the upgrade.
    let head = raw_upgrade(&server, "Authorization: Bearer qv_nope_nope\r\n").await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    // A foreign Origin is refused; an allowed one and no Origin at all are upgraded.
    let head = raw_upgrade(&server, "Origin: https://evil.example.com\r\n").await;
    assert!(
        head.starts_with("HTTP/1.1 403") && head.contains("forbidden_origin"),
        "{head}"
    );
    let head = raw_upgrade(&server, "Origin: https://dash.example.com\r\n").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // Compression is negotiated when the client offers it.
    let head = raw_upgrade(
        &server,
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
    )
    .await;
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-extensions: permessage-deflate"),
        "{head}"
    );

    // No token: the first message must be auth; anything else is refused and closed.
    let mut anon = Client::open(&server, None).await;
    anon.send(json!({"type": "subscribe", "id": "s", "view": "stock_on_hand"}))
        .await;
    let e = anon.error().await;
    assert_eq!(e["code"], "unauthorized", "{e}");
    assert!(anon.until(5, |c| c.closed.is_some()).await || anon.closed.is_some());
    assert_eq!(anon.closed.as_ref().unwrap().0, 1008);
    let mut wrong = Client::connect(&server, "qv_abc_def", false).await;
    assert_eq!(wrong.error().await["code"], "unauthorized");

    // Malformed frames, unknown views, bad filters: each an error frame; the connection lives.
    let mut c = Client::connect(&server, ADMIN, true).await;
    c.ws.send(Message::text("{not json")).await.unwrap();
    assert_eq!(c.error().await["code"], "bad_message");
    c.ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(c.error().await["code"], "bad_message");
    c.send(json!({"type": "dance"})).await;
    let e = c.error().await;
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("unknown message type 'dance'"),
        "{e}"
    );
    c.send(json!({"type": "subscribe", "view": "stock_on_hand"}))
        .await;
    assert_eq!(c.error().await["code"], "bad_message");
    c.send(json!({"type": "subscribe", "id": "x", "view": "nope"}))
        .await;
    let e = c.error().await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("unknown_view"), Some("x")),
        "{e}"
    );
    assert!(
        e["message"].as_str().unwrap().contains("stock_on_hand"),
        "{e}"
    );
    for (filter, says) in [
        (json!({"colour": "red"}), "unknown column 'colour'"),
        (json!({"on_hand": "lots"}), "'on_hand' is Int64"),
        (json!({"sku": {"like": "A%"}}), "unknown condition 'like'"),
        (json!("sku = 'A' OR 1=1"), "JSON object"),
    ] {
        c.send(json!({"type": "subscribe", "id": "f", "view": "stock_on_hand", "filter": filter}))
            .await;
        let e = c.error().await;
        assert_eq!(e["code"], "bad_filter", "{e}");
        assert!(
            e["message"].as_str().unwrap().contains(says),
            "{e} should say {says}"
        );
    }
    c.send(json!({"type": "unsubscribe", "id": "never"})).await;
    assert_eq!(c.error().await["code"], "unknown_subscription");
    c.send(json!({"type": "ping"})).await;
    assert!(
        c.until(5, |c| c.seen.iter().any(|t| t == "pong")).await,
        "no pong"
    );

    // Subscriptions per token: 3.
    for id in ["a", "b", "c"] {
        c.subscribe(id, "low_stock", Value::Null, None).await;
    }
    c.subscribe("a", "low_stock", Value::Null, None).await;
    assert_eq!(c.error().await["code"], "duplicate_id");
    c.subscribe("d", "low_stock", Value::Null, None).await;
    assert_eq!(c.error().await["code"], "too_many_subscriptions");
    c.send(json!({"type": "unsubscribe", "id": "a"})).await;
    assert!(
        c.until(5, |c| c.seen.iter().any(|t| t == "unsubscribed"))
            .await
    );
    c.subscribe("d", "low_stock", Value::Null, None).await;
    assert!(
        c.until(10, |c| c.subs["d"].snapshots == 1).await,
        "{:?}",
        c.errors
    );

    // A dropped view ends its subscriptions with an error frame; a view created anew
    // under the same name can be subscribed to again.
    for id in ["b", "c"] {
        c.send(json!({"type": "unsubscribe", "id": id})).await;
    }
    let view = json!({"name": "tmp_view", "sql": "SELECT sku, SUM(quantity) AS q FROM inventory GROUP BY sku"});
    let create = || async {
        let r = server
            .client
            .post(format!("{}/v1/views", server.url))
            .bearer_auth(ADMIN)
            .json(&view)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    };
    create().await;
    c.subscribe("t", "tmp_view", Value::Null, None).await;
    assert!(
        c.until(10, |c| c.subs["t"].snapshots == 1).await,
        "{:?}",
        c.errors
    );
    let r = server
        .client
        .delete(format!("{}/v1/views/tmp_view", server.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let e = c.error().await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("view_dropped"), Some("t")),
        "{e}"
    );
    create().await;
    c.subs.remove("t");
    c.subscribe("t", "tmp_view", Value::Null, None).await;
    assert!(
        c.until(10, |c| c.subs["t"].snapshots == 1).await,
        "{:?}",
        c.errors
    );

    // Connections per token: 3 (c plus two more); the fourth is refused.
    let _c2 = Client::connect(&server, ADMIN, true).await;
    let _c3 = Client::connect(&server, ADMIN, true).await;
    let head = raw_upgrade(&server, &format!("Authorization: Bearer {ADMIN}\r\n")).await;
    assert!(
        head.starts_with("HTTP/1.1 429") && head.contains("too_many_connections"),
        "{head}"
    );
    let mut over = Client::connect(&server, ADMIN, false).await;
    assert_eq!(over.error().await["code"], "too_many_connections");
    drop((_c2, _c3, over));
    crate::common::eventually(10, || async {
        server
            .metrics_text()
            .await
            .contains("quiver_ws_connections 1\n")
    })
    .await;

    // A message over the size limit closes the connection with 1009.
    let mut big = Client::connect(&server, ADMIN, true).await;
    big.ws
        .send(Message::text("x".repeat(10_000)))
        .await
        .unwrap();
    assert!(big.until(5, |c| c.closed.is_some()).await || big.closed.is_some());
    assert_eq!(big.closed.as_ref().unwrap().0, 1009, "{:?}", big.closed);

    // A client that never answers pings is dropped after the idle timeout, with 1001.
    let mut tcp = send_upgrade(&server, &format!("Authorization: Bearer {ADMIN}\r\n")).await;
    let mut bytes = Vec::new();
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut bytes))
        .await
        .expect("the server drops a silent client")
        .ok();
    // Within the idle timeout, two ping intervals and the second the server waits for
    // the client's close frame (about 2.4 s); the bound is generous for a loaded
    // machine and still far below the 15 s default that an ignored setting would give.
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "dropped too soon");
    assert!(took < Duration::from_secs(8), "dropped after {took:?}");
    let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(bytes.starts_with(b"HTTP/1.1 101"));
    // Walk the server's (unmasked, short) frames: pings, then a close.
    let mut at = head_end;
    let mut close = None;
    let mut pings = 0;
    while at + 2 <= bytes.len() {
        let (op, len) = (bytes[at] & 0x0f, (bytes[at + 1] & 0x7f) as usize);
        let payload = &bytes[at + 2..(at + 2 + len).min(bytes.len())];
        match op {
            9 => pings += 1,
            8 => {
                close = Some((
                    u16::from_be_bytes([payload[0], payload[1]]),
                    String::from_utf8_lossy(&payload[2..]).to_string(),
                ))
            }
            _ => {}
        }
        at += 2 + len;
    }
    assert!(pings >= 2, "{pings} pings before the close");
    let (code, reason) = close.expect("a close frame");
    assert_eq!(code, 1001, "{reason}");
    assert!(reason.contains("idle"), "{reason}");
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains(r#"quiver_ws_closed_total{code="idle"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"quiver_ws_errors_total{code="bad_filter"} 4"#),
        "{metrics}"
    );
}

/// The JavaScript client under Node, against a live server: see `api/js/test`.
#[tokio::test]
async fn the_javascript_client_under_node() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), &["--view-history", "64"]).await;
    run_node(
        &server,
        &[
            "--test",
            "--test-force-exit",
            "--test-timeout=120000",
            "test/",
        ],
    )
    .await;
}

/// The same client in headless Chromium (`js/browser/client.browser.mjs`): the module
/// the server serves, the browser's own WebSocket authenticating by first message from
/// the server's origin, callbacks per animation frame, a resume after a dropped
/// connection, a wrong token, and a page of another origin refused.
#[tokio::test]
async fn the_javascript_client_in_a_browser() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), &["--view-history", "64"]).await;
    run_node(&server, &["browser/client.browser.mjs"]).await;
}

/// Runs node in `api/js` against `server`; fails the test with node's output unless it
/// succeeds within 5 minutes.
async fn run_node(server: &TestServer, args: &[&str]) {
    run_node_with(server, args, &[]).await;
}

/// [`run_node`] with more environment variables.
pub(crate) async fn run_node_with(server: &TestServer, args: &[&str], env: &[(&str, &str)]) {
    let js = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("js");
    let node = tokio::process::Command::new("node")
        .args(args)
        .current_dir(&js)
        .env("QUIVER_URL", &server.url)
        .env("QUIVER_TOKEN", ADMIN)
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), node)
        .await
        .expect("node finishes in 5 minutes")
        .expect("node is installed (scripts/test.sh installs the test's npm packages)");
    // (Shown with `--no-capture`.)
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "node {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
