//! Generated daily demand whose shape is known, for tests and benchmarks: smooth
//! weekly series and intermittent ones.

use rand::Rng;
use rand::rngs::StdRng;

/// A weekday pattern (weekends sell more), a level, a gentle trend and noise, rounded
/// to whole units: what most SKUs in a warehouse look like.
pub fn smooth(rng: &mut StdRng, days: usize) -> Vec<f64> {
    const WEEKDAY: [f64; 7] = [0.8, 0.9, 0.9, 1.0, 1.1, 1.5, 1.3];
    let level = rng.random_range(8.0..60.0);
    let trend = rng.random_range(-0.01..0.02) * level / 30.0;
    let noise = rng.random_range(0.1..0.3) * level;
    (0..days)
        .map(|d| {
            let mean = (level + trend * d as f64) * WEEKDAY[d % 7];
            // A sum of uniforms: near-normal noise without another dependency.
            let e: f64 = (0..4).map(|_| rng.random_range(-1.0..1.0)).sum::<f64>() * 0.866;
            (mean + noise * e).round().max(0.0)
        })
        .collect()
}

/// A sale on some days only, of a few units.
pub fn intermittent(rng: &mut StdRng, days: usize) -> Vec<f64> {
    let p = rng.random_range(0.08..0.45);
    let size = rng.random_range(1.0..6.0);
    (0..days)
        .map(|_| {
            if rng.random_bool(p) {
                (size * rng.random_range(0.5..1.5_f64)).round().max(1.0)
            } else {
                0.0
            }
        })
        .collect()
}
