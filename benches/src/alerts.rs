//! Alert rules under load (for `push-bench --alert-rules N`): N rules over
//! `stock_on_hand` and `low_stock`, each watching its own SKU and notifying a webhook
//! receiver this driver runs; a probe drops one SKU's stock below its rule's line at a
//! time and measures from the ingest acknowledgement of that event to the webhook
//! request's arrival.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use parking_lot::Mutex;
use tokio::sync::oneshot;

/// Waiting probes by rule name, and what arrived.
#[derive(Debug, Default)]
pub struct Probe {
    waiting: Mutex<HashMap<String, oneshot::Sender<Instant>>>,
    /// Latencies in milliseconds.
    pub latencies: Mutex<Vec<f64>>,
    /// Probes whose webhook did not come within 10 s.
    pub missed: Mutex<u64>,
    /// Webhook requests received, of any rule and state.
    pub received: Mutex<u64>,
    url: String,
}

async fn hook(
    axum::extract::State(probe): axum::extract::State<Arc<Probe>>,
    body: axum::body::Bytes,
) -> axum::http::StatusCode {
    let at = Instant::now();
    *probe.received.lock() += 1;
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
        && v["type"] == "alert.firing"
        && let Some(name) = v["data"]["alert"].as_str()
        && let Some(tx) = probe.waiting.lock().remove(name)
    {
        let _ = tx.send(at);
    }
    axum::http::StatusCode::NO_CONTENT
}

async fn post(
    client: &reqwest::Client,
    url: String,
    token: &str,
    content_type: &str,
    body: String,
) -> anyhow::Result<()> {
    let r = client
        .post(url)
        .bearer_auth(token)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("{}: {}", r.status(), r.text().await.unwrap_or_default());
    }
    Ok(())
}

fn movement(id: &str, sku: &str, quantity: i64) -> String {
    format!(
        r#"{{"event_id":"{id}","event_time":"{}","sku":"{sku}","warehouse_id":"W1","kind":"adjustment","quantity":{quantity}}}"#,
        chrono::Utc::now().to_rfc3339()
    )
}

/// Starts the receiver, makes `rules` rules (the token needs admin) and gives each
/// rule's SKU 100 units.
pub async fn setup(base: &str, token: &str, rules: usize) -> anyhow::Result<Arc<Probe>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let probe = Arc::new(Probe {
        url,
        ..Probe::default()
    });
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(Arc::clone(&probe));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let client = reqwest::Client::new();
    let started = Instant::now();
    for i in 0..rules {
        let view = if i % 2 == 0 {
            "stock_on_hand"
        } else {
            "low_stock"
        };
        let rule = serde_json::json!({
            "name": format!("bench_{i}"),
            "view": view,
            "where": format!("sku = 'ALERT-{i}' AND on_hand < 10"),
            "notify": [{"webhook": probe.url}],
            "if_not_exists": true,
        });
        post(
            &client,
            format!("{base}/v1/alerts"),
            token,
            "application/json",
            rule.to_string(),
        )
        .await
        .with_context(|| format!("creating rule {i}"))?;
    }
    let lines: Vec<String> = (0..rules)
        .map(|i| movement(&format!("seed-{i}"), &format!("ALERT-{i}"), 100))
        .collect();
    for chunk in lines.chunks(5_000) {
        post(
            &client,
            format!("{base}/v1/streams/inventory/events"),
            token,
            "application/x-ndjson",
            chunk.join("\n"),
        )
        .await
        .context("seeding the probe SKUs")?;
    }
    println!(
        "{rules} alert rules made and their SKUs stocked in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(probe)
}

/// Crosses one rule's line after another until `until`, every `every`.
pub async fn run(
    probe: Arc<Probe>,
    base: String,
    token: String,
    rules: usize,
    until: Instant,
    every: Duration,
) {
    let client = reqwest::Client::new();
    let mut n = 0usize;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < until && rules > 0 {
        tick.tick().await;
        let i = n % rules;
        n += 1;
        let (tx, rx) = oneshot::channel();
        probe.waiting.lock().insert(format!("bench_{i}"), tx);
        let sku = format!("ALERT-{i}");
        let url = format!("{base}/v1/streams/inventory/events");
        if let Err(e) = post(
            &client,
            url.clone(),
            &token,
            "application/x-ndjson",
            movement(&format!("probe-{n}-down"), &sku, -95),
        )
        .await
        {
            eprintln!("probe ingest failed: {e:#}");
            continue;
        }
        let acked = Instant::now();
        match tokio::time::timeout(Duration::from_secs(10), rx).await {
            Ok(Ok(at)) => probe
                .latencies
                .lock()
                .push(at.saturating_duration_since(acked).as_secs_f64() * 1000.0),
            _ => {
                probe.waiting.lock().remove(&format!("bench_{i}"));
                *probe.missed.lock() += 1;
            }
        }
        // Back above the line for its next turn.
        if let Err(e) = post(
            &client,
            url,
            &token,
            "application/x-ndjson",
            movement(&format!("probe-{n}-up"), &sku, 95),
        )
        .await
        {
            eprintln!("probe ingest failed: {e:#}");
        }
    }
}

/// p50, p99 and max of the latencies, and how many there were.
pub fn summary(probe: &Probe) -> (usize, f64, f64, f64) {
    let mut l = probe.latencies.lock().clone();
    l.sort_by(f64::total_cmp);
    let at = |p: f64| {
        l.get(((l.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(f64::NAN)
    };
    (
        l.len(),
        at(0.50),
        at(0.99),
        l.last().copied().unwrap_or(f64::NAN),
    )
}
