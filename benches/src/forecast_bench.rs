//! The demand-forecast core over many series, in-process: generated daily histories
//! (smooth weekly series and intermittent ones, as `quiver_models::synthetic` makes
//! them), each forecast `--horizon` days ahead by `quiver_models::demand::forecast`
//! on `--threads` threads. Prints wall time, series per second, which methods were
//! chosen, accuracy on held-out days against seasonal naive, interval coverage and
//! RSS. The job runner (reading order lines, writing tables) is not part of it.
//!
//!   forecast-bench --series 10000 --days 730 --horizon 14 --threads 2

use std::collections::BTreeMap;
use std::time::Instant;

use clap::Parser;
use quiver_models::demand::{DemandConfig, Method, forecast_many};
use quiver_models::progress::Progress;
use quiver_models::synthetic::{intermittent, smooth};
use rand::SeedableRng;
use rand::rngs::StdRng;

#[derive(Parser)]
struct Args {
    /// Series to forecast.
    #[arg(long, default_value_t = 10_000)]
    series: usize,
    /// Days of history per series (the last `horizon` are held out to score).
    #[arg(long, default_value_t = 730)]
    days: usize,
    #[arg(long, default_value_t = 14)]
    horizon: usize,
    /// Share of intermittent series.
    #[arg(long, default_value_t = 0.3)]
    intermittent: f64,
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

fn main() {
    let args = Args::parse();
    let mut rng = StdRng::seed_from_u64(7);
    let sparse = (args.series as f64 * args.intermittent) as usize;
    let histories: Vec<Vec<f64>> = (0..args.series)
        .map(|i| {
            if i < sparse {
                intermittent(&mut rng, args.days + args.horizon)
            } else {
                smooth(&mut rng, args.days + args.horizon)
            }
        })
        .collect();
    let config = DemandConfig {
        horizon: args.horizon,
        ..DemandConfig::default()
    };
    let training: Vec<Vec<f64>> = histories
        .iter()
        .map(|y| y[..y.len() - args.horizon].to_vec())
        .collect();
    let started = Instant::now();
    let results = forecast_many(&training, &config, args.threads, &Progress::default())
        .expect("nothing cancels the benchmark");
    let wall = started.elapsed().as_secs_f64();

    let mut methods: BTreeMap<String, usize> = BTreeMap::new();
    let (mut abs, mut naive_abs, mut inside_80, mut inside_95, mut days) = (0.0, 0.0, 0, 0, 0);
    for (y, f) in histories.iter().zip(&results) {
        let name = match f.fallback {
            Some(fb) => format!("{} ({})", f.method, fb.name()),
            None => f.method.to_owned(),
        };
        *methods.entry(name).or_default() += 1;
        let (train, test) = y.split_at(y.len() - args.horizon);
        let naive = Method::SeasonalNaive
            .forecast(train, args.horizon)
            .expect("histories are longer than a week")
            .point;
        for d in 0..args.horizon {
            abs += (test[d] - f.point[d]).abs();
            naive_abs += (test[d] - naive[d]).abs();
            inside_80 += usize::from((f.lower_80[d]..=f.upper_80[d]).contains(&test[d]));
            inside_95 += usize::from((f.lower_95[d]..=f.upper_95[d]).contains(&test[d]));
            days += 1;
        }
    }
    println!(
        "{} series x {} days, horizon {}, {} threads: {:.1} s wall, {:.0} series/s",
        args.series,
        args.days,
        args.horizon,
        args.threads,
        wall,
        args.series as f64 / wall
    );
    println!("methods: {methods:?}");
    println!(
        "held-out MAE vs seasonal naive: {:.3}; 80% interval held {:.3}, 95% held {:.3}",
        abs / naive_abs,
        inside_80 as f64 / days as f64,
        inside_95 as f64 / days as f64
    );
    println!(
        "peak RSS {} MiB",
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(
                |s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l
                    .split_whitespace()
                    .nth(1)?
                    .parse::<u64>()
                    .ok())
            )
            .map_or(0, |kb| kb / 1024)
    );
}
