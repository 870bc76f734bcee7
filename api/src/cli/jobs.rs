//! `quiver forecast` and `quiver anomalies`: a batch job run from the command line
//! against a store, with or without a server using the same store.
//!
//! The command opens its own engine on the store with a WAL of its own in a temporary
//! folder, loads no views and runs no upkeep, so it only reads the streams and writes
//! the job's result tables; a server on the same store finds the new table versions
//! within its table refresh interval.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use quiver_engine::{Engine, EngineConfig, EngineMetrics};
use quiver_models::job::{JobKind, Run, RunState, RunSummary, run_job};

/// What both job commands take.
#[derive(Debug, clap::Args)]
pub(super) struct JobArgs {
    /// The store the server uses: a folder, file://PATH, s3://BUCKET/PREFIX.
    #[arg(long, env = "QUIVER_STORE", default_value = "file://./quiver-data")]
    store: String,
    /// Days to forecast (forecast job).
    #[arg(long, default_value_t = 14)]
    horizon: usize,
    /// Threads to compute on.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Memory the history query may use.
    #[arg(long, env = "QUIVER_QUERY_MEMORY_LIMIT", default_value_t = 2 << 30)]
    query_memory_limit: usize,
    /// Print the run's summary as JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs job `kind` once; an error (and a failing exit) when the run did not succeed.
pub(super) async fn run(kind: JobKind, args: JobArgs) -> anyhow::Result<()> {
    let wal = std::env::temp_dir().join(format!(
        "quiver-{}-{}-{}",
        kind.name(),
        std::process::id(),
        chrono::Utc::now().timestamp_micros()
    ));
    let outcome = run_in(kind, &args, &wal).await;
    let _ = std::fs::remove_dir_all(&wal);
    let summary = outcome?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    match summary.state {
        RunState::Succeeded => Ok(()),
        state => anyhow::bail!(
            "run {} {}: {}",
            summary.run_id,
            <&str>::from(state),
            summary.error.as_deref().unwrap_or("no reason given")
        ),
    }
}

async fn run_in(
    kind: JobKind,
    args: &JobArgs,
    wal: &std::path::Path,
) -> anyhow::Result<RunSummary> {
    let mut config = EngineConfig::new(args.store.clone(), wal.to_path_buf());
    config.upkeep_interval = Duration::ZERO;
    config.views.maintain = false;
    config.query.memory_limit = args.query_memory_limit;
    let engine = Engine::open(config, std::sync::Arc::new(EngineMetrics::unregistered()))
        .await
        .with_context(|| format!("opening the store {}", args.store))?;
    let job = crate::config::job_config(args.horizon, args.threads);
    let run = Run::new(kind);

    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{msg:>12} [{elapsed_precise}] {wide_bar} {pos}/{len}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // On a terminal, a bar; otherwise (cron, CI, a pipe) a line per stage on stderr.
    let terminal = std::io::stderr().is_terminal();
    let watch = {
        let (bar, progress) = (bar.clone(), std::sync::Arc::clone(&run.progress));
        let id = run.id.clone();
        tokio::spawn(async move {
            let mut stage = "";
            loop {
                let now = progress.report();
                if terminal {
                    bar.set_message(now.stage);
                    bar.set_length(now.total);
                    bar.set_position(now.done);
                } else if now.stage != stage {
                    stage = now.stage;
                    eprintln!("{id}: {stage} ({} to do)", now.total);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // Ctrl-C asks the run to stop; it then writes nothing more and says so.
    let stopper = {
        let progress = std::sync::Arc::clone(&run.progress);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                progress.cancel();
            }
        })
    };
    let summary = run_job(&engine, &run, &job, chrono::Utc::now()).await;
    watch.abort();
    stopper.abort();
    bar.finish_and_clear();
    engine.shutdown().await.context("closing the store")?;
    Ok(summary)
}

fn print_summary(s: &RunSummary) {
    let seconds = (s.finished - s.started).num_milliseconds() as f64 / 1000.0;
    println!(
        "{} {} in {seconds:.1} s: {} series, {} rows",
        s.run_id,
        <&str>::from(s.state),
        s.series,
        s.rows
    );
    if let Some(end) = s.history_end {
        println!("history up to {end}");
    }
    if !s.models.is_empty() {
        let models: Vec<String> = s.models.iter().map(|(m, n)| format!("{m} {n}")).collect();
        println!("chosen: {}", models.join(", "));
    }
    if let (Some(mae), Some(base)) = (s.backtest_mae, s.baseline_mae) {
        println!(
            "backtest MAE {mae:.3} against seasonal naive {base:.3} (ratio {})",
            s.mase_vs_seasonal_naive
                .map_or_else(|| "n/a".to_owned(), |m| format!("{m:.3}"))
        );
    }
    if let (Some(c80), Some(c95)) = (s.coverage_80, s.coverage_95) {
        println!(
            "interval coverage in backtest: 80% → {:.1}%, 95% → {:.1}%",
            c80 * 100.0,
            c95 * 100.0
        );
    }
    let tables: Vec<String> = s.tables.iter().map(|(t, v)| format!("{t} v{v}")).collect();
    println!("wrote: {}", tables.join(", "));
    if let Some(e) = &s.error {
        println!("error: {e}");
    }
}
