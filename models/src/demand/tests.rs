//! Forecasts of generated demand whose truth is known: weekly seasonality, trend,
//! noise, intermittent and stopped series, and the histories no model fits.

use rand::SeedableRng;
use rand::rngs::StdRng;

use super::*;
use crate::synthetic::{intermittent, smooth};

struct Scored {
    chosen_abs: f64,
    naive_abs: f64,
    chosen_sq: f64,
    naive_sq: f64,
    /// Absolute error of the horizon's total demand (what stock must cover).
    chosen_total: f64,
    naive_total: f64,
    inside_80: usize,
    inside_95: usize,
    days: usize,
}

/// Forecasts each series from all but its last `horizon` days and scores the
/// forecasts on those days.
fn score(series: &[Vec<f64>], config: &DemandConfig) -> Scored {
    let h = config.horizon;
    let mut s = Scored {
        chosen_abs: 0.0,
        naive_abs: 0.0,
        chosen_sq: 0.0,
        naive_sq: 0.0,
        chosen_total: 0.0,
        naive_total: 0.0,
        inside_80: 0,
        inside_95: 0,
        days: 0,
    };
    for y in series {
        let (train, test) = y.split_at(y.len() - h);
        let f = forecast(train, config);
        let naive = Method::SeasonalNaive.forecast(train, h).unwrap().point;
        let total = |v: &[f64]| v.iter().sum::<f64>();
        s.chosen_total += (total(test) - total(&f.point)).abs();
        s.naive_total += (total(test) - total(&naive)).abs();
        for d in 0..h {
            s.chosen_abs += (test[d] - f.point[d]).abs();
            s.naive_abs += (test[d] - naive[d]).abs();
            s.chosen_sq += (test[d] - f.point[d]).powi(2);
            s.naive_sq += (test[d] - naive[d]).powi(2);
            s.inside_80 += usize::from((f.lower_80[d]..=f.upper_80[d]).contains(&test[d]));
            s.inside_95 += usize::from((f.lower_95[d]..=f.upper_95[d]).contains(&test[d]));
            s.days += 1;
        }
    }
    s
}

/// On smooth weekly series the chosen model must beat seasonal naive clearly. With
/// noise of standard deviation σ around a weekly pattern, seasonal naive's error is
/// the difference of two noisy days (√2·σ) while a model that smooths the level errs
/// by about σ: a ratio near 0.71. 0.85 leaves room for the trend and for the
/// backtest sometimes choosing seasonal naive, and still fails if selection or the
/// MSTL model is broken (a ratio of 1 or more).
#[test]
fn chosen_models_beat_seasonal_naive_on_smooth_series() {
    let mut rng = StdRng::seed_from_u64(19);
    let series: Vec<Vec<f64>> = (0..120).map(|_| smooth(&mut rng, 2 * 182)).collect();
    let s = score(&series, &DemandConfig::default());
    let ratio = s.chosen_abs / s.naive_abs;
    assert!(ratio < 0.85, "MAE ratio to seasonal naive {ratio:.3}");
}

/// On intermittent series seasonal naive repeats last week's few sales on the same
/// weekdays, which are random. A rate forecast (Croston–SBA, TSB) errs by the day's
/// own spread (σ) where seasonal naive errs by the difference of two days (√2·σ): a
/// ratio of root mean squared errors near 0.71, and the error of the two weeks' total
/// demand, what stock must cover, falls further. 0.85 on both fails if the rate
/// methods are not chosen. (Absolute daily error is not compared: it is smallest for a
/// forecast of zero on a series that sells on fewer than half its days.)
#[test]
fn intermittent_methods_beat_seasonal_naive_on_sparse_series() {
    let mut rng = StdRng::seed_from_u64(23);
    let series: Vec<Vec<f64>> = (0..150).map(|_| intermittent(&mut rng, 2 * 182)).collect();
    let s = score(&series, &DemandConfig::default());
    let ratio = (s.chosen_sq / s.naive_sq).sqrt();
    assert!(ratio < 0.85, "RMSE ratio to seasonal naive {ratio:.3}");
    let totals = s.chosen_total / s.naive_total;
    assert!(totals < 0.85, "horizon-total error ratio {totals:.3}");
    let methods: std::collections::HashSet<&str> = series
        .iter()
        .map(|y| forecast(&y[..y.len() - 14], &DemandConfig::default()).method)
        .collect();
    assert!(
        methods.contains("croston_sba") || methods.contains("tsb"),
        "{methods:?}"
    );
}

/// Over many series, 80% intervals hold 70–90% of held-out days and 95% intervals
/// 88–99%: calibrated on average, not per series (each series has only a few weeks of
/// errors to learn its spread from). On their own, smooth series came to 81% and 93%
/// here, intermittent ones to 93% and 99%: a sparse series' days are mostly zeros, so
/// an interval either holds the usual sale size or not, and cannot hold exactly 80%.
#[test]
fn intervals_cover_what_they_claim_over_many_series() {
    let mut rng = StdRng::seed_from_u64(29);
    let mut series: Vec<Vec<f64>> = (0..100).map(|_| smooth(&mut rng, 2 * 182)).collect();
    series.extend((0..60).map(|_| intermittent(&mut rng, 2 * 182)));
    let s = score(&series, &DemandConfig::default());
    let c80 = s.inside_80 as f64 / s.days as f64;
    let c95 = s.inside_95 as f64 / s.days as f64;
    assert!(
        (0.70..=0.90).contains(&c80),
        "80% interval covered {c80:.3}"
    );
    assert!(
        (0.88..=0.99).contains(&c95),
        "95% interval covered {c95:.3}"
    );
    // The coverage the run records is an honest estimate of the same thing.
    let recorded: Vec<f64> = series
        .iter()
        .filter_map(|y| forecast(&y[..y.len() - 14], &DemandConfig::default()).backtest)
        .filter_map(|b| b.coverage_80)
        .collect();
    let mean = recorded.iter().sum::<f64>() / recorded.len() as f64;
    assert!((0.65..=0.92).contains(&mean), "recorded coverage {mean:.3}");
}

/// Histories no model should be fitted to get a fallback that says which, with
/// `horizon` sensible values, and never a panic.
#[test]
fn bad_histories_fall_back_and_say_why() {
    let config = DemandConfig::default();
    let mut rng = StdRng::seed_from_u64(31);
    let mut stopped = smooth(&mut rng, 120);
    stopped.extend(std::iter::repeat_n(0.0, 30));
    let cases: Vec<(&str, Vec<f64>, Option<Fallback>)> = vec![
        ("none", vec![], Some(Fallback::NoHistory)),
        ("one day", vec![4.0], Some(Fallback::Constant)),
        ("never sold", vec![0.0; 90], Some(Fallback::NoSales)),
        ("constant", vec![3.0; 90], Some(Fallback::Constant)),
        ("stopped", stopped, Some(Fallback::Stopped)),
        (
            "five days",
            vec![1.0, 4.0, 0.0, 2.0, 3.0],
            Some(Fallback::ShortHistory),
        ),
        (
            "three weeks",
            smooth(&mut rng, 21),
            Some(Fallback::ShortHistory),
        ),
        (
            "gaps (NaN, infinite, negative)",
            {
                let mut y = smooth(&mut rng, 120);
                y[100] = f64::NAN;
                y[101] = f64::INFINITY;
                y[102] = -5.0;
                y
            },
            None,
        ),
    ];
    for (what, history, want) in cases {
        let f = forecast(&history, &config);
        assert_eq!(f.fallback, want, "{what}");
        for v in [&f.point, &f.lower_80, &f.upper_80, &f.lower_95, &f.upper_95] {
            assert_eq!(v.len(), config.horizon, "{what}");
            assert!(
                v.iter().all(|x| x.is_finite() && *x >= 0.0),
                "{what}: {v:?}"
            );
        }
        for d in 0..config.horizon {
            assert!(
                f.lower_95[d] <= f.lower_80[d] && f.lower_80[d] <= f.point[d],
                "{what}"
            );
            assert!(
                f.point[d] <= f.upper_80[d] && f.upper_80[d] <= f.upper_95[d],
                "{what}"
            );
        }
        if want == Some(Fallback::Stopped) || want == Some(Fallback::NoSales) {
            assert!(f.point.iter().all(|&x| x == 0.0), "{what}");
        }
    }
}

/// Croston–SBA and TSB on a short fixed series, by hand: demands 3 then 5 at days 3
/// and 5 (intervals 3, 2); smoothing at 0.1 gives a size of 3.2 and an interval of
/// 2.9, so SBA forecasts 0.95 · 3.2 / 2.9; TSB's occurrence smoothing over
/// 0, 0, 1, 0, 1 gives 0.1, then 0.09, then 0.181, times its size 3.2.
#[test]
fn intermittent_methods_match_hand_computed_values() {
    let y = [0.0, 0.0, 3.0, 0.0, 5.0];
    let sba = Method::CrostonSba.forecast(&y, 3).unwrap().point;
    let tsb = Method::Tsb.forecast(&y, 3).unwrap().point;
    for v in sba {
        assert!((v - 0.95 * 3.2 / 2.9).abs() < 1e-12, "{v}");
    }
    for v in tsb {
        assert!((v - 0.181 * 3.2).abs() < 1e-12, "{v}");
    }
}

/// The regression learns a weekly shape on a rising level from the days before each
/// day: on a noiseless series it forecasts the next two weeks within a fraction of a
/// unit (seasonal naive, which repeats last week, falls behind the trend by 0.7 a day
/// in the first week and 1.4 in the second), and its fitted coefficients are kept.
#[test]
fn the_regression_follows_trend_and_weekly_shape() {
    let shape = [0.0, 1.0, 2.0, 4.0, 8.0, 6.0, 3.0];
    let y: Vec<f64> = (0..126)
        .map(|t| 20.0 + 0.1 * t as f64 + shape[t % WEEK])
        .collect();
    let (train, test) = y.split_at(112);
    let fitted = Method::RidgeFeatures.forecast(train, 14).unwrap();
    let mae = |p: &[f64]| p.iter().zip(test).map(|(a, b)| (a - b).abs()).sum::<f64>() / 14.0;
    let naive = Method::SeasonalNaive.forecast(train, 14).unwrap();
    assert!(mae(&fitted.point) < 0.5, "{:?}", fitted.point);
    assert!(mae(&naive.point) > 1.0);
    let coefficients = fitted.params["coefficients"].as_object().unwrap();
    assert_eq!(coefficients.len(), 11, "{}", fitted.params);
    assert!(
        coefficients
            .values()
            .all(|c| c.as_f64().is_some_and(f64::is_finite))
    );
    assert!(matches!(
        Method::RidgeFeatures.forecast(&y[..41], 14),
        Err(MethodError::TooShort { needs: 42, .. })
    ));
}

#[test]
fn many_threads_return_each_series_forecast_in_input_order() {
    let mut rng = StdRng::seed_from_u64(11);
    // Cheap and costly series mixed, so threads finish out of order.
    let series: Vec<Vec<f64>> = (0..24)
        .map(|i| {
            if i % 3 == 0 {
                intermittent(&mut rng, 120)
            } else {
                smooth(&mut rng, 120)
            }
        })
        .collect();
    let config = DemandConfig::default();
    let alone: Vec<SeriesForecast> = series.iter().map(|y| forecast(y, &config)).collect();
    let progress = Progress::default();
    let many = forecast_many(&series, &config, 3, &progress).unwrap();
    assert_eq!(many, alone);
    assert_eq!(progress.report().done, 24);

    progress.cancel();
    assert!(forecast_many(&series, &config, 3, &progress).is_err());
}
