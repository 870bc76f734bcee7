//! View maintenance vs recompute, in one process, on one store.
//!
//! Loads `--events` generated events (default 10M) into an engine with the KPI views of
//! `sql/kpis`, flushes them all to Delta, then applies `--batches` batches of
//! `--batch` new events (default 1,000) and reads how long each view spent on each.
//! Recompute time is each view's SQL run from the streams (the views it reads inlined
//! as common table expressions) over the same data. Then the state per view, the
//! restart-to-ready time from a checkpoint, and the time to refill every view from
//! the tables when there is no checkpoint.
//!
//!   cargo run --release -p quiver-benches --bin view-bench -- --events 10000000

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use quiver_engine::{Engine, EngineConfig, EngineMetrics, Prepared, StreamSchema};
use quiver_ingest::generator::{Generator, GeneratorConfig, StreamKind};
use quiver_ingest::{Format, decode};

#[derive(Debug, Parser)]
struct Args {
    /// Events of history.
    #[arg(long, default_value_t = 10_000_000)]
    events: usize,
    /// Events per measured batch.
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
    /// Measured batches.
    #[arg(long, default_value_t = 30)]
    batches: usize,
    /// Recompute runs per view (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Folder of KPI definitions.
    #[arg(long, default_value = "sql/kpis")]
    kpis: PathBuf,
    /// Scratch folder (store and WAL); a temporary one by default.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The views' memory limit in MiB, as the server's `--view-memory-limit` (0: none);
    /// past it operator state moves to disk.
    #[arg(long, default_value_t = 0)]
    view_memory_limit_mib: usize,
}

fn own_rss_mib() -> f64 {
    quiver_benches::rss_mib(std::process::id()).unwrap_or(0.0)
}

/// Generates `n` events and ingests them, one request per stream per `chunk`.
async fn feed(
    engine: &Engine,
    generator: &mut Generator,
    n: usize,
    chunk: usize,
) -> anyhow::Result<()> {
    let orders = StreamSchema::orders();
    let inventory = StreamSchema::inventory();
    let mut left = n;
    while left > 0 {
        let take = left.min(chunk);
        let events = generator.next_events(take);
        left -= take;
        let mut bodies: BTreeMap<&str, String> = BTreeMap::new();
        for e in events.into_iter().take(take) {
            let body = bodies.entry(e.stream.name()).or_default();
            body.push_str(&e.json);
            body.push('\n');
        }
        for (stream, body) in bodies {
            let schema = if stream == StreamKind::Orders.name() {
                &orders
            } else {
                &inventory
            };
            let batch = decode(schema, Format::Ndjson, body.as_bytes())
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            engine.ingest(stream, batch, None).await?;
        }
    }
    Ok(())
}

async fn run_sql(engine: &Engine, sql: &str) -> anyhow::Result<usize> {
    let session = engine.query_session();
    let Prepared::Query(plan) = session.prepare(sql, &[]).await? else {
        anyhow::bail!("not a query");
    };
    let rt = engine.query_runtime();
    let rows = rt
        .spawn(async move {
            let mut stream = session.execute(*plan).await?;
            let mut rows = 0;
            while let Some(b) = stream.next().await {
                rows += b.map_err(|e| anyhow::anyhow!("{e}"))?.num_rows();
            }
            anyhow::Ok(rows)
        })
        .await??;
    Ok(rows)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn config(dir: &std::path::Path, kpis: Vec<String>, memory_limit_mib: usize) -> EngineConfig {
    let mut c = EngineConfig::new(
        format!("file://{}", dir.join("store").display()),
        dir.join("wal"),
    );
    c.upkeep_interval = Duration::ZERO;
    c.views.definitions = kpis;
    c.views.checkpoint_interval = Duration::from_secs(3600);
    c.views.memory_limit = memory_limit_mib << 20;
    // The views' now(): a day after the simulated history starts, so the KPIs' retention
    // judges it as recent data (10 M events span about 11 simulated hours).
    c.views.clock = quiver_engine::clock::Clock::manual(HISTORY_START_MS + 24 * 3_600_000);
    c
}

/// Seconds spent in rounds moving view state to disk, and rounds, so far.
fn evict_rounds(registry: &prometheus_client::registry::Registry) -> (f64, f64) {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
        return (0.0, 0.0);
    }
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("quiver_view_state_evict_seconds_sum"),
        value("quiver_view_state_evict_seconds_count"),
    )
}

/// When the simulated history starts: 2026-11-01T00:00:00Z.
const HISTORY_START_MS: i64 = 1_793_491_200_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scratch = tempfile::tempdir()?;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| scratch.path().to_owned());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&args.kpis)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    let kpis = files
        .iter()
        .map(std::fs::read_to_string)
        .collect::<Result<Vec<_>, _>>()?;
    let mut registry = prometheus_client::registry::Registry::with_prefix("quiver");
    let metrics = Arc::new(EngineMetrics::new(&mut registry));
    let engine = Engine::open(
        config(&dir, kpis.clone(), args.view_memory_limit_mib),
        Arc::clone(&metrics),
    )
    .await?;

    let mut generator = Generator::new(GeneratorConfig {
        start: chrono::DateTime::from_timestamp_millis(HISTORY_START_MS)
            .ok_or_else(|| anyhow::anyhow!("history start out of range"))?,
        order_lines_per_sec: 200.0,
        ..GeneratorConfig::default()
    });
    let started = Instant::now();
    let opening = generator.opening_stock();
    let inventory = StreamSchema::inventory();
    let body: String = opening.iter().map(|e| format!("{}\n", e.json)).collect();
    engine
        .ingest(
            "inventory",
            decode(&inventory, Format::Ndjson, body.as_bytes())
                .map_err(|e| anyhow::anyhow!("{e:?}"))?,
            None,
        )
        .await?;
    feed(&engine, &mut generator, args.events, 100_000).await?;
    engine.views().views_settled().await;
    let load = started.elapsed();
    engine.flush_all().await?;
    println!(
        "history: {} events ingested and maintained in {:.1} s ({:.0} events/s), RSS {:.0} MiB",
        args.events,
        load.as_secs_f64(),
        args.events as f64 / load.as_secs_f64(),
        own_rss_mib()
    );

    // Incremental: per view, the time it spent on each batch.
    let names: Vec<String> = engine
        .views()
        .views_info()
        .iter()
        .map(|v| v.name.clone())
        .collect();
    let mut spent: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut batch_wall = Vec::new();
    let rounds_before = evict_rounds(&registry);
    for _ in 0..args.batches {
        let before: BTreeMap<String, Duration> = engine
            .views()
            .views_info()
            .into_iter()
            .map(|v| (v.name, v.apply_time))
            .collect();
        let t = Instant::now();
        feed(&engine, &mut generator, args.batch, args.batch).await?;
        engine.views().views_settled().await;
        batch_wall.push(t.elapsed().as_secs_f64() * 1e3);
        for v in engine.views().views_info() {
            let d = v.apply_time - before[&v.name];
            spent.entry(v.name).or_default().push(d.as_secs_f64() * 1e3);
        }
    }

    let rounds_after = evict_rounds(&registry);
    println!(
        "state moved to disk during the batches: {} rounds, {:.1} ms in all ({:.0} ms in the {} batches' wall time)",
        rounds_after.1 - rounds_before.1,
        (rounds_after.0 - rounds_before.0) * 1e3,
        batch_wall.iter().sum::<f64>(),
        args.batches
    );

    // A checkpoint also measures each view's state.
    let t = Instant::now();
    engine.views().checkpoint_views().await?;
    println!(
        "view checkpoint (every view, to the store): {:.2} s",
        t.elapsed().as_secs_f64()
    );
    if let Some(h) = engine.views().last_checkpoint_holds() {
        println!(
            "  it held the maintainer {} times, {:.0} ms in all, the longest {:.2} ms ({}; {:.2} ms of CPU at most)",
            h.count,
            h.busy.as_secs_f64() * 1e3,
            h.longest.as_secs_f64() * 1e3,
            h.longest_at,
            h.longest_cpu.as_secs_f64() * 1e3
        );
    }

    // Recompute: each view's SQL from the streams, its inputs inlined.
    let infos = engine.views().views_info();
    println!(
        "\n| view | apply {} events (median ms) | recompute (median ms) | ratio | state MiB in memory | on disk | rows |",
        args.batch
    );
    println!("|---|---|---|---|---|---|---|");
    for (i, v) in infos.iter().enumerate() {
        let ctes: Vec<String> = infos[..i]
            .iter()
            .map(|w| format!("{} AS ({})", w.name, w.sql))
            .collect();
        let sql = if ctes.is_empty() {
            v.sql.clone()
        } else {
            format!("WITH {} {}", ctes.join(", "), v.sql)
        };
        let mut times = Vec::new();
        for _ in 0..args.runs {
            let t = Instant::now();
            run_sql(&engine, &sql).await?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let recompute = median(times);
        let apply = median(spent[&v.name].clone());
        println!(
            "| {} | {:.3} | {:.0} | {:.0}× | {:.1} | {:.1} | {} |",
            v.name,
            apply,
            recompute,
            recompute / apply,
            v.state_bytes as f64 / (1 << 20) as f64,
            v.state_disk_bytes as f64 / (1 << 20) as f64,
            v.rows
        );
    }
    println!(
        "\nwhole batch ({} events, ingest ack + every view): median {:.2} ms; RSS {:.0} MiB",
        args.batch,
        median(batch_wall),
        own_rss_mib()
    );
    let _ = names;

    // Restart-to-ready: from the checkpoint a clean stop writes, then with no checkpoint.
    let t = Instant::now();
    engine.shutdown().await?;
    println!(
        "clean stop (flush + view checkpoint): {:.2} s",
        t.elapsed().as_secs_f64()
    );
    drop(engine);
    let t = Instant::now();
    let engine = Engine::open(
        config(&dir, kpis.clone(), args.view_memory_limit_mib),
        Arc::clone(&metrics),
    )
    .await?;
    println!(
        "restart to ready from the checkpoint: {:.2} s",
        t.elapsed().as_secs_f64()
    );
    engine.shutdown().await?;
    drop(engine);
    // Every node's view checkpoints live under `_quiver/nodes/<node id>/views/`.
    std::fs::remove_dir_all(dir.join("store/_quiver/nodes"))?;
    let t = Instant::now();
    let engine = Engine::open(
        config(&dir, kpis, args.view_memory_limit_mib),
        Arc::clone(&metrics),
    )
    .await?;
    println!(
        "restart to ready with no checkpoint (every view refilled from the tables): {:.2} s",
        t.elapsed().as_secs_f64()
    );
    engine.shutdown().await?;
    println!(
        "machine: {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    Ok(())
}
