//! Durable-ingest load driver: many concurrent HTTP requests of N events each against a
//! running Quiver, for a fixed time; reports events/s, request latency percentiles and
//! the server's resident memory.
//!
//! Only loopback targets are accepted, and the run stops by itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use quiver_benches::rss_mib;
use quiver_engine::StreamSchema;
use quiver_ingest::Format;
use quiver_ingest::generator::{Generator, GeneratorConfig, StreamKind};

#[derive(Debug, Parser)]
struct Args {
    /// The server; the token needs the ingest scope.
    #[command(flatten)]
    target: quiver_benches::Target,
    /// ndjson or arrow.
    #[arg(long, default_value = "ndjson")]
    format: String,
    /// Events per request.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// How long to run.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Server process id, to sample its RSS.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Write one request body to this file and exit (for an outside client such as
    /// `wrk`, which posts it as fast as it can and ignores `Retry-After`).
    #[arg(long)]
    write_body: Option<std::path::PathBuf>,
}

fn bodies(format: Format, batch: usize, count: usize) -> anyhow::Result<Vec<bytes::Bytes>> {
    let mut g = Generator::new(GeneratorConfig::default());
    let schema = StreamSchema::orders();
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let lines: Vec<String> = g
            .next_events(batch * 3)
            .into_iter()
            .filter(|e| e.stream == StreamKind::Orders)
            .take(batch)
            .map(|e| e.json)
            .collect();
        if lines.len() < batch {
            continue;
        }
        let ndjson = lines.join("\n");
        let body = match format {
            Format::ArrowIpc => {
                let b = quiver_ingest::decode(&schema, Format::Ndjson, ndjson.as_bytes())?;
                let mut buf = Vec::new();
                let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut buf, &b.schema())?;
                w.write(&b)?;
                w.finish()?;
                drop(w);
                buf
            }
            _ => ndjson.into_bytes(),
        };
        out.push(bytes::Bytes::from(body));
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let base = args.target.base()?;
    let format: Format = args.format.parse()?;
    if let Some(path) = &args.write_body {
        let body = bodies(format, args.batch, 1)?.remove(0);
        std::fs::write(path, &body).with_context(|| format!("writing {}", path.display()))?;
        return Ok(());
    }
    let bodies = Arc::new(bodies(format, args.batch, 64)?);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let url = format!("{base}/v1/streams/orders/events");
    let deadline = Instant::now() + args.duration;
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..args.concurrency {
        let client = client.clone();
        let url = url.clone();
        let token = args.target.token.clone();
        let bodies = Arc::clone(&bodies);
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors: std::collections::BTreeMap<String, u64> = Default::default();
            let mut i = w;
            while Instant::now() < deadline {
                let body = bodies[i % bodies.len()].clone();
                i += args.concurrency;
                let t = Instant::now();
                let r = client
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", format.content_type())
                    .body(body)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => lat.push(t.elapsed()),
                    Ok(r) => {
                        *errors.entry(r.status().as_u16().to_string()).or_default() += 1;
                        if r.status().as_u16() == 503 {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    Err(e) => *errors.entry(format!("transport: {e}")).or_default() += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut rss_samples = Vec::new();
    if let Some(pid) = args.server_pid {
        while Instant::now() < deadline {
            if let Some(r) = rss_mib(pid) {
                rss_samples.push(r);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let mut lat = Vec::new();
    let mut errors: std::collections::BTreeMap<String, u64> = Default::default();
    for w in workers {
        let (l, e) = w.await.context("worker")?;
        lat.extend(l);
        for (k, n) in e {
            *errors.entry(k).or_default() += n;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(f64::NAN)
    };
    let events = lat.len() * args.batch;
    println!(
        "format={} batch={} concurrency={} duration={:.1}s requests={} refused={:?} events/s={:.0} p50={:.2}ms p99={:.2}ms max={:.2}ms",
        format,
        args.batch,
        args.concurrency,
        secs,
        lat.len(),
        errors,
        events as f64 / secs,
        pct(0.50),
        pct(0.99),
        pct(1.0),
    );
    if !rss_samples.is_empty() {
        let steady = &rss_samples[rss_samples.len() / 2..];
        let max = steady.iter().cloned().fold(0.0, f64::max);
        let last = rss_samples.last().copied().unwrap_or(0.0);
        println!("server_rss_mib steady_max={max:.0} last={last:.0}");
    }
    Ok(())
}
