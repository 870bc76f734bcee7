//! Push load driver: many WebSocket subscribers spread over the KPI views (some with
//! filters) while events are ingested over HTTP at a fixed rate, against a running
//! Quiver. Reports the latency from ingest acknowledgement to the delta's arrival at the
//! client (p50/p99/max, overall and per window), the frames received, and the server's
//! resident memory over the run.
//!
//! Each delta frame carries `acked_at`, the server's wall-clock time when the oldest
//! event behind it was acknowledged; client and server share this machine's clock.
//!
//! With `--job forecast` the driver starts that batch job over HTTP `--job-after` into
//! the run and splits the latency into what arrived while the job ran and what arrived
//! while none did, so one run compares the two. `--job report:NAME` does the same with a
//! run of report NAME.
//!
//! Only loopback targets are accepted, and the run stops by itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures::{SinkExt as _, StreamExt as _};
use quiver_benches::rss_mib;
use quiver_ingest::generator::{Generator, GeneratorConfig, StreamKind};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

#[derive(Debug, Parser)]
struct Args {
    /// The server; the token needs the read and ingest scopes.
    #[command(flatten)]
    target: quiver_benches::Target,
    /// Concurrent subscribers, one connection each.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Every n-th subscriber filters on one warehouse.
    #[arg(long, default_value_t = 3)]
    filter_every: usize,
    /// Events per second to ingest, split over orders and inventory as generated.
    #[arg(long, default_value_t = 20_000)]
    rate: usize,
    /// Ingest requests per second.
    #[arg(long, default_value_t = 20)]
    requests_per_sec: usize,
    /// How long to measure, after all subscribers have their snapshot.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Length of a reporting window.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Server process id, to sample its RSS.
    #[arg(long)]
    server_pid: Option<u32>,
    /// A batch job to start during the run (`forecast`, `anomalies`, or `report:NAME`
    /// for a run of that report); the token then needs the admin scope.
    #[arg(long)]
    job: Option<String>,
    /// When to start the job, after measuring begins.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    job_after: Duration,
    /// Alert rules to make before the run (half on `stock_on_hand`, half on
    /// `low_stock`, each on its own SKU, notifying a webhook this driver receives); a
    /// probe then crosses one rule's line every `--alert-every` and measures ack to
    /// webhook. The token needs the admin scope.
    #[arg(long, default_value_t = 0)]
    alert_rules: usize,
    /// How often the probe crosses a rule's line.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    alert_every: Duration,
}

/// Latency histogram in 0.1 ms buckets up to 60 s, lock-free.
struct Histogram {
    buckets: Vec<AtomicU64>,
    max_us: AtomicU64,
}

impl Histogram {
    const BUCKETS: usize = 600_000;

    fn new() -> Self {
        Self {
            buckets: (0..=Self::BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max_us: AtomicU64::new(0),
        }
    }

    fn record(&self, ms: f64) {
        let ms = ms.max(0.0);
        let b = ((ms * 10.0) as usize).min(Self::BUCKETS);
        self.buckets[b].fetch_add(1, Ordering::Relaxed);
        self.max_us
            .fetch_max((ms * 1000.0) as u64, Ordering::Relaxed);
    }

    /// Takes the counts, leaving zeros: `(counts, max ms)`.
    fn take(&self) -> (Vec<u64>, f64) {
        let counts = self
            .buckets
            .iter()
            .map(|b| b.swap(0, Ordering::Relaxed))
            .collect();
        (
            counts,
            self.max_us.swap(0, Ordering::Relaxed) as f64 / 1000.0,
        )
    }
}

/// Whole-run latency split by whether a batch job was running when a delta arrived.
struct JobSplit {
    running: std::sync::atomic::AtomicBool,
    idle: Histogram,
    busy: Histogram,
}

/// Where a subscriber records latency: the windowed histogram of all subscribers, the
/// whole-run one of its view, and the job split.
struct Latency {
    all: Arc<Histogram>,
    view: Arc<Histogram>,
    split: Arc<JobSplit>,
}

impl Latency {
    fn record(&self, ms: f64) {
        self.all.record(ms);
        self.view.record(ms);
        if self.split.running.load(Ordering::Relaxed) {
            self.split.busy.record(ms);
        } else {
            self.split.idle.record(ms);
        }
    }
}

/// Starts batch job `kind` and keeps `split.running` true while a run of it is in
/// progress, polling `GET /v1/jobs`; prints when it started and how it ended.
async fn run_job(
    base: String,
    token: String,
    kind: String,
    split: Arc<JobSplit>,
    t0: Instant,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    if let Some(report) = kind.strip_prefix("report:") {
        return run_report(&client, &base, &token, report, &split, t0).await;
    }
    let started = client
        .post(format!("{base}/v1/jobs/{kind}"))
        .bearer_auth(&token)
        .send()
        .await?;
    if !started.status().is_success() {
        bail!(
            "starting job {kind}: {} {}",
            started.status(),
            started.text().await?
        );
    }
    let run: serde_json::Value = started.json().await?;
    split.running.store(true, Ordering::Relaxed);
    println!(
        "{:>5.0}s  job {} started",
        t0.elapsed().as_secs_f64(),
        run["id"].as_str().unwrap_or("?")
    );
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let jobs: serde_json::Value = client
            .get(format!("{base}/v1/jobs"))
            .bearer_auth(&token)
            .send()
            .await?
            .json()
            .await?;
        let job = jobs["jobs"]
            .as_array()
            .and_then(|js| js.iter().find(|j| j["kind"] == kind.as_str()))
            .context("the job is not listed")?;
        if job["running"].is_null() {
            split.running.store(false, Ordering::Relaxed);
            let last = &job["last_run"];
            println!(
                "{:>5.0}s  job {} {}: {} series, {} rows",
                t0.elapsed().as_secs_f64(),
                last["run_id"].as_str().unwrap_or("?"),
                last["state"].as_str().unwrap_or("?"),
                last["series"],
                last["rows"]
            );
            return Ok(());
        }
    }
}

/// Runs report `name` and keeps `split.running` true until the run ends.
async fn run_report(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    name: &str,
    split: &JobSplit,
    t0: Instant,
) -> anyhow::Result<()> {
    let started = client
        .post(format!("{base}/v1/reports/{name}/run"))
        .bearer_auth(token)
        .send()
        .await?;
    if !started.status().is_success() {
        bail!(
            "running report {name}: {} {}",
            started.status(),
            started.text().await?
        );
    }
    let run: serde_json::Value = started.json().await?;
    let id = run["id"].as_str().context("no run id")?.to_owned();
    split.running.store(true, Ordering::Relaxed);
    println!(
        "{:>5.0}s  report {name} run {id} started",
        t0.elapsed().as_secs_f64()
    );
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let run: serde_json::Value = client
            .get(format!("{base}/v1/reports/{name}/runs/{id}"))
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?;
        if run["state"] == "succeeded" || run["state"] == "failed" {
            split.running.store(false, Ordering::Relaxed);
            println!(
                "{:>5.0}s  report {name} run {id} {}: {} rows, {} bytes {}",
                t0.elapsed().as_secs_f64(),
                run["state"].as_str().unwrap_or("?"),
                run["rows"],
                run["bytes"],
                run["error"].as_str().unwrap_or("")
            );
            return Ok(());
        }
    }
}

fn percentile(counts: &[u64], p: f64) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return f64::NAN;
    }
    let want = ((total as f64) * p).ceil() as u64;
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= want {
            return (i as f64 + 1.0) / 10.0;
        }
    }
    f64::INFINITY
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

#[derive(Default)]
struct Counts {
    deltas: AtomicU64,
    coalesced: AtomicU64,
    snapshots: AtomicU64,
    errors: AtomicU64,
    closed: AtomicU64,
    bytes: AtomicU64,
}

/// One subscriber: connects, subscribes, and records each delta's latency.
async fn subscriber(
    url: String,
    token: String,
    view: String,
    filter: Option<serde_json::Value>,
    latency: Latency,
    counts: Arc<Counts>,
    ready: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<()> {
    let mut req = url.into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    // A snapshot of a large view is far over tungstenite's default 64 MiB message limit.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None);
    let (mut ws, _) =
        tokio_tungstenite::connect_async_with_config(req, Some(config), false).await?;
    let mut sub = serde_json::json!({"type": "subscribe", "id": "s", "view": view});
    if let Some(f) = filter {
        sub["filter"] = f;
    }
    ws.send(Message::text(sub.to_string())).await?;
    let mut ready = Some(ready);
    while let Some(msg) = ws.next().await {
        let text = match msg {
            Ok(Message::Text(t)) => t,
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        counts.bytes.fetch_add(text.len() as u64, Ordering::Relaxed);
        // Only the head is parsed: type, acked_at, coalesced.
        let head = &text[..text.len().min(160)];
        if head.starts_with(r#"{"type":"delta""#) {
            counts.deltas.fetch_add(1, Ordering::Relaxed);
            if head.contains(r#""coalesced":true"#) {
                counts.coalesced.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(at) = head.find(r#""acked_at":"#) {
                let rest = &head[at + 11..];
                let end = rest.find([',', '}']).unwrap_or(rest.len());
                if let Ok(t) = rest[..end].parse::<f64>() {
                    latency.record(now_ms() - t);
                }
            }
        } else if head.starts_with(r#"{"type":"snapshot""#) {
            counts.snapshots.fetch_add(1, Ordering::Relaxed);
            if let Some(r) = ready.take() {
                let _ = r.send(()).await;
            }
        } else if head.starts_with(r#"{"type":"error""#) {
            counts.errors.fetch_add(1, Ordering::Relaxed);
            eprintln!("error frame: {text}");
            if let Some(r) = ready.take() {
                let _ = r.send(()).await;
            }
        }
    }
    counts.closed.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// The server's live allocations, view state and push queue sizes in bytes, from its
/// metrics: what of its RSS the allocator holds unused, what is view state (which grows
/// with the views' rows) and what is push.
async fn server_gauges(
    client: &reqwest::Client,
    base: &str,
    token: &str,
) -> Option<(f64, f64, f64)> {
    let text = client
        .get(format!("{base}/metrics"))
        .bearer_auth(token)
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let value = |line: &str| line.rsplit(' ').next()?.parse::<f64>().ok();
    let state = text
        .lines()
        .filter(|l| l.starts_with("quiver_view_state_bytes{") && l.contains("tier=\"memory\""))
        .filter_map(value)
        .sum();
    let gauge = |name: &str| {
        text.lines()
            .find(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(' ')))
            .and_then(value)
    };
    Some((
        gauge("quiver_memory_allocated_bytes")?,
        state,
        gauge("quiver_ws_queue_bytes")?,
    ))
}

/// Posts generated events at `rate`/s in `per_sec` requests per second per stream.
async fn ingest(
    base: String,
    token: String,
    rate: usize,
    per_sec: usize,
    until: Instant,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) {
    let client = reqwest::Client::new();
    let mut generator = Generator::new(GeneratorConfig::default());
    let per_tick = (rate / per_sec.max(1)).max(1);
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_sec.max(1) as u32);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while Instant::now() < until {
        tick.tick().await;
        let events = generator.next_events(per_tick);
        for kind in [StreamKind::Orders, StreamKind::Inventory] {
            let lines: Vec<&str> = events
                .iter()
                .filter(|e| e.stream == kind)
                .map(|e| e.json.as_str())
                .collect();
            if lines.is_empty() {
                continue;
            }
            let stream = if kind == StreamKind::Orders {
                "orders"
            } else {
                "inventory"
            };
            let n = lines.len() as u64;
            let body = lines.join("\n");
            let client = client.clone();
            let url = format!("{base}/v1/streams/{stream}/events");
            let token = token.clone();
            let sent = Arc::clone(&sent);
            let failed = Arc::clone(&failed);
            tokio::spawn(async move {
                let r = client
                    .post(url)
                    .bearer_auth(token)
                    .header("content-type", "application/x-ndjson")
                    .body(body)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => sent.fetch_add(n, Ordering::Relaxed),
                    _ => failed.fetch_add(n, Ordering::Relaxed),
                };
            });
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let base = args.target.base()?;
    let views: serde_json::Value = reqwest::Client::new()
        .get(format!("{base}/v1/views"))
        .bearer_auth(&args.target.token)
        .send()
        .await?
        .json()
        .await
        .context("listing views")?;
    let views: Vec<(String, bool)> = views
        .as_array()
        .context("views")?
        .iter()
        .map(|v| {
            let name = v["name"].as_str().unwrap_or_default().to_owned();
            let has_wh = v["columns"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["name"] == "warehouse_id"));
            (name, has_wh)
        })
        .collect();
    if views.is_empty() {
        bail!("the server has no views");
    }
    let probe = if args.alert_rules > 0 {
        Some(quiver_benches::alerts::setup(&base, &args.target.token, args.alert_rules).await?)
    } else {
        None
    };
    let ws_url = format!("{}/v1/ws", base.replacen("http", "ws", 1));
    let hist = Arc::new(Histogram::new());
    // Per view, over the whole run: whether one view's subscribers hold up another's.
    let view_hists: Vec<Arc<Histogram>> =
        views.iter().map(|_| Arc::new(Histogram::new())).collect();
    let counts = Arc::new(Counts::default());
    let split = Arc::new(JobSplit {
        running: false.into(),
        idle: Histogram::new(),
        busy: Histogram::new(),
    });

    // Connect everyone, a few hundred at a time, and wait for every snapshot.
    let started = Instant::now();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(args.subscribers.max(1));
    let mut filtered = 0;
    let gate = Arc::new(tokio::sync::Semaphore::new(200));
    for i in 0..args.subscribers {
        let (view, has_wh) = views[i % views.len()].clone();
        let filter = (has_wh && args.filter_every > 0 && i % args.filter_every == 0).then(
            || serde_json::json!({"warehouse_id": format!("W{}", 1 + (i / views.len()) % 4)}),
        );
        filtered += usize::from(filter.is_some());
        let permit = Arc::clone(&gate).acquire_owned().await?;
        let (url, token) = (ws_url.clone(), args.target.token.clone());
        let (hist, counts, ready) = (Arc::clone(&hist), Arc::clone(&counts), ready_tx.clone());
        let view_hist = Arc::clone(&view_hists[i % views.len()]);
        let split = Arc::clone(&split);
        tokio::spawn(async move {
            let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(1);
            let latency = Latency {
                all: hist,
                view: view_hist,
                split,
            };
            let run = tokio::spawn(subscriber(
                url, token, view, filter, latency, counts, done_tx,
            ));
            // Hold the permit until this one has its snapshot.
            let _ = done_rx.recv().await;
            drop(permit);
            let _ = ready.send(()).await;
            if let Ok(Err(e)) = run.await {
                eprintln!("subscriber failed: {e}");
            }
        });
    }
    drop(ready_tx);
    for _ in 0..args.subscribers {
        if ready_rx.recv().await.is_none() {
            break;
        }
    }
    println!(
        "{} subscribers ({filtered} filtered) over {} views connected and snapshotted in {:.1} s",
        args.subscribers,
        views.len(),
        started.elapsed().as_secs_f64()
    );

    let until = Instant::now() + args.duration;
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let feeder = tokio::spawn(ingest(
        base.clone(),
        args.target.token.clone(),
        args.rate,
        args.requests_per_sec,
        until,
        Arc::clone(&sent),
        Arc::clone(&failed),
    ));
    let prober = probe.as_ref().map(|p| {
        tokio::spawn(quiver_benches::alerts::run(
            Arc::clone(p),
            base.clone(),
            args.target.token.clone(),
            args.alert_rules,
            until,
            args.alert_every,
        ))
    });
    hist.take();
    for h in &view_hists {
        h.take();
    }
    split.idle.take();
    split.busy.take();
    let mut all = vec![0u64; Histogram::BUCKETS + 1];
    let mut all_max: f64 = 0.0;
    let mut rss = Vec::new();
    let t0 = Instant::now();
    let job = args.job.clone().map(|kind| {
        let (base, token, split) = (base.clone(), args.target.token.clone(), Arc::clone(&split));
        let after = args.job_after;
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Err(e) = run_job(base, token, kind, Arc::clone(&split), t0).await {
                split.running.store(false, Ordering::Relaxed);
                eprintln!("job failed: {e:#}");
            }
        })
    });
    let metrics_client = reqwest::Client::new();
    println!(
        "window  events/s  deltas/s  coalesced  p50_ms  p99_ms  max_ms  server_rss_mib  allocated_mib  view_state_mib  ws_queue_mib"
    );
    let mut last_sent = 0;
    let mut last_deltas = 0;
    while Instant::now() < until {
        tokio::time::sleep(args.window.min(until - Instant::now())).await;
        let (counts_w, max) = hist.take();
        for (a, c) in all.iter_mut().zip(&counts_w) {
            *a += c;
        }
        all_max = all_max.max(max);
        let r = args.server_pid.and_then(rss_mib);
        if let Some(r) = r {
            rss.push(r);
        }
        let gauges = server_gauges(&metrics_client, &base, &args.target.token).await;
        let s = sent.load(Ordering::Relaxed);
        let d = counts.deltas.load(Ordering::Relaxed);
        let secs = args.window.as_secs_f64();
        let mib = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.0}", v / (1 << 20) as f64));
        println!(
            "{:>5.0}s  {:>8.0}  {:>8.0}  {:>9}  {:>6.1}  {:>6.1}  {:>6.1}  {:>14}  {:>13}  {:>14}  {:>12}",
            t0.elapsed().as_secs_f64(),
            (s - last_sent) as f64 / secs,
            (d - last_deltas) as f64 / secs,
            counts.coalesced.load(Ordering::Relaxed),
            percentile(&counts_w, 0.50),
            percentile(&counts_w, 0.99),
            max,
            r.map_or("-".into(), |r| format!("{r:.0}")),
            mib(gauges.map(|g| g.0)),
            mib(gauges.map(|g| g.1)),
            mib(gauges.map(|g| g.2)),
        );
        last_sent = s;
        last_deltas = d;
    }
    let _ = feeder.await;
    if let (Some(p), Some(prober)) = (&probe, prober) {
        let _ = prober.await;
        let (n, p50, p99, max) = quiver_benches::alerts::summary(p);
        println!(
            "alerts: {} rules; ack -> webhook arrival over {n} crossings: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms; {} missed; {} webhook requests in all",
            args.alert_rules,
            p.missed.lock(),
            p.received.lock(),
        );
    }
    println!(
        "overall: {} events acknowledged ({} refused), {} deltas ({} coalesced), {} snapshots, {} error frames, {} connections closed, {:.1} MiB of frames",
        sent.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        counts.deltas.load(Ordering::Relaxed),
        counts.coalesced.load(Ordering::Relaxed),
        counts.snapshots.load(Ordering::Relaxed),
        counts.errors.load(Ordering::Relaxed),
        counts.closed.load(Ordering::Relaxed),
        counts.bytes.load(Ordering::Relaxed) as f64 / (1 << 20) as f64,
    );
    println!(
        "latency ack -> delta at client: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&all, 0.50),
        percentile(&all, 0.99),
        all_max
    );
    if job.is_some() {
        let (idle, idle_max) = split.idle.take();
        let (busy, busy_max) = split.busy.take();
        for (name, c, max) in [
            ("no job running", idle, idle_max),
            ("job running", busy, busy_max),
        ] {
            println!(
                "latency while {name}: {} deltas, p50 {:.1} ms, p99 {:.1} ms, max {max:.1} ms",
                c.iter().sum::<u64>(),
                percentile(&c, 0.50),
                percentile(&c, 0.99),
            );
        }
    }
    println!("per view: subscribers  deltas  p50_ms  p99_ms  max_ms");
    for (i, ((name, _), h)) in views.iter().zip(&view_hists).enumerate() {
        let (c, max) = h.take();
        let subs = (i..args.subscribers).step_by(views.len()).count();
        println!(
            "  {name:<22} {subs:>6}  {:>9}  {:>7.1}  {:>7.1}  {max:>8.1}",
            c.iter().sum::<u64>(),
            percentile(&c, 0.50),
            percentile(&c, 0.99),
        );
    }
    if let (Some(first), Some(last)) = (rss.first(), rss.last()) {
        let peak = rss.iter().copied().fold(0.0, f64::max);
        println!("server RSS: first window {first:.0} MiB, last {last:.0} MiB, peak {peak:.0} MiB");
    }
    std::process::exit(0);
}
