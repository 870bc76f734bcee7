//! Alert rules end to end: rules made over HTTP and SQL, evaluated on the views as
//! events are ingested, delivered to webhook receivers this test runs (signatures
//! checked with the `standardwebhooks` crate) and to a real SMTP sink (`aiosmtpd`),
//! retried, kept apart from a receiver that hangs, silenced, pushed over WebSocket,
//! read and acknowledged, and not fired again after a restart.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use futures::{SinkExt as _, StreamExt as _};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use crate::common::{ADMIN, TestServer, eventually, free_port};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One request a receiver got.
#[derive(Debug, Clone)]
struct Got {
    path: String,
    headers: HeaderMap,
    body: Vec<u8>,
    at: Instant,
}

#[derive(Debug, Default)]
struct Receiver {
    got: Mutex<Vec<Got>>,
    /// Requests to `/flaky` refused so far.
    refused: Mutex<u32>,
}

async fn hook(
    State(r): State<Arc<Receiver>>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    if path == "hang" {
        tokio::time::sleep(Duration::from_secs(120)).await;
    }
    if path == "flaky" {
        let mut refused = r.refused.lock();
        if *refused < 3 {
            *refused += 1;
            return StatusCode::SERVICE_UNAVAILABLE;
        }
    }
    r.got.lock().push(Got {
        path,
        headers,
        body: body.to_vec(),
        at: Instant::now(),
    });
    StatusCode::NO_CONTENT
}

async fn start_receiver() -> (SocketAddr, Arc<Receiver>) {
    let r = Arc::new(Receiver::default());
    let app = axum::Router::new()
        .route("/{path}", post(hook))
        .with_state(Arc::clone(&r));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, r)
}

fn got(r: &Receiver, path: &str) -> Vec<Got> {
    r.got
        .lock()
        .iter()
        .filter(|g| g.path == path)
        .cloned()
        .collect()
}

fn body(g: &Got) -> Value {
    serde_json::from_slice(&g.body).unwrap()
}

/// A local SMTP sink writing each message into a Maildir.
pub(crate) struct Smtp {
    child: std::process::Child,
    pub(crate) port: u16,
    maildir: std::path::PathBuf,
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) async fn start_smtp(dir: &std::path::Path) -> Smtp {
    let port = free_port();
    let maildir = dir.join("maildir");
    let child = std::process::Command::new("python3")
        .args([
            "-m",
            "aiosmtpd",
            "-n",
            "-l",
            &format!("127.0.0.1:{port}"),
            "-c",
            "aiosmtpd.handlers.Mailbox",
        ])
        .arg(&maildir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 -m aiosmtpd (pip install aiosmtpd)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the SMTP sink did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Smtp {
        child,
        port,
        maildir,
    }
}

pub(crate) fn mails(smtp: &Smtp) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(smtp.maildir.join("new")) else {
        return Vec::new();
    };
    dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .collect()
}

async fn stock(server: &TestServer, id: &str, sku: &str, qty: i64) {
    let line = format!(
        r#"{{"event_id":"{id}","event_time":"2026-01-05T10:00:00Z","sku":"{sku}","warehouse_id":"W1","kind":"adjustment","quantity":{qty}}}"#
    );
    let r = server
        .client
        .post(format!("{}/v1/streams/inventory/events", server.url))
        .bearer_auth(ADMIN)
        .header("content-type", "application/x-ndjson")
        .body(line)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

async fn post_json(server: &TestServer, token: &str, path: &str, v: Value) -> (u16, Value) {
    let r = server
        .client
        .post(format!("{}{path}", server.url))
        .bearer_auth(token)
        .json(&v)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn notifications(server: &TestServer) -> Vec<Value> {
    server.get_json("/v1/notifications?limit=1000").await["notifications"]
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_fire_deliver_retry_silence_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (hooks, receiver) = start_receiver().await;
    let smtp = start_smtp(dir.path()).await;
    let smtp_url = format!("smtp://127.0.0.1:{}", smtp.port);
    let mut server = TestServer::start(
        dir.path(),
        &[
            "--alert-retry",
            "100ms",
            "--alert-delivery-timeout",
            "60s",
            "--smtp-url",
            &smtp_url,
        ],
    )
    .await;
    let (_, made) = post_json(
        &server,
        ADMIN,
        "/v1/tokens",
        json!({"name": "viewer", "scopes": ["read"]}),
    )
    .await;
    let reader = made["token"].as_str().unwrap().to_owned();

    // Bad rules are refused, each with its reason.
    for (token, rule, status, says) in [
        (
            reader.as_str(),
            json!({"sql": "CREATE ALERT x ON stock_on_hand WHERE on_hand < 1"}),
            403,
            "admin",
        ),
        (
            ADMIN,
            json!({"name": "x", "view": "nowhere", "where": "on_hand < 1"}),
            400,
            "no view 'nowhere'",
        ),
        (
            ADMIN,
            json!({"name": "x", "view": "stock_on_hand", "where": "onhand < 1"}),
            400,
            "onhand",
        ),
        (
            ADMIN,
            json!({"name": "x", "view": "stock_on_hand", "where": "on_hand + 1"}),
            400,
            "not true or false",
        ),
        (
            ADMIN,
            json!({"name": "x", "view": "stock_on_hand", "where": "on_hand < 1", "for": "soon"}),
            400,
            "FOR 'soon'",
        ),
    ] {
        let (s, b) = post_json(&server, token, "/v1/alerts", rule.clone()).await;
        assert_eq!(s, status, "{rule}: {b}");
        let message = b["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{rule}: {message}");
    }

    // Three rules: one over HTTP with a known secret, one per odd receiver over SQL.
    let (s, b) = post_json(
        &server,
        ADMIN,
        "/v1/alerts",
        json!({
            "name": "low", "view": "stock_on_hand", "where": "on_hand < 5 AND sku LIKE 'A%'",
            "severity": "critical",
            "notify": [{"webhook": format!("http://{hooks}/ok"), "secret": SECRET},
                       {"email": "ops@example.com"}],
        }),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    for (name, sku, path) in [("stuck", "H", "hang"), ("flaky", "F", "flaky")] {
        let r = server
            .sql_as(
                ADMIN,
                &format!(
                    "CREATE ALERT {name} ON stock_on_hand WHERE on_hand < 5 AND sku = '{sku}' \
                     NOTIFY webhook 'http://{hooks}/{path}'"
                ),
                json!([]),
                "json",
            )
            .await;
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }
    let listed = server
        .sql_as(reader.as_str(), "SHOW ALERTS", json!([]), "json")
        .await;
    assert_eq!(listed.status(), 200);
    let listed: Value = listed.json().await.unwrap();
    assert_eq!(listed["rows"].as_array().unwrap().len(), 3, "{listed}");
    // The same over the Postgres wire, where SHOW is otherwise a session command.
    let shown = crate::bi::psql_ok(&server, "SHOW ALERTS");
    for name in ["low", "stuck", "flaky"] {
        assert!(shown.contains(name), "{shown}");
    }
    // Readers do not see secrets.
    let seen = server
        .client
        .get(format!("{}/v1/alerts/low", server.url))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert!(seen["notify"][0].get("secret").is_none(), "{seen}");

    // A subscriber of the notifications channel.
    let mut req = format!("{}/v1/ws", server.url.replace("http://", "ws://"))
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {reader}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send(Message::text(
        json!({"type": "subscribe", "id": "n", "view": "notifications"}).to_string(),
    ))
    .await
    .unwrap();

    // The hanging receiver's rule and the good one fire in the same batch.
    stock(&server, "i1", "H", 2).await;
    let fired_at = Instant::now();
    stock(&server, "i2", "A1", 2).await;
    eventually(10, || async { !got(&receiver, "ok").is_empty() }).await;
    let took = got(&receiver, "ok")[0].at - fired_at;
    assert!(
        took < Duration::from_secs(3),
        "the good receiver waited {took:?} behind the hanging one"
    );
    let first = got(&receiver, "ok").remove(0);
    let wh = standardwebhooks::Webhook::new(SECRET).unwrap();
    let hm = &first.headers;
    wh.verify(&first.body, hm)
        .expect("the signature verifies with the standardwebhooks crate");
    let tampered = [&first.body[..], b" "].concat();
    assert!(wh.verify(&tampered, hm).is_err());
    let b = body(&first);
    assert_eq!(b["type"], "alert.firing");
    assert_eq!(b["data"]["alert"], "low");
    assert_eq!(b["data"]["key"], json!({"sku": "A1", "warehouse_id": "W1"}));
    assert_eq!(b["data"]["row"]["on_hand"], 2);

    // The email, with the alert in the subject and the body.
    eventually(10, || async { !mails(&smtp).is_empty() }).await;
    let mail = mails(&smtp).remove(0);
    assert!(
        mail.contains("Subject: [CRITICAL] low firing for sku=A1"),
        "{mail}"
    );
    assert!(mail.contains("ops@example.com"), "{mail}");
    assert!(mail.contains("on_hand < 5"), "{mail}");

    // Pushed over the WebSocket.
    let mut pushed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pushed.iter().all(|m: &Value| m["type"] != "notification") {
        assert!(
            Instant::now() < deadline,
            "no notification pushed: {pushed:?}"
        );
        if let Ok(Some(Ok(Message::Text(t)))) =
            tokio::time::timeout(Duration::from_millis(500), ws.next()).await
        {
            pushed.push(serde_json::from_str(&t).unwrap());
        }
    }
    assert_eq!(pushed[0]["type"], "subscribed", "{pushed:?}");
    let note = pushed.iter().find(|m| m["type"] == "notification").unwrap();
    assert_eq!(note["notification"]["state"], "firing");

    // Retried after three refusals, each attempt visible.
    stock(&server, "i3", "F", 1).await;
    eventually(15, || async { !got(&receiver, "flaky").is_empty() }).await;
    // The server records the attempt once the receiver's answer is in, which can be
    // after the receiver has the message.
    eventually(5, || async {
        let d = server.get_json("/v1/alerts/flaky/deliveries").await;
        d["pending"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    let d = server.get_json("/v1/alerts/flaky/deliveries").await;
    let outcomes: Vec<&str> = d["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["failed", "failed", "failed", "delivered"], "{d}");
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains(r#"quiver_alert_deliveries_total{kind="webhook",outcome="failed"} 3"#),
        "{metrics}"
    );

    // Silenced: recorded, not sent.
    let (s, b) = post_json(
        &server,
        ADMIN,
        "/v1/silences",
        json!({"alert": "low", "matchers": {"sku": "A2"}, "duration": "1h", "comment": "restock due"}),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    stock(&server, "i4", "A2", 1).await;
    eventually(10, || async {
        notifications(&server)
            .await
            .iter()
            .any(|n| n["key"]["sku"] == "A2" && n["silenced"] == true)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(got(&receiver, "ok").len(), 1, "a silenced alert was sent");

    // Read over SQL and acknowledged.
    let ns = notifications(&server).await;
    let id = ns.iter().find(|n| n["key"]["sku"] == "A1").unwrap()["id"]
        .as_u64()
        .unwrap();
    let (s, b) = post_json(
        &server,
        &reader,
        &format!("/v1/notifications/{id}/read"),
        json!({}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["read_by"], "viewer");
    let r: Value = server
        .sql_as(
            &reader,
            "SELECT alert, state, read_by FROM notifications WHERE read_at IS NOT NULL",
            json!([]),
            "json",
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["rows"], json!([["low", "firing", "viewer"]]), "{r}");
    let unread = server.get_json("/v1/notifications?unread=true").await;
    assert_eq!(unread["unread"], ns.len() - 1, "{unread}");

    // A restart while firing sends nothing again, and keeps what was recorded.
    let before = notifications(&server).await.len();
    server.restart_clean().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(notifications(&server).await.len(), before);
    assert_eq!(got(&receiver, "ok").len(), 1);
    let low = server.get_json("/v1/alerts/low").await;
    assert_eq!(low["firing"], 2, "{low}");
    // Back above the line: resolved, and that is sent.
    stock(&server, "i5", "A1", 10).await;
    eventually(10, || async { got(&receiver, "ok").len() == 2 }).await;
    assert_eq!(body(&got(&receiver, "ok")[1])["type"], "alert.resolved");

    // Dropping a rule: gone from the list and from activity's record of who did it.
    let r = server
        .client
        .delete(format!("{}/v1/alerts/flaky", server.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let activity: Value = server
        .sql_as(
            &reader,
            "SELECT who, action, kind, name FROM activity WHERE kind = 'alert'",
            json!([]),
            "json",
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        activity["rows"],
        json!([
            ["admin", "create", "alert", "low"],
            ["admin", "create", "alert", "stuck"],
            ["admin", "create", "alert", "flaky"],
            ["admin", "drop", "alert", "flaky"]
        ]),
        "{activity}"
    );
}
