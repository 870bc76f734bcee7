//! Forecasts checked against statsforecast's on fixed series
//! (`models/fixtures/golden.json`, made offline by `models/fixtures/make_golden.py`).

use augurs_core::{Fit, Predict};
use augurs_ets::AutoETS;
use serde_json::Value;

use super::Method;

fn golden() -> Value {
    serde_json::from_str(include_str!("../../fixtures/golden.json")).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// The largest difference between `ours` and `theirs`, relative to theirs.
fn worst_relative(ours: &[f64], theirs: &[f64]) -> f64 {
    assert_eq!(ours.len(), theirs.len());
    ours.iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1e-9))
        .fold(0.0, f64::max)
}

fn case(series: &str, forecast: &str) -> (Vec<f64>, Vec<f64>, usize) {
    let g = golden();
    let h = g["horizon"].as_u64().unwrap() as usize;
    (
        floats(&g["series"][series]),
        floats(&g["forecasts"][forecast]),
        h,
    )
}

#[test]
fn seasonal_naive_croston_sba_and_tsb_equal_statsforecast() {
    for (method, series, forecast) in [
        (Method::SeasonalNaive, "weekly", "seasonal_naive_weekly"),
        (
            Method::CrostonSba,
            "intermittent",
            "croston_sba_intermittent",
        ),
        (Method::Tsb, "intermittent", "tsb_intermittent"),
    ] {
        let (y, want, h) = case(series, forecast);
        let got = method.forecast(&y, h).unwrap().point;
        let worst = worst_relative(&got, &want);
        assert!(worst < 1e-9, "{forecast}: {got:?} vs {want:?}");
    }
}

#[test]
fn auto_ets_matches_statsforecast() {
    let (y, want, h) = case("trend", "auto_ets_zzn_trend");
    let fit = AutoETS::non_seasonal().fit(&y).unwrap();
    let got = fit.predict(h, None).unwrap().point;
    let worst = worst_relative(&got, &want);
    // The same model search and optimizer (augurs ports statsforecast's): equal to
    // rounding.
    assert!(worst < 1e-9, "{got:?} vs {want:?}");
}

#[test]
fn mstl_with_auto_ets_matches_statsforecast() {
    let (y, want, h) = case("weekly", "mstl_auto_ets_weekly");
    let got = Method::MstlEts.forecast(&y, h).unwrap().point;
    let worst = worst_relative(&got, &want);
    // The decompositions differ in detail (stlrs, a port of R's STL, against
    // statsmodels' STL in statsforecast): 0.07% apart at most on a 26-week series,
    // within 0.5% on this 13-week one.
    assert!(worst < 0.005, "{got:?} vs {want:?}");
}
