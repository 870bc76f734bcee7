//! A realistic order and inventory event source, for the demo, tests and benchmarks.
//!
//! Orders arrive with a daily and weekly rhythm. Each order has one to four lines; each
//! line moves created → paid → shipped → delivered, with some cancelled before payment
//! and some returned after delivery. A paid line is a `sale` movement of stock and a
//! return puts stock back; warehouses reorder (`receipt`) when stock runs low, and
//! stock counts are occasionally corrected (`adjustment`) or moved between
//! warehouses (`transfer_out` / `transfer_in`). A small share of events is sent late,
//! so the output is out of order in event time the way real feeds are.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt::Write as _;

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Generator settings.
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    /// Number of distinct SKUs.
    pub skus: usize,
    /// Number of warehouses.
    pub warehouses: usize,
    /// Number of customers.
    pub customers: usize,
    /// Mean new order lines per second of simulated time at an average hour.
    pub order_lines_per_sec: f64,
    /// Share of events delivered late (out of order).
    pub late_fraction: f64,
    /// Random seed; the same seed gives the same events.
    pub seed: u64,
    /// Simulated start time.
    pub start: DateTime<Utc>,
    /// How much faster than real time order lifecycles run (1 = real durations).
    pub lifecycle_speedup: f64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            skus: 200,
            warehouses: 4,
            customers: 5_000,
            order_lines_per_sec: 50.0,
            late_fraction: 0.02,
            seed: 7,
            start: Utc::now(),
            lifecycle_speedup: 360.0,
        }
    }
}

/// Which stream an event belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// `orders`.
    Orders,
    /// `inventory`.
    Inventory,
}

impl StreamKind {
    /// Stream name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Orders => "orders",
            Self::Inventory => "inventory",
        }
    }
}

/// One generated event, already rendered as a JSON object line.
#[derive(Debug, Clone)]
pub struct GeneratedEvent {
    /// Target stream.
    pub stream: StreamKind,
    /// Event time in microseconds since the epoch.
    pub event_time_us: i64,
    /// The event as one line of JSON (no newline).
    pub json: String,
}

#[derive(Debug, Clone)]
struct Line {
    order_id: u64,
    customer: usize,
    warehouse: usize,
    sku: usize,
    quantity: i64,
    unit_cents: i64,
    channel: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    Pay,
    Cancel,
    Ship,
    Deliver,
    Return,
    Receive {
        warehouse: usize,
        sku: usize,
        units: i64,
    },
    TransferIn {
        warehouse: usize,
        sku: usize,
        units: i64,
    },
}

/// The event source.
#[derive(Debug)]
pub struct Generator {
    cfg: GeneratorConfig,
    rng: StdRng,
    now_us: i64,
    next_order: u64,
    next_event: u64,
    run: String,
    lines: HashMap<(u64, u8), Line>,
    agenda: BinaryHeap<Reverse<(i64, u64, u8, Step)>>,
    stock: Vec<i64>,
    on_order: Vec<bool>,
    prices: Vec<i64>,
    late: Vec<(i64, GeneratedEvent)>,
    out: Vec<GeneratedEvent>,
}

const CHANNELS: [&str; 3] = ["web", "store", "marketplace"];

impl Generator {
    /// A generator with the given settings.
    pub fn new(cfg: GeneratorConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let cells = cfg.skus.max(1) * cfg.warehouses.max(1);
        let prices = (0..cfg.skus.max(1))
            .map(|_| rng.random_range(199..=24_999))
            .collect();
        let stock = (0..cells).map(|_| rng.random_range(40..400)).collect();
        let run = format!("{:06x}", rng.random::<u32>() & 0xff_ffff);
        Self {
            now_us: cfg.start.timestamp_micros(),
            rng,
            next_order: 1,
            next_event: 1,
            run,
            lines: HashMap::new(),
            agenda: BinaryHeap::new(),
            stock,
            on_order: vec![false; cells],
            prices,
            late: Vec::new(),
            out: Vec::new(),
            cfg,
        }
    }

    /// Simulated time of the last event, microseconds since the epoch.
    pub fn now_us(&self) -> i64 {
        self.now_us
    }

    /// The opening stock of every (sku, warehouse), as `receipt` events at the start.
    pub fn opening_stock(&mut self) -> Vec<GeneratedEvent> {
        let t = self.now_us;
        for w in 0..self.cfg.warehouses.max(1) {
            for s in 0..self.cfg.skus.max(1) {
                let units = self.stock[self.cell(w, s)];
                self.inventory(t, s, w, "receipt", units, true);
            }
        }
        std::mem::take(&mut self.out)
    }

    /// Produces about `n` events in emission order.
    pub fn next_events(&mut self, n: usize) -> Vec<GeneratedEvent> {
        let mut produced = Vec::with_capacity(n + 8);
        while produced.len() < n {
            self.step();
            produced.append(&mut self.out);
        }
        produced
    }

    fn cell(&self, warehouse: usize, sku: usize) -> usize {
        warehouse * self.cfg.skus.max(1) + sku
    }

    /// Rate multiplier for the time of day (peak in the evening) and week (busier weekend).
    fn rhythm(&self, t_us: i64) -> f64 {
        let t = DateTime::from_timestamp_micros(t_us).unwrap_or_else(Utc::now);
        let hour = t.hour() as f64 + t.minute() as f64 / 60.0;
        let daily = 1.0 + 0.6 * ((hour - 19.0) / 24.0 * std::f64::consts::TAU).cos();
        let weekly = match t.weekday().num_days_from_monday() {
            5 | 6 => 1.25,
            0 => 0.9,
            _ => 1.0,
        };
        (daily * weekly).max(0.1)
    }

    fn seconds(&mut self, lo: f64, hi: f64) -> i64 {
        let s = self.rng.random_range(lo..hi) / self.cfg.lifecycle_speedup.max(1e-6);
        (s * 1e6) as i64
    }

    /// Advances to the next thing that happens: a new order or a scheduled step.
    fn step(&mut self) {
        let rate = self.cfg.order_lines_per_sec.max(1e-3) * self.rhythm(self.now_us);
        let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
        let gap = (-u.ln() / rate * 1e6) as i64;
        let next_order_at = self.now_us + gap.max(1);
        let next_step_at = self.agenda.peek().map(|Reverse((t, ..))| *t);
        match next_step_at {
            Some(t) if t <= next_order_at => {
                if let Some(Reverse((t, order, line, step))) = self.agenda.pop() {
                    self.now_us = self.now_us.max(t);
                    self.run_step(t, order, line, step);
                }
            }
            _ => {
                self.now_us = next_order_at;
                self.new_order(next_order_at);
            }
        }
        self.release_late();
    }

    fn new_order(&mut self, t: i64) {
        let order_id = self.next_order;
        self.next_order += 1;
        let customer = self.rng.random_range(0..self.cfg.customers.max(1));
        let warehouse = self.rng.random_range(0..self.cfg.warehouses.max(1));
        let channel = CHANNELS[self.rng.random_range(0..CHANNELS.len())];
        let lines = 1 + (self.rng.random::<f64>().powi(2) * 4.0) as u8;
        for line in 0..lines.min(4) {
            // Popular SKUs sell more: a skewed pick.
            let skus = self.cfg.skus.max(1) as f64;
            let sku = (self.rng.random::<f64>().powi(3) * skus) as usize;
            let quantity = 1 + (self.rng.random::<f64>().powi(4) * 6.0) as i64;
            let l = Line {
                order_id,
                customer,
                warehouse,
                sku: sku.min(self.cfg.skus.max(1) - 1),
                quantity,
                unit_cents: self.prices[sku.min(self.prices.len() - 1)],
                channel,
            };
            self.order_event(t, &l, "created");
            let next = if self.rng.random::<f64>() < 0.07 {
                (t + self.seconds(60.0, 3600.0), Step::Cancel)
            } else {
                (t + self.seconds(5.0, 900.0), Step::Pay)
            };
            self.agenda.push(Reverse((next.0, order_id, line, next.1)));
            self.lines.insert((order_id, line), l);
        }
    }

    fn run_step(&mut self, t: i64, order: u64, line: u8, step: Step) {
        match step {
            Step::Receive {
                warehouse,
                sku,
                units,
            } => {
                let cell = self.cell(warehouse, sku);
                self.on_order[cell] = false;
                self.inventory(t, sku, warehouse, "receipt", units, false);
                return;
            }
            Step::TransferIn {
                warehouse,
                sku,
                units,
            } => {
                self.inventory(t, sku, warehouse, "transfer_in", units, false);
                return;
            }
            _ => {}
        }
        let Some(l) = self.lines.get(&(order, line)).cloned() else {
            return;
        };
        match step {
            Step::Cancel => {
                self.order_event(t, &l, "cancelled");
                self.lines.remove(&(order, line));
            }
            Step::Pay => {
                self.order_event(t, &l, "paid");
                self.inventory(t, l.sku, l.warehouse, "sale", -l.quantity, false);
                let next = t + self.seconds(3600.0, 2.0 * 86_400.0);
                self.agenda.push(Reverse((next, order, line, Step::Ship)));
            }
            Step::Ship => {
                self.order_event(t, &l, "shipped");
                let next = t + self.seconds(86_400.0, 4.0 * 86_400.0);
                self.agenda
                    .push(Reverse((next, order, line, Step::Deliver)));
            }
            Step::Deliver => {
                self.order_event(t, &l, "delivered");
                if self.rng.random::<f64>() < 0.04 {
                    let next = t + self.seconds(86_400.0, 14.0 * 86_400.0);
                    self.agenda.push(Reverse((next, order, line, Step::Return)));
                } else {
                    self.lines.remove(&(order, line));
                }
            }
            Step::Return => {
                self.order_event(t, &l, "returned");
                self.inventory(t, l.sku, l.warehouse, "return", l.quantity, false);
                self.lines.remove(&(order, line));
            }
            Step::Receive { .. } | Step::TransferIn { .. } => {}
        }
    }

    fn event_id(&mut self, prefix: char) -> String {
        let id = self.next_event;
        self.next_event += 1;
        format!("{prefix}-{}-{id}", self.run)
    }

    fn order_event(&mut self, t: i64, l: &Line, status: &str) {
        let id = self.event_id('o');
        let mut json = String::with_capacity(260);
        let _ = write!(
            json,
            r#"{{"event_id":"{id}","event_time":"{}","order_id":"ord-{}-{}","customer_id":"cust-{:05}","warehouse_id":"W{}","sku":"SKU-{:05}","quantity":{},"unit_price":{}.{:02},"status":"{status}","channel":"{}"}}"#,
            rfc3339(t),
            self.run,
            l.order_id,
            l.customer,
            l.warehouse + 1,
            l.sku,
            l.quantity,
            l.unit_cents / 100,
            l.unit_cents % 100,
            l.channel,
        );
        self.emit(StreamKind::Orders, t, json);
    }

    fn inventory(
        &mut self,
        t: i64,
        sku: usize,
        warehouse: usize,
        kind: &str,
        units: i64,
        opening: bool,
    ) {
        if units == 0 {
            return;
        }
        let cell = self.cell(warehouse, sku);
        if !opening {
            self.stock[cell] += units;
        }
        let id = self.event_id('i');
        let mut json = String::with_capacity(200);
        let _ = write!(
            json,
            r#"{{"event_id":"{id}","event_time":"{}","sku":"SKU-{:05}","warehouse_id":"W{}","kind":"{kind}","quantity":{units}"#,
            rfc3339(t),
            sku,
            warehouse + 1,
        );
        if kind == "receipt" {
            let cost = self.prices[sku] * 6 / 10;
            let _ = write!(json, r#","unit_cost":{}.{:02}"#, cost / 100, cost % 100);
        }
        json.push('}');
        self.emit(StreamKind::Inventory, t, json);

        if opening {
            return;
        }
        // Reorder when low; sometimes correct a count; sometimes rebalance stock.
        if self.stock[cell] < 25 && !self.on_order[cell] {
            self.on_order[cell] = true;
            let units = self.rng.random_range(100..300);
            let at = t + self.seconds(4.0 * 3600.0, 3.0 * 86_400.0);
            self.agenda.push(Reverse((
                at,
                0,
                0,
                Step::Receive {
                    warehouse,
                    sku,
                    units,
                },
            )));
        }
        let roll: f64 = self.rng.random();
        if kind == "sale" && roll < 0.01 {
            let delta = self.rng.random_range(-3..=3);
            self.inventory(t, sku, warehouse, "adjustment", delta, false);
        } else if kind == "receipt" && roll < 0.1 && self.cfg.warehouses > 1 {
            let other = (warehouse + 1) % self.cfg.warehouses;
            let units = (self.stock[cell] / 5).max(1);
            self.inventory(t, sku, warehouse, "transfer_out", -units, false);
            let at = t + self.seconds(3600.0, 86_400.0);
            self.agenda.push(Reverse((
                at,
                0,
                0,
                Step::TransferIn {
                    warehouse: other,
                    sku,
                    units,
                },
            )));
        }
    }

    fn emit(&mut self, stream: StreamKind, t: i64, json: String) {
        let ev = GeneratedEvent {
            stream,
            event_time_us: t,
            json,
        };
        if self.rng.random::<f64>() < self.cfg.late_fraction {
            let delay = self.seconds(30.0, 1800.0).max(1);
            self.late.push((t + delay, ev));
        } else {
            self.out.push(ev);
        }
    }

    fn release_late(&mut self) {
        let now = self.now_us;
        if self.late.iter().any(|(due, _)| *due <= now) {
            let (due, keep): (Vec<_>, Vec<_>) = self.late.drain(..).partition(|(d, _)| *d <= now);
            self.late = keep;
            self.out.extend(due.into_iter().map(|(_, e)| e));
        }
    }
}

fn rfc3339(us: i64) -> String {
    DateTime::from_timestamp_micros(us)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Format, decode};
    use quiver_engine::StreamSchema;

    #[test]
    fn events_are_valid_and_unique_and_some_are_late() {
        let mut g = Generator::new(GeneratorConfig {
            late_fraction: 0.05,
            lifecycle_speedup: 3600.0,
            ..GeneratorConfig::default()
        });
        let mut events = g.opening_stock();
        events.extend(g.next_events(20_000));
        let mut ids = std::collections::HashSet::new();
        let (mut orders, mut inventory) = (String::new(), String::new());
        let mut out_of_order = 0;
        let mut last = i64::MIN;
        for e in &events {
            assert!(ids.insert(e.json.clone()));
            if e.event_time_us < last {
                out_of_order += 1;
            }
            last = last.max(e.event_time_us);
            let target = match e.stream {
                StreamKind::Orders => &mut orders,
                StreamKind::Inventory => &mut inventory,
            };
            target.push_str(&e.json);
            target.push('\n');
        }
        assert!(out_of_order > 0, "late events exist");
        let o = decode(&StreamSchema::orders(), Format::Ndjson, orders.as_bytes()).unwrap();
        let i = decode(
            &StreamSchema::inventory(),
            Format::Ndjson,
            inventory.as_bytes(),
        )
        .unwrap();
        assert!(o.num_rows() > 5_000);
        assert!(i.num_rows() > 1_000);
        for s in [
            "\"paid\"",
            "\"shipped\"",
            "\"delivered\"",
            "\"cancelled\"",
            "\"created\"",
        ] {
            assert!(orders.contains(s), "{s} appears");
        }
        for k in ["\"sale\"", "\"receipt\""] {
            assert!(inventory.contains(k), "{k} appears");
        }
    }

    #[test]
    fn same_seed_same_events() {
        let start = Utc::now();
        let cfg = GeneratorConfig {
            start,
            ..GeneratorConfig::default()
        };
        let a: Vec<String> = Generator::new(cfg.clone())
            .next_events(500)
            .into_iter()
            .map(|e| e.json)
            .collect();
        let b: Vec<String> = Generator::new(cfg)
            .next_events(500)
            .into_iter()
            .map(|e| e.json)
            .collect();
        assert_eq!(a, b);
    }
}
