//! Demand forecasting at scale, three ways:
//!
//! - `core`: the forecasting core in-process: generated daily histories (smooth weekly
//!   series and intermittent ones, as `quiver_models::synthetic` makes them), each
//!   forecast `--horizon` days ahead by `quiver_models::demand::forecast_many` on
//!   `--threads` threads. Prints wall time, series per second, the methods chosen,
//!   accuracy on held-out days against seasonal naive, interval coverage and RSS.
//! - `write-store`: the same histories written to a store as paid order lines (one
//!   line per series and day with sales, ending yesterday) plus opening stock, through
//!   the engine's ingest path, so the whole job (`quiver forecast`) can be timed on it.
//! - `score`: reads the `forecasts` table a job wrote to that store and scores it
//!   against the held-out days the store never saw.
//!
//!   forecast-bench core --series 10000 --days 730 --horizon 14 --threads 2
//!   forecast-bench write-store --store /tmp/fc --series 10000 --days 730
//!   quiver forecast --store file:///tmp/fc --threads 2
//!   forecast-bench score --store /tmp/fc --series 10000 --days 730

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arrow::array::{Array, AsArray as _};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Date32Type, Float64Type};
use chrono::{NaiveDate, Utc};
use clap::{Parser, Subcommand};
use quiver_engine::{Engine, EngineConfig, EngineMetrics, StreamSchema};
use quiver_ingest::{Format, decode};
use quiver_models::demand::{DemandConfig, Method, forecast_many};
use quiver_models::progress::Progress;
use quiver_models::synthetic::{intermittent, smooth};
use rand::SeedableRng;
use rand::rngs::StdRng;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

/// The generated series: every command regenerates the same ones from the seed.
#[derive(clap::Args, Clone, Copy)]
struct Series {
    /// Series to generate.
    #[arg(long, default_value_t = 10_000)]
    series: usize,
    /// Days of history per series (followed by `horizon` held-out days).
    #[arg(long, default_value_t = 730)]
    days: usize,
    #[arg(long, default_value_t = 14)]
    horizon: usize,
    /// Share of intermittent series.
    #[arg(long, default_value_t = 0.3)]
    intermittent: f64,
}

#[derive(Subcommand)]
enum Command {
    /// The forecasting core alone, in-process.
    Core {
        #[command(flatten)]
        series: Series,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Writes the histories to a local store as order lines, ending yesterday.
    WriteStore {
        #[command(flatten)]
        series: Series,
        /// A folder for the store (created).
        #[arg(long)]
        store: PathBuf,
    },
    /// Scores the `forecasts` table in a store written by `write-store`.
    Score {
        #[command(flatten)]
        series: Series,
        #[arg(long)]
        store: PathBuf,
    },
}

/// Series `i` is this SKU in this warehouse: four warehouses, as the demo has.
fn key(i: usize) -> (String, String) {
    (format!("SKU-{:05}", i / 4), format!("W{}", i % 4 + 1))
}

fn index(sku: &str, warehouse: &str) -> Option<usize> {
    let s: usize = sku.strip_prefix("SKU-")?.parse().ok()?;
    let w: usize = warehouse.strip_prefix('W')?.parse().ok()?;
    (1..=4).contains(&w).then_some(s * 4 + w - 1)
}

/// History and held-out days of every series.
fn generate(s: &Series) -> Vec<Vec<f64>> {
    let mut rng = StdRng::seed_from_u64(7);
    let sparse = (s.series as f64 * s.intermittent) as usize;
    (0..s.series)
        .map(|i| {
            if i < sparse {
                intermittent(&mut rng, s.days + s.horizon)
            } else {
                smooth(&mut rng, s.days + s.horizon)
            }
        })
        .collect()
}

/// Seasonal naive's forecast of the held-out days of each series: the yardstick.
fn naive_forecasts(histories: &[Vec<f64>], s: &Series) -> anyhow::Result<Vec<Vec<f64>>> {
    histories
        .iter()
        .map(|y| {
            Ok(Method::SeasonalNaive
                .forecast(&y[..s.days], s.horizon)
                .context("histories are longer than a week")?
                .point)
        })
        .collect()
}

/// Accuracy of forecasts against held-out truth, with seasonal naive as the yardstick.
#[derive(Default)]
struct Score {
    abs: f64,
    naive_abs: f64,
    inside_80: usize,
    inside_95: usize,
    days: usize,
    methods: BTreeMap<String, usize>,
}

impl Score {
    fn add(&mut self, truth: f64, naive: f64, point: f64, i80: (f64, f64), i95: (f64, f64)) {
        self.abs += (truth - point).abs();
        self.naive_abs += (truth - naive).abs();
        self.inside_80 += usize::from((i80.0..=i80.1).contains(&truth));
        self.inside_95 += usize::from((i95.0..=i95.1).contains(&truth));
        self.days += 1;
    }

    fn print(&self) {
        println!("methods: {:?}", self.methods);
        println!(
            "held-out MAE vs seasonal naive: {:.3}; 80% interval held {:.3}, 95% held {:.3} ({} series-days)",
            self.abs / self.naive_abs,
            self.inside_80 as f64 / self.days as f64,
            self.inside_95 as f64 / self.days as f64,
            self.days
        );
    }
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Core { series, threads } => core(&series, threads),
        Command::WriteStore { series, store } => runtime()?.block_on(write_store(&series, &store)),
        Command::Score { series, store } => runtime()?.block_on(score(&series, &store)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn core(s: &Series, threads: usize) -> anyhow::Result<()> {
    let histories = generate(s);
    let config = DemandConfig {
        horizon: s.horizon,
        ..DemandConfig::default()
    };
    let training: Vec<Vec<f64>> = histories.iter().map(|y| y[..s.days].to_vec()).collect();
    let started = Instant::now();
    let results = forecast_many(&training, &config, threads, &Progress::default())
        .context("nothing cancels the benchmark")?;
    let wall = started.elapsed().as_secs_f64();

    let naive = naive_forecasts(&histories, s)?;
    let mut score = Score::default();
    for ((y, f), naive) in histories.iter().zip(&results).zip(&naive) {
        let name = match f.fallback {
            Some(fb) => format!("{} ({})", f.method, fb.name()),
            None => f.method.to_owned(),
        };
        *score.methods.entry(name).or_default() += 1;
        for (d, &truth) in y[s.days..].iter().enumerate() {
            score.add(
                truth,
                naive[d],
                f.point[d],
                (f.lower_80[d], f.upper_80[d]),
                (f.lower_95[d], f.upper_95[d]),
            );
        }
    }
    println!(
        "{} series x {} days, horizon {}, {threads} threads: {wall:.1} s wall, {:.0} series/s",
        s.series,
        s.days,
        s.horizon,
        s.series as f64 / wall
    );
    score.print();
    println!("peak RSS {} MiB", peak_rss_mib());
    Ok(())
}

async fn open(store: &std::path::Path, wal: &std::path::Path) -> anyhow::Result<Engine> {
    let mut config = EngineConfig::new(format!("file://{}", store.display()), wal);
    config.upkeep_interval = Duration::ZERO;
    config.views.maintain = false;
    Ok(Engine::open(config, Arc::new(EngineMetrics::unregistered())).await?)
}

/// The day the store's history ends after: its held-out days start here.
fn marker(store: &std::path::Path) -> PathBuf {
    store.join("forecast-bench-today")
}

async fn write_store(s: &Series, store: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(store)?;
    let wal = tempfile::tempdir()?;
    let engine = open(store, wal.path()).await?;
    let histories = generate(s);
    let today = Utc::now().date_naive();
    std::fs::write(marker(store), today.to_string())?;
    let first = today - chrono::Duration::days(s.days as i64);
    let started = Instant::now();

    // Opening stock: about three weeks of each series' recent demand, so some run out
    // within the horizon and most do not.
    let mut stock = String::new();
    for (i, y) in histories.iter().enumerate() {
        let (sku, wh) = key(i);
        let recent: f64 = y[s.days - 28..s.days].iter().sum::<f64>() / 28.0;
        let qty = (recent * 21.0 * (0.5 + (i % 7) as f64 / 6.0))
            .round()
            .max(1.0);
        stock.push_str(&format!(
            r#"{{"event_id":"s{i}","event_time":"{first}T00:00:00Z","sku":"{sku}","warehouse_id":"{wh}","kind":"receipt","quantity":{qty},"unit_cost":"2.50"}}"#
        ));
        stock.push('\n');
    }
    let batch = decode(&StreamSchema::inventory(), Format::Ndjson, stock.as_bytes())?;
    engine.ingest("inventory", batch, None).await?;

    // One paid line per series and day with sales, a day at a time (all series).
    let mut body = String::new();
    let mut lines = 0usize;
    for d in 0..s.days {
        let day = first + chrono::Duration::days(d as i64);
        for (i, y) in histories.iter().enumerate() {
            if y[d] <= 0.0 {
                continue;
            }
            let (sku, wh) = key(i);
            body.push_str(&format!(
                r#"{{"event_id":"e{i}-{d}","event_time":"{day}T12:00:00Z","order_id":"o{i}-{d}","customer_id":"c{}","warehouse_id":"{wh}","sku":"{sku}","quantity":{},"unit_price":"9.99","status":"paid","channel":"web"}}"#,
                i % 977,
                y[d]
            ));
            body.push('\n');
            lines += 1;
        }
        if body.len() > 32 << 20 || d + 1 == s.days {
            let batch = decode(&StreamSchema::orders(), Format::Ndjson, body.as_bytes())?;
            engine.ingest("orders", batch, None).await?;
            body.clear();
        }
    }
    engine.flush_all().await?;
    engine.shutdown().await?;
    println!(
        "wrote {lines} order lines ({} series x {} days up to {}) and {} stock receipts in {:.1} s",
        s.series,
        s.days,
        today.pred_opt().unwrap_or(today),
        s.series,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn score(s: &Series, store: &std::path::Path) -> anyhow::Result<()> {
    let today: NaiveDate = std::fs::read_to_string(marker(store))
        .context("the store was not written by write-store")?
        .trim()
        .parse()?;
    let histories = generate(s);
    let naive = naive_forecasts(&histories, s)?;
    let wal = tempfile::tempdir()?;
    let engine = open(store, wal.path()).await?;
    let batches = engine
        .query_session()
        .context()
        .sql(
            "SELECT sku, warehouse_id, date, yhat, yhat_lower, yhat_upper, \
             yhat_lower_95, yhat_upper_95, model FROM forecasts",
        )
        .await?
        .collect()
        .await?;
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).context("epoch")?;
    let today_days = (today - epoch).num_days() as i32;
    let mut score = Score::default();
    let mut models: HashMap<usize, String> = HashMap::new();
    let mut outside = 0;
    for b in &batches {
        // Strings come back as views or plain; one type to read them.
        let text = |c: usize| cast(b.column(c), &DataType::Utf8);
        let num = |c: usize| b.column(c).as_primitive::<Float64Type>();
        let (sku, wh, model) = (text(0)?, text(1)?, text(8)?);
        let (sku, wh, model) = (
            sku.as_string::<i32>(),
            wh.as_string::<i32>(),
            model.as_string::<i32>(),
        );
        let date = b.column(2).as_primitive::<Date32Type>();
        for r in 0..b.num_rows() {
            let i = index(sku.value(r), wh.value(r)).context("a series the store never had")?;
            let d = (date.value(r) - today_days) as usize;
            if date.is_null(r) || d >= s.horizon {
                outside += 1;
                continue;
            }
            models.entry(i).or_insert_with(|| model.value(r).to_owned());
            score.add(
                histories[i][s.days + d],
                naive[i][d],
                num(3).value(r),
                (num(4).value(r), num(5).value(r)),
                (num(6).value(r), num(7).value(r)),
            );
        }
    }
    engine.shutdown().await?;
    anyhow::ensure!(
        outside == 0,
        "{outside} forecast rows are not for the {} days after {today}",
        s.horizon
    );
    for m in models.into_values() {
        *score.methods.entry(m).or_default() += 1;
    }
    println!(
        "forecasts for {} series starting {today}",
        score.methods.values().sum::<usize>()
    );
    score.print();
    Ok(())
}

fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}
