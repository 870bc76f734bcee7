//! The `quiver` command line: `serve`, `demo`, `generate`, `load`, `token`, and the
//! batch jobs `forecast` and `anomalies`.

mod backup;
mod files;
mod jobs;
mod report;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use quiver_ingest::generator::{GeneratedEvent, Generator, GeneratorConfig, StreamKind};
use tracing::warn;

use crate::auth::Scope;
use crate::config::ServeConfig;
use crate::server::RunningServer;

/// Quiver: a streaming analytics engine for order and inventory events.
#[derive(Debug, Parser)]
#[command(name = "quiver", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeConfig),
    /// Run the server and feed it a continuous, realistic event stream.
    Demo {
        #[command(flatten)]
        serve: ServeConfig,
        #[command(flatten)]
        data: DataArgs,
        /// Events per second to send.
        #[arg(long, env = "QUIVER_DEMO_RATE", default_value_t = 500.0)]
        rate: f64,
        /// Days of history to send at start when the store has no orders yet, so the
        /// forecast job has something to learn from (0: none).
        #[arg(long, env = "QUIVER_DEMO_BACKFILL_DAYS", default_value_t = 56)]
        backfill_days: u32,
    },
    /// Write generated events to files, one per stream (`orders.<ext>`, `inventory.<ext>`).
    Generate {
        /// How many events in all.
        #[arg(long)]
        events: usize,
        /// File format.
        #[arg(long, default_value = "ndjson", value_parser = ["ndjson", "csv", "arrow"])]
        format: String,
        /// Output folder.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        #[command(flatten)]
        data: DataArgs,
    },
    /// Send a file of events to a running server, with a progress bar.
    Load {
        /// File to send (.ndjson, .jsonl, .csv or .arrow).
        file: PathBuf,
        /// Target stream.
        #[arg(long)]
        stream: String,
        /// Events per request.
        #[arg(long, default_value_t = 5_000)]
        batch: usize,
        /// Requests in flight.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Forecast daily demand per SKU and warehouse, and stock-out risk, into the
    /// tables `forecasts`, `forecast_models` and `stockout_risk` of a store.
    Forecast(jobs::JobArgs),
    /// Find anomalies in revenue per minute and hourly units, and warehouses unlike
    /// their peers, into the table `anomalies` of a store.
    Anomalies(jobs::JobArgs),
    /// Run a report on a running server and save its file.
    Report {
        #[command(subcommand)]
        command: report::ReportCommand,
    },
    /// Back a store up to another location (incremental); `backup list` lists them.
    Backup(backup::BackupArgs),
    /// Restore a backup into an empty store, optionally as of a point in time.
    Restore(backup::RestoreArgs),
    /// Check a store's tables or a backup location's files.
    Verify(backup::VerifyArgs),
    /// Manage tokens on a running server.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Debug, clap::Args)]
struct DataArgs {
    /// Number of SKUs.
    #[arg(long, default_value_t = 200)]
    skus: usize,
    /// Number of warehouses.
    #[arg(long, default_value_t = 4)]
    warehouses: usize,
    /// Share of events sent late (out of order).
    #[arg(long, default_value_t = 0.02)]
    late_fraction: f64,
    /// Random seed (default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// Time of the first event, RFC 3339 (default: now). With a seed, the same
    /// events every run.
    #[arg(long)]
    start: Option<chrono::DateTime<chrono::Utc>>,
}

impl DataArgs {
    fn generator(&self, lines_per_sec: f64) -> Generator {
        Generator::new(GeneratorConfig {
            skus: self.skus.max(1),
            warehouses: self.warehouses.max(1),
            order_lines_per_sec: lines_per_sec,
            late_fraction: self.late_fraction.clamp(0.0, 1.0),
            seed: self.seed.unwrap_or_else(rand::random),
            start: self.start.unwrap_or_else(chrono::Utc::now),
            ..GeneratorConfig::default()
        })
    }
}

#[derive(Debug, clap::Args)]
struct RemoteArgs {
    /// Server URL.
    #[arg(long, env = "QUIVER_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Token to authenticate with.
    #[arg(long, env = "QUIVER_TOKEN")]
    token: Option<String>,
}

impl RemoteArgs {
    fn endpoint(&self, path: &str) -> String {
        format!("{}/{path}", self.url.trim_end_matches('/'))
    }

    fn token(&self) -> anyhow::Result<String> {
        self.token
            .clone()
            .or_else(|| std::env::var("QUIVER_ADMIN_TOKEN").ok())
            .context("no token: pass --token or set QUIVER_TOKEN")
    }
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token; its secret is printed once.
    Create {
        /// Scopes to grant (repeatable): read, ingest, admin.
        #[arg(long = "scope", required = true)]
        scopes: Vec<Scope>,
        /// A name to recognise it by.
        #[arg(long, default_value = "cli")]
        name: String,
        /// Lifetime, e.g. 90days (default: until deleted).
        #[arg(long)]
        ttl: Option<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Replace a token: a new one with the same name and scopes is printed, and the old
    /// one keeps working for the grace period so clients can switch without downtime.
    Rotate {
        /// Id of the token to replace.
        id: String,
        /// How long the old token keeps working.
        #[arg(long, default_value = "1h")]
        grace: String,
        /// Lifetime of the new token (default: until deleted).
        #[arg(long)]
        ttl: Option<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// List tokens (without secrets).
    List {
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Delete a token by id.
    Delete {
        /// Token id.
        id: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

fn init_logging(format: &str) {
    init_logging_at(format, "info");
}

/// Logs at `level` and above (`QUIVER_LOG` overrides), as `format` says.
fn init_logging_at(format: &str, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("QUIVER_LOG").unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{level},deltalake=warn,deltalake_core=warn,datafusion=warn,buoyant_kernel=off"
        ))
    });
    let json = match format {
        "json" => true,
        "pretty" => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(config) => {
            init_logging(&config.log_format);
            let server = RunningServer::start(config).await?;
            announce(&server);
            tokio::select! {
                () = wait_for_signal() => server.shutdown().await,
                reason = server.recovery_failed() => {
                    let _ = server.shutdown().await;
                    anyhow::bail!("recovery failed: {reason}")
                }
            }
        }
        Command::Demo {
            serve,
            data,
            rate,
            backfill_days,
        } => {
            init_logging(&serve.log_format);
            demo(serve, data, rate, backfill_days).await
        }
        Command::Generate {
            events,
            format,
            out,
            data,
        } => files::generate(events, &format, &out, &data),
        Command::Load {
            file,
            stream,
            batch,
            concurrency,
            remote,
        } => files::load(&file, &stream, batch.max(1), concurrency.max(1), &remote).await,
        Command::Token { command } => token(command).await,
        Command::Report { command } => report::run(command).await,
        Command::Backup(args) => {
            init_logging_at("auto", "warn");
            backup::backup(args).await
        }
        Command::Restore(args) => {
            init_logging_at("auto", "warn");
            backup::restore(args).await
        }
        Command::Verify(args) => {
            init_logging_at("auto", "warn");
            backup::verify(args).await
        }
        Command::Forecast(args) => {
            init_logging_at("auto", "warn");
            jobs::run(quiver_models::job::JobKind::Forecast, args).await
        }
        Command::Anomalies(args) => {
            init_logging_at("auto", "warn");
            jobs::run(quiver_models::job::JobKind::Anomalies, args).await
        }
    }
}

fn announce(server: &RunningServer) {
    if let Some(t) = &server.generated_admin_token {
        println!("Generated admin token (shown once, keep it): {t}");
    }
    println!("Quiver HTTP API on http://{}", server.http_addr);
    println!(
        "Dashboard: http://{}/?d=operations (sign in with an admin or read token)",
        server.http_addr
    );
    let _ = std::io::stdout().flush();
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The alert rule the demo starts with.
const DEMO_ALERT: &str = "CREATE ALERT stock_out ON stock_on_hand WHERE on_hand <= 0 \
                          FOR 30s KEEP FIRING FOR 1m SEVERITY critical";

async fn demo(
    mut serve: ServeConfig,
    data: DataArgs,
    rate: f64,
    backfill_days: u32,
) -> anyhow::Result<()> {
    // The demo runs the jobs and the built-in reports on a schedule unless told otherwise.
    serve.report_example_schedules = true;
    serve
        .forecast_schedule
        .get_or_insert_with(|| "0 * * * *".to_owned());
    serve
        .anomalies_schedule
        .get_or_insert_with(|| "*/10 * * * *".to_owned());
    let server = RunningServer::start(serve).await?;
    announce(&server);
    server.wait_ready().await?;
    let token = server
        .create_token("demo-feed", vec![Scope::Ingest, Scope::Read])
        .await?;
    // Something for the dashboard's bell: a SKU running out in a warehouse.
    server.ensure_alert(DEMO_ALERT).await?;
    let base = format!("http://{}", server.http_addr);
    let client = reqwest::Client::new();
    // Everything from here stops at Ctrl-C or SIGTERM, the backfill included.
    let work = async {
        let backfilled = backfill_days > 0 && has_no_orders(&client, &base, &token).await;
        if backfilled {
            backfill(&client, &base, &token, &data, backfill_days).await;
        }
        // Forecasts and anomalies from what is there now; then on their schedules.
        server.run_job_soon(quiver_models::job::JobKind::Forecast)?;
        server.run_job_soon(quiver_models::job::JobKind::Anomalies)?;
        println!("Demo feed: about {rate} events/s into 'orders' and 'inventory'. Ctrl-C stops.");
        println!(
            "Try: curl -s {base}/v1/sql -H \"Authorization: Bearer $QUIVER_TOKEN\" \
             -d '{{\"sql\": \"SELECT status, COUNT(*) FROM orders GROUP BY 1\"}}'"
        );
        // About 1.4 events per order line over its life (status changes and stock moves).
        let mut generator = data.generator((rate / 5.0).max(0.1));
        if !backfilled {
            let opening = generator.opening_stock();
            send_events(&client, &base, &token, opening).await;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut sent: u64 = 0;
        let started = Instant::now();
        loop {
            tick.tick().await;
            let due = (started.elapsed().as_secs_f64() * rate) as u64;
            if due > sent {
                let n = (due - sent) as usize;
                let events = generator.next_events(n);
                sent += events.len() as u64;
                send_events(&client, &base, &token, events).await;
            }
        }
        #[allow(unreachable_code)]
        Ok::<(), anyhow::Error>(())
    };
    let outcome = tokio::select! {
        done = work => done,
        () = wait_for_signal() => Ok(()),
    };
    let stopped = server.shutdown().await;
    outcome.and(stopped)
}

/// Whether the store holds no order events yet (a fresh demo).
async fn has_no_orders(client: &reqwest::Client, base: &str, token: &str) -> bool {
    let answer = client
        .post(format!("{base}/v1/sql"))
        .bearer_auth(token)
        .json(&serde_json::json!({"sql": "SELECT COUNT(*) AS n FROM orders"}))
        .send()
        .await;
    let body: serde_json::Value = match answer {
        Ok(r) if r.status().is_success() => r.json().await.unwrap_or_default(),
        _ => return false,
    };
    body["rows"][0][0].as_i64() == Some(0)
}

/// Sends `days` of generated history ending now (a slower rate than the live feed, so
/// it takes seconds), with a progress line.
async fn backfill(client: &reqwest::Client, base: &str, token: &str, data: &DataArgs, days: u32) {
    let now = chrono::Utc::now();
    let start = now - chrono::Duration::days(i64::from(days));
    // Enough demand per SKU and warehouse for weekly patterns (about 30,000 events a
    // day at the defaults; 56 days took 35 s into a debug build): the forecast
    // needs 6 weeks of history for a backtest.
    let lines_per_sec = (data.skus.max(1) * data.warehouses.max(1)) as f64 * 3.5 / 86_400.0;
    let mut generator = Generator::new(GeneratorConfig {
        skus: data.skus.max(1),
        warehouses: data.warehouses.max(1),
        order_lines_per_sec: lines_per_sec,
        late_fraction: 0.0,
        seed: data.seed.unwrap_or_else(rand::random),
        start,
        ..GeneratorConfig::default()
    });
    println!("Backfilling {days} days of history…");
    let began = Instant::now();
    let opening = generator.opening_stock();
    let mut sent = opening.len();
    send_events(client, base, token, opening).await;
    while generator.now_us() < now.timestamp_micros() {
        let mut events = generator.next_events(20_000);
        events.retain(|e| e.event_time_us < now.timestamp_micros());
        sent += events.len();
        send_events(client, base, token, events).await;
    }
    println!(
        "Backfilled {sent} events in {:.1} s",
        began.elapsed().as_secs_f64()
    );
}

async fn send_events(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    events: Vec<GeneratedEvent>,
) {
    for kind in [StreamKind::Inventory, StreamKind::Orders] {
        let body: String = events
            .iter()
            .filter(|e| e.stream == kind)
            .flat_map(|e| [e.json.as_str(), "\n"])
            .collect();
        if body.is_empty() {
            continue;
        }
        let sent = client
            .post(format!("{base}/v1/streams/{}/events", kind.name()))
            .bearer_auth(token)
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => warn!(status = %r.status(), "demo feed request refused"),
            Err(e) => warn!(error = %e, "demo feed request failed"),
        }
    }
}

/// Sends an authenticated request; the JSON answer, or the server's error as an error.
async fn call(
    request: reqwest::RequestBuilder,
    remote: &RemoteArgs,
) -> anyhow::Result<serde_json::Value> {
    let resp = request.bearer_auth(remote.token()?).send().await?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        bail!("{status}: {text}");
    }
    Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
}

async fn token(cmd: TokenCommand) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    match cmd {
        TokenCommand::Create {
            scopes,
            name,
            ttl,
            remote,
        } => {
            let body = serde_json::json!({"name": name, "scopes": scopes, "ttl": ttl});
            let made = call(
                client.post(remote.endpoint("v1/tokens")).json(&body),
                &remote,
            )
            .await?;
            print_new_token(&made);
        }
        TokenCommand::Rotate {
            id,
            grace,
            ttl,
            remote,
        } => {
            let body = serde_json::json!({"grace": grace, "ttl": ttl});
            let made = call(
                client
                    .post(remote.endpoint(&format!("v1/tokens/{id}/rotate")))
                    .json(&body),
                &remote,
            )
            .await?;
            print_new_token(&made);
            println!(
                "the old token {id} stops working at {}",
                made["previous"]["expires_at"].as_str().unwrap_or("?")
            );
        }
        TokenCommand::List { remote } => {
            let list = call(client.get(remote.endpoint("v1/tokens")), &remote).await?;
            println!("{}", serde_json::to_string_pretty(&list)?);
        }
        TokenCommand::Delete { id, remote } => {
            call(
                client.delete(remote.endpoint(&format!("v1/tokens/{id}"))),
                &remote,
            )
            .await?;
            println!("deleted {id}");
        }
    }
    Ok(())
}

fn print_new_token(made: &serde_json::Value) {
    println!("id:      {}", made["id"].as_str().unwrap_or(""));
    println!("token:   {}", made["token"].as_str().unwrap_or(""));
    if let Some(at) = made["expires_at"].as_str() {
        println!("expires: {at}");
    }
    println!("(the token is shown once)");
}
