//! The edge: TLS on HTTP, WebSocket, Flight SQL and Postgres with certificates reloaded
//! on SIGHUP; security headers on every answer; CORS; per-client rate limits; token
//! expiry and rotation; secrets read from files. Real clients throughout: curl, a
//! WebSocket client over rustls, Python's ADBC Flight SQL driver, psql.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::common::{ADMIN, TestServer, request};

/// A certificate for 127.0.0.1 and localhost signed by a CA of its own, as PEM files
/// in `dir`: `<name>-ca.crt` (the CA a client trusts), `<name>.crt` and `<name>.key`
/// (what the server serves). Returned as (ca, cert, key).
pub(crate) fn certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let path = |suffix: &str| dir.join(format!("{name}{suffix}"));
    let (ca_key, ca, key, csr, cert, ext) = (
        path("-ca.key"),
        path("-ca.crt"),
        path(".key"),
        path(".csr"),
        path(".crt"),
        path(".ext"),
    );
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    let openssl = |args: &[&str], paths: &[&Path]| {
        let out = Command::new("openssl")
            .args(args)
            .args(paths)
            .output()
            .expect("openssl is installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let subject = format!("/CN=Quiver test CA {name}");
    let mut args = vec!["req", "-x509", "-days", "2", "-subj", subject.as_str()];
    args.extend(ec);
    args.extend(["-keyout"]);
    openssl(&args, &[&ca_key, Path::new("-out"), &ca]);
    let mut args = vec!["req", "-subj", "/CN=127.0.0.1"];
    args.extend(ec);
    args.extend(["-keyout"]);
    openssl(&args, &[&key, Path::new("-out"), &csr]);
    openssl(
        &["x509", "-req", "-days", "2", "-in"],
        &[
            &csr,
            Path::new("-CA"),
            &ca,
            Path::new("-CAkey"),
            &ca_key,
            Path::new("-CAcreateserial"),
            Path::new("-extfile"),
            &ext,
            Path::new("-out"),
            &cert,
        ],
    );
    (ca, cert, key)
}

/// curl's status line and headers for `url`, trusting only `ca`; Err with curl's
/// message when the TLS handshake or the connection fails.
fn curl(url: &str, ca: &Path, token: &str) -> Result<String, String> {
    let out = Command::new("curl")
        .args(["-sS", "-D", "-", "-o", "/dev/null", "--max-time", "10"])
        .arg("--cacert")
        .arg(ca)
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .arg(url)
        .output()
        .expect("curl is installed");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).to_lowercase())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Subscribes to `stock_on_hand` over `wss://`, trusting only `ca`, and returns the
/// snapshot's type.
async fn wss_snapshot(url: &str, ca: &Path, token: &str) -> String {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for cert in rustls_pemfile_certs(&pem) {
        roots.add(cert).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let addr = url.trim_start_matches("https://");
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let req = format!("wss://{addr}/v1/ws").into_client_request().unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls)
        .await
        .expect("WebSocket upgrade over TLS");
    ws.send(Message::text(
        json!({"type": "auth", "token": token}).to_string(),
    ))
    .await
    .unwrap();
    ws.send(Message::text(
        json!({"type": "subscribe", "id": "s", "view": "stock_on_hand"}).to_string(),
    ))
    .await
    .unwrap();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("a frame in time")
            .expect("the socket stays open")
            .expect("a frame");
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["id"] == "s" {
                return v["type"].as_str().unwrap_or_default().to_owned();
            }
        }
    }
}

fn rustls_pemfile_certs(
    pem: &[u8],
) -> Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>> {
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .expect("PEM certificates")
}

/// Runs one query through Python's ADBC Flight SQL driver over `grpc+tls`, trusting `ca`.
fn flight_tls_query(port: u16, ca: &Path, token: &str) -> Result<String, String> {
    let script = r#"
import os, sys
import adbc_driver_flightsql as fs
import adbc_driver_flightsql.dbapi as dbapi
ca = open(os.environ["CA"]).read()
with dbapi.connect(f"grpc+tls://127.0.0.1:{os.environ['PORT']}", db_kwargs={
    fs.DatabaseOptions.AUTHORIZATION_HEADER.value: "Bearer " + os.environ["TOKEN"],
    fs.DatabaseOptions.TLS_ROOT_CERTS.value: ca,
}) as conn, conn.cursor() as cur:
    cur.execute("SELECT CAST(41 + 1 AS BIGINT) AS answer")
    print(cur.fetchall()[0][0])
"#;
    let python = std::env::var("QUIVER_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python)
        .args(["-c", script])
        .env("CA", ca)
        .env("PORT", port.to_string())
        .env("TOKEN", token)
        .output()
        .expect("python3 runs");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_on_http_websocket_flight_and_postgres_with_reload_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_a, cert_a, key_a) = certificate(dir.path(), "a");
    let (ca_b, cert_b, key_b) = certificate(dir.path(), "b");
    // The server reads the pair from these paths; a renewal overwrites them.
    let (cert, key) = (dir.path().join("live.crt"), dir.path().join("live.key"));
    std::fs::copy(&cert_a, &cert).unwrap();
    std::fs::copy(&key_a, &key).unwrap();
    let (cert_arg, key_arg) = (cert.display().to_string(), key.display().to_string());
    // The test client trusts CA A, the first certificate's issuer.
    let client_ca = dir.path().join("client-ca.crt");
    std::fs::copy(&ca_a, &client_ca).unwrap();
    let server = TestServer::start_with_ca(
        dir.path(),
        &["--tls-cert", &cert_arg, "--tls-key", &key_arg],
        &client_ca,
    )
    .await;
    assert!(server.url.starts_with("https://"), "{}", server.url);

    // HTTPS with curl, trusting only certificate A; answers carry HSTS.
    let streams = format!("{}/v1/streams", server.url);
    let headers = curl(&streams, &ca_a, ADMIN).expect("HTTPS with certificate A");
    assert!(headers.starts_with("http/1.1 200"), "{headers}");
    assert!(
        headers.contains("strict-transport-security: max-age=31536000"),
        "{headers}"
    );
    // Plain HTTP on the TLS port is not served.
    let plain = server.url.replacen("https://", "http://", 1);
    assert!(
        server
            .client
            .get(format!("{plain}/health"))
            .send()
            .await
            .is_err()
            || !server
                .client
                .get(format!("{plain}/health"))
                .send()
                .await
                .unwrap()
                .status()
                .is_success()
    );
    // WebSocket over TLS gets its snapshot.
    assert_eq!(wss_snapshot(&server.url, &ca_a, ADMIN).await, "snapshot");
    // Flight SQL over TLS, with the same certificate.
    assert_eq!(
        flight_tls_query(server.flight_port, &ca_a, ADMIN).expect("Flight SQL over TLS"),
        "42"
    );
    // Postgres uses the same certificate when it has none of its own.
    let psql = |ca: &Path| {
        Command::new("psql")
            .arg(format!(
                "host=127.0.0.1 port={} user=analyst dbname=quiver sslmode=verify-ca sslrootcert={}",
                server.pg_port,
                ca.display()
            ))
            .args(["-X", "-At", "-c", "SELECT CAST(7 AS BIGINT)"])
            .env("PGPASSWORD", ADMIN)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .expect("psql runs")
    };
    let out = psql(&ca_a);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Renew: overwrite the files with B and send SIGHUP; new handshakes get B.
    std::fs::copy(&cert_b, &cert).unwrap();
    std::fs::copy(&key_b, &key).unwrap();
    hangup(&server);
    crate::common::eventually(10, || async { curl(&streams, &ca_b, ADMIN).is_ok() }).await;
    let refused = curl(&streams, &ca_a, ADMIN).expect_err("certificate A is no longer served");
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");
    assert_eq!(
        flight_tls_query(server.flight_port, &ca_b, ADMIN).expect("Flight SQL after reload"),
        "42"
    );
    assert!(psql(&ca_b).status.success());
    assert_eq!(wss_snapshot(&server.url, &ca_b, ADMIN).await, "snapshot");

    // A broken renewal keeps the previous certificate and says why.
    std::fs::write(&cert, "not a certificate").unwrap();
    hangup(&server);
    crate::common::eventually(10, || async { server.log().contains("TLS reload failed") }).await;
    assert!(server.log().contains(&cert_arg), "the log names the file");
    curl(&streams, &ca_b, ADMIN).expect("certificate B still served");
}

fn hangup(server: &TestServer) {
    let status = Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Routes of every kind, as (method, path, token); the headers must be on all answers,
/// errors included.
const ROUTES: &[(&str, &str, Option<&str>)] = &[
    ("GET", "/health", None),
    ("GET", "/ready", None),
    ("GET", "/metrics", None),
    ("GET", "/v1/streams", Some(ADMIN)),
    ("GET", "/v1/streams", None),
    ("GET", "/v1/views", Some(ADMIN)),
    ("GET", "/v1/views/stock_on_hand", Some(ADMIN)),
    ("GET", "/v1/views/nope", Some(ADMIN)),
    ("POST", "/v1/sql", Some(ADMIN)),
    ("GET", "/v1/tokens", Some(ADMIN)),
    ("GET", "/v1/alerts", Some(ADMIN)),
    ("GET", "/v1/reports", Some(ADMIN)),
    ("GET", "/v1/silences", Some(ADMIN)),
    ("GET", "/v1/notifications", Some(ADMIN)),
    ("GET", "/v1/dashboards", Some(ADMIN)),
    ("GET", "/v1/presence", Some(ADMIN)),
    ("GET", "/v1/jobs", Some(ADMIN)),
    ("GET", "/v1/ws/client.js", None),
    ("GET", "/v1/ws", Some(ADMIN)),
    ("DELETE", "/v1/streams", Some(ADMIN)),
    ("GET", "/no/such/path", None),
    ("GET", "/", None),
    ("GET", "/ui/app.js", None),
    ("GET", "/ui/app.css", None),
];

#[tokio::test(flavor = "multi_thread")]
async fn every_answer_carries_security_headers_and_cors_is_opt_in() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(dir.path(), &[]).await;
    for (method, path, token) in ROUTES {
        let mut req = server
            .client
            .request(
                Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{}{path}", server.url),
            )
            .header("origin", "https://elsewhere.example");
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if *path == "/v1/sql" {
            req = req.json(&json!({"sql": "SELECT 1"}));
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let h = resp.headers();
        let get = |name: &str| {
            h.get(name)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_else(|| panic!("{method} {path} ({status}) lacks {name}: {h:?}"))
        };
        assert_eq!(get("x-content-type-options"), "nosniff", "{method} {path}");
        assert_eq!(get("referrer-policy"), "no-referrer", "{method} {path}");
        assert_eq!(get("x-frame-options"), "DENY", "{method} {path}");
        let csp = get("content-security-policy");
        assert!(
            csp.contains("frame-ancestors 'none'"),
            "{method} {path}: {csp}"
        );
        if *path == "/" || path.starts_with("/ui/") || *path == "/v1/ws/client.js" {
            assert!(csp.contains("script-src 'self'"), "{csp}");
            assert!(!csp.contains("unsafe-inline"), "{csp}");
        } else {
            assert!(
                csp.starts_with("default-src 'none'"),
                "{method} {path}: {csp}"
            );
        }
        // No HSTS without TLS, and no CORS unless configured.
        assert!(
            h.get("strict-transport-security").is_none(),
            "{method} {path}"
        );
        assert!(
            h.get("access-control-allow-origin").is_none(),
            "{method} {path}"
        );
    }

    // With an allowed origin: the preflight is answered, and the answer exposes the
    // rate-limit headers; other origins get nothing.
    server.set_flag("--cors-origin", "https://dash.example");
    server.restart().await;
    let preflight = |origin: &'static str| {
        server
            .client
            .request(Method::OPTIONS, format!("{}/v1/sql", server.url))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
    };
    let ok = preflight("https://dash.example").await.unwrap();
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://dash.example"
    );
    let methods = ok.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(methods.contains("POST"), "{methods}");
    let other = preflight("https://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    let resp = server
        .client
        .get(format!("{}/v1/streams", server.url))
        .bearer_auth(ADMIN)
        .header("origin", "https://dash.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://dash.example"
    );
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limits_per_token_on_every_endpoint_with_headers() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(
        dir.path(),
        &["--rate-limit", "2", "--rate-limit-burst", "4"],
    )
    .await;
    let other = crate::bi::token(&server, &["read"]).await;
    // Making it used one of the admin's requests; let the bucket fill again.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // The probes are never limited.
    for _ in 0..10 {
        let r = server
            .client
            .get(format!("{}/health", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(header(&r, "ratelimit-limit").is_none());
    }
    // Four requests (the burst) pass, on different endpoints, counting down.
    let paths = ["/v1/streams", "/v1/views", "/v1/reports", "/metrics"];
    for (i, path) in paths.iter().enumerate() {
        let r = server
            .client
            .get(format!("{}{path}", server.url))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(header(&r, "ratelimit-limit").as_deref(), Some("4"));
        assert_eq!(
            header(&r, "ratelimit-remaining"),
            Some((3 - i).to_string()),
            "{path}"
        );
        assert!(header(&r, "ratelimit-reset").is_some());
    }
    // The fifth is refused, with Retry-After and the headers, whatever the endpoint.
    let r = server
        .client
        .post(format!("{}/v1/sql", server.url))
        .bearer_auth(ADMIN)
        .json(&json!({"sql": "SELECT 1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = header(&r, "retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    assert_eq!(header(&r, "ratelimit-remaining").as_deref(), Some("0"));
    assert_eq!(
        header(&r, "x-content-type-options").as_deref(),
        Some("nosniff")
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    // Another token has its own budget.
    let (status, _) = request(&server, Method::GET, &other, "/v1/streams", None).await;
    assert_eq!(status, 200);
    // Requests without a valid token share their address's budget.
    let mut codes = Vec::new();
    for _ in 0..6 {
        let r = server
            .client
            .get(format!("{}/v1/streams", server.url))
            .send()
            .await
            .unwrap();
        codes.push(r.status().as_u16());
    }
    assert_eq!(codes, [401, 401, 401, 401, 429, 429]);
    // The budget refills at the configured rate.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _) = request(&server, Method::GET, ADMIN, "/v1/streams", None).await;
    assert_eq!(status, 200);
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains("status=\"429\""),
        "429s are counted per route"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_expire_rotate_without_downtime_and_come_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let admin_file = dir.path().join("admin-token");
    std::fs::write(&admin_file, "file-admin-token\n").unwrap();
    let server = TestServer::start(
        dir.path(),
        &["--admin-token-file", admin_file.to_str().unwrap()],
    )
    .await;
    let admin = "file-admin-token";
    // The environment's token is not in use: the file's is.
    let (status, _) = request(&server, Method::GET, ADMIN, "/v1/streams", None).await;
    assert_eq!(status, 401);
    let (status, _) = request(&server, Method::GET, admin, "/v1/streams", None).await;
    assert_eq!(status, 200);

    // A token with a lifetime works until it ends, then is refused saying so.
    let (status, made) = request(
        &server,
        Method::POST,
        admin,
        "/v1/tokens",
        Some(json!({"name": "short", "scopes": ["read"], "ttl": "2s"})),
    )
    .await;
    assert_eq!(status, 201, "{made}");
    let short = made["token"].as_str().unwrap().to_owned();
    assert!(made["expires_at"].is_string(), "{made}");
    let (_, list) = request(&server, Method::GET, admin, "/v1/tokens", None).await;
    let listed = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == made["id"])
        .unwrap();
    assert_eq!(listed["expires_at"], made["expires_at"]);
    let (status, _) = request(&server, Method::GET, &short, "/v1/streams", None).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, body) = request(&server, Method::GET, &short, "/v1/streams", None).await;
    assert_eq!(status, 401);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired at"),
        "{body}"
    );
    // psql is refused the same way.
    let out = Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=analyst dbname=quiver sslmode=disable",
            server.pg_port
        ))
        .args(["-X", "-At", "-c", "SELECT 1"])
        .env("PGPASSWORD", &short)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expired at"));

    // Bad lifetimes are refused, naming the field.
    let (status, body) = request(
        &server,
        Method::POST,
        admin,
        "/v1/tokens",
        Some(json!({"name": "bad", "scopes": ["read"], "ttl": "soon"})),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ttl 'soon'"),
        "{body}"
    );

    // Rotation: both the old and the new token work during the grace period, then only
    // the new one; name and scopes carry over.
    let (_, old) = request(
        &server,
        Method::POST,
        admin,
        "/v1/tokens",
        Some(json!({"name": "loader", "scopes": ["ingest", "read"]})),
    )
    .await;
    let old_token = old["token"].as_str().unwrap().to_owned();
    let old_id = old["id"].as_str().unwrap();
    let (status, rotated) = request(
        &server,
        Method::POST,
        admin,
        &format!("/v1/tokens/{old_id}/rotate"),
        Some(json!({"grace": "2s"})),
    )
    .await;
    assert_eq!(status, 201, "{rotated}");
    assert_eq!(rotated["name"], "loader");
    assert_eq!(rotated["scopes"], json!(["ingest", "read"]));
    assert_eq!(rotated["previous"]["id"], old_id);
    let new_token = rotated["token"].as_str().unwrap().to_owned();
    for t in [&old_token, &new_token] {
        let (status, _) = request(&server, Method::GET, t, "/v1/streams", None).await;
        assert_eq!(status, 200);
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, _) = request(&server, Method::GET, &old_token, "/v1/streams", None).await;
    assert_eq!(status, 401);
    let (status, _) = request(&server, Method::GET, &new_token, "/v1/streams", None).await;
    assert_eq!(status, 200);
    let (status, _) = request(&server, Method::POST, admin, "/v1/tokens/nope/rotate", None).await;
    assert_eq!(status, 404);

    // The CLI rotates too.
    let out = Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args([
            "token",
            "rotate",
            rotated["id"].as_str().unwrap(),
            "--grace",
            "1m",
        ])
        .args(["--ttl", "30days", "--url", &server.url, "--token", admin])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("expires: "), "{text}");
    assert!(text.contains("stops working at"), "{text}");

    // An empty secret file is refused at start with the file named.
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args([
            "serve",
            "--store",
            "memory://",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .args([
            "--pg-addr",
            "off",
            "--flight-addr",
            "off",
            "--admin-token-file",
        ])
        .arg(&empty)
        .env_remove("QUIVER_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is empty") && err.contains(empty.to_str().unwrap()),
        "{err}"
    );
}
