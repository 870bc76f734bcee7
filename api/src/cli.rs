//! The `quiver` command line: `serve`, `demo`, `generate`, `load`, `token`.

use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use arrow::record_batch::RecordBatch;
use clap::{Parser, Subcommand};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use quiver_engine::StreamSchema;
use quiver_ingest::Format;
use quiver_ingest::generator::{GeneratedEvent, Generator, GeneratorConfig, StreamKind};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

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
}

impl DataArgs {
    fn generator(&self, lines_per_sec: f64) -> Generator {
        Generator::new(GeneratorConfig {
            skus: self.skus.max(1),
            warehouses: self.warehouses.max(1),
            order_lines_per_sec: lines_per_sec,
            late_fraction: self.late_fraction.clamp(0.0, 1.0),
            seed: self.seed.unwrap_or_else(rand::random),
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
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("QUIVER_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,deltalake=warn,datafusion=warn"));
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
            wait_for_signal().await;
            server.shutdown().await
        }
        Command::Demo { serve, data, rate } => {
            init_logging(&serve.log_format);
            demo(serve, data, rate).await
        }
        Command::Generate {
            events,
            format,
            out,
            data,
        } => generate(events, &format, &out, &data),
        Command::Load {
            file,
            stream,
            batch,
            concurrency,
            remote,
        } => load(&file, &stream, batch.max(1), concurrency.max(1), &remote).await,
        Command::Token { command } => token(command).await,
    }
}

fn announce(server: &RunningServer) {
    if let Some(t) = &server.generated_admin_token {
        println!("Generated admin token (shown once, keep it): {t}");
    }
    println!("Quiver HTTP API on http://{}", server.http_addr);
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

async fn demo(serve: ServeConfig, data: DataArgs, rate: f64) -> anyhow::Result<()> {
    let server = RunningServer::start(serve).await?;
    announce(&server);
    server.wait_ready().await;
    let token = server
        .create_token("demo-feed", vec![Scope::Ingest])
        .await?;
    let base = format!("http://{}", server.http_addr);
    println!("Demo feed: about {rate} events/s into 'orders' and 'inventory'. Ctrl-C stops.");
    let client = reqwest::Client::new();
    // About 1.4 events per order line over its life (status changes and stock moves).
    let mut generator = data.generator((rate / 5.0).max(0.1));
    let opening = generator.opening_stock();
    send_events(&client, &base, &token, opening).await;
    let feed = async {
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
    };
    tokio::select! {
        _ = feed => {}
        _ = wait_for_signal() => {}
    }
    server.shutdown().await
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

fn generate(events: usize, format: &str, out: &Path, data: &DataArgs) -> anyhow::Result<()> {
    let format: Format = format.parse().map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(out)?;
    let ext = match format {
        Format::Ndjson | Format::Json => "ndjson",
        Format::Csv => "csv",
        Format::ArrowIpc => "arrow",
    };
    let mut generator = data.generator(50.0);
    let bar = progress(events as u64, "generating");
    let mut writers = Vec::new();
    for kind in [StreamKind::Orders, StreamKind::Inventory] {
        let path = out.join(format!("{}.{ext}", kind.name()));
        let schema = match kind {
            StreamKind::Orders => StreamSchema::orders(),
            StreamKind::Inventory => StreamSchema::inventory(),
        };
        writers.push((kind, FileSink::create(&path, format, &schema)?, path));
    }
    let mut done = 0usize;
    let mut pending = generator.opening_stock();
    while done < events {
        if pending.is_empty() {
            pending = generator.next_events((events - done).min(10_000));
        }
        let take = pending.len().min(events - done);
        let chunk: Vec<GeneratedEvent> = pending.drain(..take).collect();
        for (kind, sink, _) in &mut writers {
            let lines: Vec<&str> = chunk
                .iter()
                .filter(|e| e.stream == *kind)
                .map(|e| e.json.as_str())
                .collect();
            sink.write(&lines)?;
        }
        done += take;
        bar.set_position(done as u64);
    }
    bar.finish_and_clear();
    for (_, sink, path) in writers {
        let n = sink.finish()?;
        println!("{}: {n} events", path.display());
    }
    Ok(())
}

/// Writes generated JSON lines as NDJSON, CSV or Arrow IPC.
#[derive(Debug)]
struct FileSink {
    out: SinkOut,
    schema: StreamSchema,
    events: usize,
}

enum SinkOut {
    Ndjson(BufWriter<std::fs::File>),
    Csv(Box<arrow::csv::Writer<BufWriter<std::fs::File>>>),
    Arrow(Box<arrow::ipc::writer::StreamWriter<BufWriter<std::fs::File>>>),
}

impl std::fmt::Debug for SinkOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ndjson(_) => "ndjson",
            Self::Csv(_) => "csv",
            Self::Arrow(_) => "arrow",
        })
    }
}

impl FileSink {
    fn create(path: &Path, format: Format, schema: &StreamSchema) -> anyhow::Result<Self> {
        let file = BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        );
        let out = match format {
            Format::Ndjson | Format::Json => SinkOut::Ndjson(file),
            Format::Csv => SinkOut::Csv(Box::new(arrow::csv::Writer::new(file))),
            Format::ArrowIpc => SinkOut::Arrow(Box::new(
                arrow::ipc::writer::StreamWriter::try_new(file, schema.input_schema())?,
            )),
        };
        Ok(Self {
            out,
            schema: schema.clone(),
            events: 0,
        })
    }

    fn to_batch(&self, lines: &[&str]) -> anyhow::Result<RecordBatch> {
        let body = lines.join("\n");
        Ok(quiver_ingest::decode(
            &self.schema,
            Format::Ndjson,
            body.as_bytes(),
        )?)
    }

    fn write(&mut self, lines: &[&str]) -> anyhow::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        match &mut self.out {
            SinkOut::Ndjson(w) => {
                for l in lines {
                    w.write_all(l.as_bytes())?;
                    w.write_all(b"\n")?;
                }
            }
            SinkOut::Csv(_) | SinkOut::Arrow(_) => {
                let batch = self.to_batch(lines)?;
                match &mut self.out {
                    SinkOut::Csv(w) => w.write(&batch)?,
                    SinkOut::Arrow(w) => w.write(&batch)?,
                    SinkOut::Ndjson(_) => {}
                }
            }
        }
        self.events += lines.len();
        Ok(())
    }

    fn finish(self) -> anyhow::Result<usize> {
        match self.out {
            SinkOut::Ndjson(mut w) => w.flush()?,
            SinkOut::Csv(w) => w.into_inner().flush()?,
            SinkOut::Arrow(mut w) => w.finish()?,
        }
        Ok(self.events)
    }
}

fn progress(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_owned());
    bar
}

/// One request body and the number of events in it.
type Chunk = (usize, Vec<u8>);

/// Splits a file into request bodies of about `batch` events each.
fn chunks(file: &Path, batch: usize) -> anyhow::Result<(Format, Vec<Chunk>)> {
    let ext = file.extension().and_then(|e| e.to_str()).unwrap_or("");
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    match ext {
        "ndjson" | "jsonl" | "json" => {
            let lines: Vec<&[u8]> = bytes
                .split(|b| *b == b'\n')
                .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
                .collect();
            Ok((
                Format::Ndjson,
                lines
                    .chunks(batch)
                    .map(|c| (c.len(), c.join(&b'\n')))
                    .collect(),
            ))
        }
        "csv" => {
            let mut reader = csv::ReaderBuilder::new().from_reader(bytes.as_slice());
            let header = reader.byte_headers()?.clone();
            let mut out = Vec::new();
            let mut w = csv::Writer::from_writer(Vec::new());
            w.write_byte_record(&header)?;
            let mut n = 0;
            for rec in reader.byte_records() {
                w.write_byte_record(&rec?)?;
                n += 1;
                if n == batch {
                    out.push((n, w.into_inner()?));
                    w = csv::Writer::from_writer(Vec::new());
                    w.write_byte_record(&header)?;
                    n = 0;
                }
            }
            if n > 0 {
                out.push((n, w.into_inner()?));
            }
            Ok((Format::Csv, out))
        }
        "arrow" | "arrows" | "ipc" => {
            let reader =
                arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
            let schema = reader.schema();
            let mut out = Vec::new();
            for b in reader {
                let b = b?;
                let mut offset = 0;
                while offset < b.num_rows() {
                    let len = batch.min(b.num_rows() - offset);
                    let slice = b.slice(offset, len);
                    let mut buf = Vec::new();
                    let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut buf, &schema)?;
                    w.write(&slice)?;
                    w.finish()?;
                    drop(w);
                    out.push((len, buf));
                    offset += len;
                }
            }
            Ok((Format::ArrowIpc, out))
        }
        other => bail!(
            "cannot tell the format of '{}' (extension '{other}'): use .ndjson, .csv or .arrow",
            file.display()
        ),
    }
}

async fn load(
    file: &Path,
    stream: &str,
    batch: usize,
    concurrency: usize,
    remote: &RemoteArgs,
) -> anyhow::Result<()> {
    let token = remote.token()?;
    let (format, bodies) = chunks(file, batch)?;
    let total: usize = bodies.iter().map(|(n, _)| n).sum();
    let file_id = hex::encode(&Sha256::digest(file.display().to_string().as_bytes())[..8]);
    let bar = progress(total as u64, "loading");
    let client = reqwest::Client::new();
    let url = format!(
        "{}/v1/streams/{stream}/events",
        remote.url.trim_end_matches('/')
    );
    let client = Arc::new(client);
    let mut results = futures::stream::iter(bodies.into_iter().enumerate())
        .map(|(i, (n, body))| {
            let client = Arc::clone(&client);
            let url = url.clone();
            let token = token.clone();
            // A stable key per chunk: re-running a load stores nothing twice.
            let key = format!("load-{file_id}-{i}");
            async move {
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    let resp = client
                        .post(&url)
                        .bearer_auth(&token)
                        .header("content-type", format.content_type())
                        .header("idempotency-key", &key)
                        .body(body.clone())
                        .send()
                        .await;
                    match resp {
                        Ok(r) if r.status().is_success() => return Ok(n),
                        Ok(r) if r.status().as_u16() == 503 || r.status().as_u16() == 429 => {}
                        Ok(r) => {
                            let status = r.status();
                            let text = r.text().await.unwrap_or_default();
                            bail!("chunk {i} refused ({status}): {text}");
                        }
                        Err(e) if attempt >= 5 => return Err(e.into()),
                        Err(_) => {}
                    }
                    if attempt >= 30 {
                        bail!("chunk {i}: server kept refusing");
                    }
                    tokio::time::sleep(Duration::from_millis(200 * attempt.min(10))).await;
                }
            }
        })
        .buffer_unordered(concurrency);
    let started = Instant::now();
    let mut sent = 0usize;
    while let Some(r) = results.next().await {
        sent += r?;
        bar.set_position(sent as u64);
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "loaded {sent} events into '{stream}' in {secs:.1}s ({:.0} events/s)",
        sent as f64 / secs.max(1e-9)
    );
    info!(sent, stream, "load finished");
    Ok(())
}

async fn token(cmd: TokenCommand) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    match cmd {
        TokenCommand::Create {
            scopes,
            name,
            remote,
        } => {
            let resp = client
                .post(format!("{}/v1/tokens", remote.url.trim_end_matches('/')))
                .bearer_auth(remote.token()?)
                .json(&serde_json::json!({"name": name, "scopes": scopes}))
                .send()
                .await?;
            let status = resp.status();
            let body: serde_json::Value = resp.json().await?;
            if !status.is_success() {
                bail!("{status}: {body}");
            }
            println!("id:    {}", body["id"].as_str().unwrap_or(""));
            println!("token: {}", body["token"].as_str().unwrap_or(""));
            println!("(the token is shown once)");
        }
        TokenCommand::List { remote } => {
            let resp = client
                .get(format!("{}/v1/tokens", remote.url.trim_end_matches('/')))
                .bearer_auth(remote.token()?)
                .send()
                .await?;
            let status = resp.status();
            let body: serde_json::Value = resp.json().await?;
            if !status.is_success() {
                bail!("{status}: {body}");
            }
            println!("{}", serde_json::to_string_pretty(&body)?);
        }
        TokenCommand::Delete { id, remote } => {
            let resp = client
                .delete(format!(
                    "{}/v1/tokens/{id}",
                    remote.url.trim_end_matches('/')
                ))
                .bearer_auth(remote.token()?)
                .send()
                .await?;
            if !resp.status().is_success() {
                bail!(
                    "{}: {}",
                    resp.status(),
                    resp.text().await.unwrap_or_default()
                );
            }
            println!("deleted {id}");
        }
    }
    Ok(())
}
