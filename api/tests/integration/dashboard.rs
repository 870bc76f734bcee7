//! The dashboard: its page and assets served by the binary, saved dashboards with
//! versions, who is watching, and the page itself in headless Chromium
//! (`js/browser/dashboard.browser.mjs`).

use serde_json::{Value, json};

use crate::common::{ADMIN, TestServer, request as call};
use crate::push::run_node_with;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_are_served_saved_with_versions_and_guarded() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(dir.path(), &[]).await;
    let (_, made) = call(
        &server,
        Method::POST,
        ADMIN,
        "/v1/tokens",
        Some(json!({"name": "wall-screen", "scopes": ["read"]})),
    )
    .await;
    let reader = made["token"].as_str().unwrap().to_owned();

    // The page and its assets, without a token (the page signs in itself).
    let page = server
        .client
        .get(format!("{}/", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(page.text().await.unwrap().contains("/ui/app.js"));
    for (path, mime) in [
        ("/ui/app.js", "text/javascript"),
        ("/ui/vendor/uplot/uPlot.iife.min.js", "text/javascript"),
        ("/ui/vendor/uplot/LICENSE", "text/plain"),
    ] {
        let r = server
            .client
            .get(format!("{}{path}", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with(mime),
            "{path}"
        );
    }
    let missing = server
        .client
        .get(format!("{}/ui/nope.js", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // The built-in one is there from the start.
    let (s, list) = call(&server, Method::GET, &reader, "/v1/dashboards", None).await;
    assert_eq!(s, 200);
    assert_eq!(list["dashboards"][0]["name"], "operations", "{list}");
    let (_, ops) = call(
        &server,
        Method::GET,
        &reader,
        "/v1/dashboards/operations",
        None,
    )
    .await;
    assert_eq!(ops["version"], 0);
    assert!(ops["tiles"].as_array().unwrap().len() >= 6);

    // Writes need admin; bad tiles are refused with the tile named.
    let tiles = json!([{"type": "table", "view": "low_stock"}]);
    let (s, _) = call(
        &server,
        Method::PUT,
        &reader,
        "/v1/dashboards/mine",
        Some(json!({"tiles": tiles})),
    )
    .await;
    assert_eq!(s, 403);
    let (s, e) = call(
        &server,
        Method::PUT,
        ADMIN,
        "/v1/dashboards/mine",
        Some(json!({"tiles": [{"type": "gauge", "view": "x"}]})),
    )
    .await;
    assert_eq!(s, 400);
    assert!(
        e["error"]["message"].as_str().unwrap().contains("tiles[0]"),
        "{e}"
    );

    // Versions: a write based on an old version is refused.
    let (s, d) = call(
        &server,
        Method::PUT,
        ADMIN,
        "/v1/dashboards/mine",
        Some(json!({"title": "Mine", "tiles": tiles})),
    )
    .await;
    assert_eq!((s, d["version"].as_u64()), (201, Some(1)), "{d}");
    let (s, d) = call(
        &server,
        Method::PUT,
        ADMIN,
        "/v1/dashboards/mine",
        Some(json!({"title": "Mine 2", "tiles": tiles, "version": 1})),
    )
    .await;
    assert_eq!((s, d["version"].as_u64()), (200, Some(2)), "{d}");
    let (s, e) = call(
        &server,
        Method::PUT,
        ADMIN,
        "/v1/dashboards/mine",
        Some(json!({"tiles": tiles, "version": 1})),
    )
    .await;
    assert_eq!(s, 409, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("version 2"),
        "{e}"
    );

    // Kept across a restart.
    server.restart_clean().await;
    let (s, d) = call(&server, Method::GET, &reader, "/v1/dashboards/mine", None).await;
    assert_eq!((s, d["title"].as_str()), (200, Some("Mine 2")));
    let (s, _) = call(&server, Method::DELETE, ADMIN, "/v1/dashboards/mine", None).await;
    assert_eq!(s, 200);
    let (s, _) = call(&server, Method::GET, &reader, "/v1/dashboards/mine", None).await;
    assert_eq!(s, 404);

    // Who is watching: a push connection shows its token's name.
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("{}/v1/ws", server.url.replace("http://", "ws://")),
    )
    .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {reader}").parse().unwrap());
    let (_ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    crate::common::eventually(10, || async {
        let (_, p) = call(&server, Method::GET, ADMIN, "/v1/presence", None).await;
        p["watching"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["name"] == "wall-screen" && w["you"] == false)
    })
    .await;

    // Who changed what.
    let r: Value = server
        .sql_as(
            &reader,
            "SELECT who, action, kind, name FROM activity WHERE kind IN ('dashboard', 'token')",
            json!([]),
            "json",
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        r["rows"],
        json!([
            ["admin", "create", "token", "wall-screen"],
            ["admin", "create", "dashboard", "mine"],
            ["admin", "replace", "dashboard", "mine"],
            ["admin", "drop", "dashboard", "mine"]
        ]),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_browser() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), &[]).await;
    let r = server
        .sql_as(
            ADMIN,
            "CREATE ALERT note_low ON stock_on_hand WHERE on_hand < 2 AND sku = 'NOTE-1' SEVERITY critical",
            json!([]),
            "json",
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    // Screenshots are kept beside the build, for a person to look at.
    let target = std::env::var("CARGO_TARGET_DIR").map_or_else(
        |_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        std::path::PathBuf::from,
    );
    let artifacts = target.join("test-artifacts/dashboard");
    run_node_with(
        &server,
        &["browser/dashboard.browser.mjs"],
        &[("QUIVER_ARTIFACTS", artifacts.to_str().unwrap())],
    )
    .await;
    assert!(artifacts.join("dashboard-phone.png").exists());
}
