//! GROUP BY, maintained per changed group.
//!
//! Each group keeps, per aggregate, exactly what it needs to take a row out again:
//! sums with the count of values behind them, MIN and MAX as a counted set of values
//! (a single value when the input only ever grows), COUNT(DISTINCT) as a counted set.
//! A micro-batch touches some groups; for each, the output row it had before the batch
//! is retracted and the row it has after is inserted, or nothing when they are equal.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Decimal128Array, Float64Array, Int64Array, RecordBatch,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Decimal128Type, Float64Type, Int64Type, SchemaRef};
use datafusion::common::{DataFusionError, Result};
use datafusion::physical_expr::PhysicalExpr;

use super::codec::{Reader, Writer};
use super::tracked::{Footprint, Part, Spillable, Stored, Tracked, alloc_bytes, table_bytes};
use super::zset::{Codec, Map, ZBatch, evaluate};

/// What an aggregate computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum AggKind {
    Count,
    CountDistinct,
    Sum(Num),
    Avg(Num),
    Min,
    Max,
}

/// The arithmetic of a SUM or AVG argument.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Num {
    Int,
    Float,
    Decimal,
}

impl Num {
    /// The arithmetic for an argument type, if Quiver maintains sums of it.
    pub(crate) fn of(t: &DataType) -> Option<Self> {
        match t {
            DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => Some(Self::Int),
            DataType::Float32 | DataType::Float64 => Some(Self::Float),
            DataType::Decimal128(_, _) => Some(Self::Decimal),
            _ => None,
        }
    }
}

/// One aggregate of the node.
#[derive(Debug)]
pub(crate) struct AggSpec {
    pub(crate) kind: AggKind,
    pub(crate) arg: Arc<dyn PhysicalExpr>,
    /// Output type, as the SQL planner typed it.
    pub(crate) out: DataType,
    /// Encodes argument values (MIN, MAX, COUNT DISTINCT).
    codec: Option<Codec>,
    /// Scale factor from the sum's scale to the output's (decimal AVG).
    avg_mul: i128,
}

impl AggSpec {
    pub(crate) fn new(
        kind: AggKind,
        arg: Arc<dyn PhysicalExpr>,
        arg_type: &DataType,
        out: DataType,
    ) -> Result<Self> {
        let codec = match kind {
            AggKind::Min | AggKind::Max | AggKind::CountDistinct => {
                Some(Codec::new([arg_type.clone()])?)
            }
            _ => None,
        };
        let avg_mul = match (kind, arg_type, &out) {
            (
                AggKind::Avg(Num::Decimal),
                DataType::Decimal128(_, s),
                DataType::Decimal128(_, t),
            ) if t >= s => 10i128.pow((t - s) as u32),
            (AggKind::Avg(Num::Decimal), _, _) => {
                return Err(DataFusionError::Plan(format!(
                    "AVG from {arg_type} to {out} is not maintained"
                )));
            }
            _ => 1,
        };
        Ok(Self {
            kind,
            arg,
            out,
            codec,
            avg_mul,
        })
    }
}

/// The running state of one aggregate in one group.
#[derive(Debug, Clone)]
enum Acc {
    Count(i64),
    SumInt {
        sum: i64,
        n: i64,
    },
    SumFloat {
        sum: f64,
        n: i64,
    },
    SumDec {
        sum: i128,
        n: i64,
    },
    /// MIN or MAX over an input that only grows.
    Extreme(Option<Box<[u8]>>),
    /// MIN or MAX over an input with retractions: every value with its count.
    Values(BTreeMap<Box<[u8]>, i64>),
    /// COUNT(DISTINCT): every value with its count.
    Distinct(Map<Box<[u8]>, i64>),
}

/// One output value, comparable between before and after a batch.
#[derive(Debug, Clone)]
enum Cell {
    Int(Option<i64>),
    Float(Option<f64>),
    Dec(Option<i128>),
    Bytes(Option<Box<[u8]>>),
}

impl PartialEq for Cell {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Int(a), Self::Int(b)) => a == b,
            (Self::Float(a), Self::Float(b)) => a.map(f64::to_bits) == b.map(f64::to_bits),
            (Self::Dec(a), Self::Dec(b)) => a == b,
            (Self::Bytes(a), Self::Bytes(b)) => a == b,
            _ => false,
        }
    }
}

/// One group's output values.
type Row = Vec<Cell>;

#[derive(Debug)]
struct Group {
    rows: i64,
    epoch: u64,
    accs: Vec<Acc>,
}

impl Stored for Group {
    /// The accumulators of a new group, which a stored one's values fill.
    type Ctx = Vec<Acc>;

    fn encode(&self, w: &mut Writer) {
        w.i64(self.rows);
        for acc in &self.accs {
            save_acc(w, acc);
        }
    }

    fn decode(r: &mut Reader<'_>, fresh: &Vec<Acc>) -> Result<Self> {
        let rows = r.i64()?;
        let mut accs = fresh.clone();
        for acc in &mut accs {
            load_acc(r, acc)?;
        }
        Ok(Group {
            rows,
            epoch: 0,
            accs,
        })
    }
}

/// Argument values of one aggregate over one batch.
enum Arg {
    Int(Int64Array),
    Float(Float64Array),
    Dec(Decimal128Array),
    Encoded(arrow::row::Rows, ArrayRef),
}

impl Arg {
    fn is_valid(&self, i: usize) -> bool {
        match self {
            Self::Int(a) => a.is_valid(i),
            Self::Float(a) => a.is_valid(i),
            Self::Dec(a) => a.is_valid(i),
            Self::Encoded(_, a) => a.is_valid(i),
        }
    }
}

/// The accumulators of a group no row has reached yet.
fn fresh_accs(specs: &[AggSpec], append_only: bool) -> Vec<Acc> {
    specs
        .iter()
        .map(|s| match s.kind {
            AggKind::Count => Acc::Count(0),
            AggKind::CountDistinct => Acc::Distinct(Map::default()),
            AggKind::Sum(Num::Int) | AggKind::Avg(Num::Int) => Acc::SumInt { sum: 0, n: 0 },
            AggKind::Sum(Num::Float) | AggKind::Avg(Num::Float) => Acc::SumFloat { sum: 0.0, n: 0 },
            AggKind::Sum(Num::Decimal) | AggKind::Avg(Num::Decimal) => Acc::SumDec { sum: 0, n: 0 },
            AggKind::Min | AggKind::Max if append_only => Acc::Extreme(None),
            AggKind::Min | AggKind::Max => Acc::Values(BTreeMap::new()),
        })
        .collect()
}

/// A GROUP BY node's state.
#[derive(Debug)]
pub(crate) struct Aggregate {
    pub(crate) group_exprs: Vec<Arc<dyn PhysicalExpr>>,
    group_codec: Codec,
    pub(crate) specs: Vec<AggSpec>,
    groups: Tracked<Group>,
    /// No GROUP BY: one row, always present.
    scalar: bool,
    /// The input never retracts, so MIN and MAX keep one value.
    append_only: bool,
    epoch: u64,
    schema: SchemaRef,
}

impl Aggregate {
    pub(crate) fn new(
        group_exprs: Vec<Arc<dyn PhysicalExpr>>,
        group_types: Vec<DataType>,
        specs: Vec<AggSpec>,
        append_only: bool,
        schema: SchemaRef,
    ) -> Result<Self> {
        Ok(Self {
            scalar: group_exprs.is_empty(),
            group_codec: Codec::new(group_types)?,
            group_exprs,
            groups: Tracked::with_ctx(fresh_accs(&specs, append_only)),
            specs,
            append_only,
            epoch: 0,
            schema,
        })
    }

    /// Forgets the groups in `group_columns` (a temporal filter above let them go for
    /// good).
    pub(crate) fn forget(&mut self, group_columns: &[ArrayRef]) -> Result<()> {
        if self.scalar || group_columns.is_empty() {
            return Ok(());
        }
        let keys = self.group_codec.encode(group_columns)?;
        for key in keys.iter() {
            self.groups.remove(key.as_ref());
        }
        Ok(())
    }

    pub(crate) fn groups(&self) -> usize {
        self.groups.len()
    }

    fn fresh_accs(&self) -> Vec<Acc> {
        fresh_accs(&self.specs, self.append_only)
    }

    fn args(&self, batch: &RecordBatch) -> Result<Vec<Arg>> {
        let n = batch.num_rows();
        self.specs
            .iter()
            .map(|s| {
                let values = s.arg.evaluate(batch)?.into_array(n)?;
                Ok(match (&s.codec, s.kind) {
                    (Some(codec), _) => Arg::Encoded(codec.encode(&[Arc::clone(&values)])?, values),
                    (None, AggKind::Sum(Num::Float) | AggKind::Avg(Num::Float)) => Arg::Float(
                        cast(&values, &DataType::Float64)?
                            .as_primitive::<Float64Type>()
                            .clone(),
                    ),
                    (None, AggKind::Sum(Num::Decimal) | AggKind::Avg(Num::Decimal)) => {
                        Arg::Dec(values.as_primitive::<Decimal128Type>().clone())
                    }
                    _ => Arg::Int(
                        cast(&values, &DataType::Int64)?
                            .as_primitive::<Int64Type>()
                            .clone(),
                    ),
                })
            })
            .collect()
    }

    /// Applies a batch of changes; returns the changes of the output rows.
    pub(crate) fn apply(&mut self, input: &ZBatch) -> Result<ZBatch> {
        self.epoch += 1;
        let epoch = self.epoch;
        let batch = &input.batch;
        let keys = if self.scalar {
            None
        } else {
            Some(
                self.group_codec
                    .encode(&evaluate(&self.group_exprs, batch)?)?,
            )
        };
        let args = self.args(batch)?;
        // Each group the batch touches, with its output before the batch.
        let mut touched: Vec<(Box<[u8]>, Option<Row>)> = Vec::new();
        if self.scalar && self.groups.is_empty() {
            self.groups.insert(
                Box::default(),
                Group {
                    rows: 0,
                    epoch,
                    accs: self.fresh_accs(),
                },
            );
            touched.push((Box::default(), None));
        }
        for (i, &w) in input.weights.iter().enumerate() {
            let key: &[u8] = keys.as_ref().map_or(&[], |k| k.row(i).data());
            let created = if self.groups.contains_key(key) {
                false
            } else {
                let accs = self.fresh_accs();
                self.groups.insert(
                    key.into(),
                    Group {
                        rows: 0,
                        epoch: 0,
                        accs,
                    },
                );
                true
            };
            let Some(group) = self.groups.get_mut(key) else {
                continue;
            };
            if group.epoch != epoch {
                group.epoch = epoch;
                let old = (!created).then(|| cells(&self.specs, group));
                touched.push((key.into(), old));
            }
            group.rows += w;
            for ((spec, acc), arg) in self.specs.iter().zip(&mut group.accs).zip(&args) {
                update(spec.kind, acc, arg, i, w)?;
            }
        }
        let mut out_keys: Vec<&[u8]> = Vec::new();
        let mut out_cells: Vec<Vec<Cell>> = Vec::new();
        let mut weights = Vec::new();
        let mut removed = Vec::new();
        for (key, old) in &touched {
            // Every group of the batch was brought into memory above.
            let Some(group) = self.groups.get_held(key) else {
                continue;
            };
            if group.rows < 0 {
                return Err(DataFusionError::Internal(
                    "a group received more retractions than rows".into(),
                ));
            }
            let new = if group.rows == 0 && !self.scalar {
                removed.push(key);
                None
            } else {
                Some(cells(&self.specs, group))
            };
            if *old == new {
                continue;
            }
            if let Some(o) = old {
                out_keys.push(key);
                out_cells.push(o.clone());
                weights.push(-1);
            }
            if let Some(n) = new {
                out_keys.push(key);
                out_cells.push(n);
                weights.push(1);
            }
        }
        let batch = self.build(&out_keys, &out_cells)?;
        for key in removed {
            self.groups.remove(key);
        }
        Ok(ZBatch { batch, weights })
    }

    fn build(&self, keys: &[&[u8]], rows: &[Vec<Cell>]) -> Result<RecordBatch> {
        let mut columns: Vec<ArrayRef> = if self.scalar {
            Vec::new()
        } else {
            self.group_codec.decode(keys.iter().copied())?
        };
        for (j, spec) in self.specs.iter().enumerate() {
            let col = rows.iter().map(|r| &r[j]);
            let array: ArrayRef = match &spec.out {
                DataType::Int64
                    if matches!(
                        spec.kind,
                        AggKind::Count | AggKind::CountDistinct | AggKind::Sum(_)
                    ) =>
                {
                    Arc::new(Int64Array::from_iter(col.map(|c| match c {
                        Cell::Int(v) => *v,
                        _ => None,
                    })))
                }
                DataType::Float64 if !matches!(spec.kind, AggKind::Min | AggKind::Max) => {
                    Arc::new(Float64Array::from_iter(col.map(|c| match c {
                        Cell::Float(v) => *v,
                        _ => None,
                    })))
                }
                DataType::Decimal128(p, s) if !matches!(spec.kind, AggKind::Min | AggKind::Max) => {
                    Arc::new(
                        Decimal128Array::from_iter(col.map(|c| match c {
                            Cell::Dec(v) => *v,
                            _ => None,
                        }))
                        .with_precision_and_scale(*p, *s)?,
                    )
                }
                _ => {
                    let codec = spec.codec.as_ref().ok_or_else(|| {
                        DataFusionError::Internal(format!("no encoding for {:?}", spec.kind))
                    })?;
                    extremes(codec, &spec.out, col)?
                }
            };
            columns.push(array);
        }
        if columns.is_empty() {
            return Ok(RecordBatch::new_empty(Arc::clone(&self.schema)));
        }
        Ok(RecordBatch::try_new(Arc::clone(&self.schema), columns)?)
    }

    /// Every group's output row, as inserts, in batches of at most `chunk` rows.
    pub(crate) fn emit_all(
        &self,
        chunk: usize,
        f: &mut dyn FnMut(ZBatch) -> Result<()>,
    ) -> Result<()> {
        let mut keys: Vec<Box<[u8]>> = Vec::new();
        let mut rows: Vec<Vec<Cell>> = Vec::new();
        self.groups.for_each(|key, group| {
            if group.rows == 0 && !self.scalar {
                return Ok(());
            }
            keys.push(key.into());
            rows.push(cells(&self.specs, group));
            if keys.len() >= chunk {
                let refs: Vec<&[u8]> = keys.iter().map(|k| &**k).collect();
                f(ZBatch::inserts(self.build(&refs, &rows)?))?;
                keys.clear();
                rows.clear();
            }
            Ok(())
        })?;
        if !keys.is_empty() {
            let refs: Vec<&[u8]> = keys.iter().map(|k| &**k).collect();
            f(ZBatch::inserts(self.build(&refs, &rows)?))?;
        }
        Ok(())
    }

    pub(crate) fn parts<'a>(&'a mut self, out: &mut Vec<Part<'a>>) {
        out.push(Part::Map(&mut self.groups));
    }

    pub(crate) fn load(&mut self, r: &mut Reader<'_>, delta: bool) -> Result<()> {
        self.groups.load(r, delta)
    }

    pub(crate) fn maps(&mut self) -> Vec<&mut dyn Spillable> {
        vec![&mut self.groups]
    }

    pub(crate) fn disk_bytes(&self) -> usize {
        self.groups.disk_bytes()
    }

    /// Approximate bytes held.
    pub(crate) fn state_bytes(&self) -> usize {
        self.groups.footprint()
    }
}

impl Footprint for Group {
    fn footprint(&self) -> usize {
        alloc_bytes(self.accs.len() * std::mem::size_of::<Acc>())
            + self
                .accs
                .iter()
                .map(|a| match a {
                    Acc::Extreme(v) => v.as_ref().map_or(0, |b| alloc_bytes(b.len())),
                    // A B-tree entry: the key's allocation and its share of a node
                    // (about two thirds full).
                    Acc::Values(m) => m.keys().map(|k| alloc_bytes(k.len()) + 36).sum(),
                    Acc::Distinct(m) => {
                        table_bytes::<(Box<[u8]>, i64)>(m.capacity())
                            + m.keys().map(|k| alloc_bytes(k.len())).sum::<usize>()
                    }
                    _ => 0,
                })
                .sum::<usize>()
    }
}

/// Builds a MIN or MAX column from encoded values; absent values are nulls.
fn extremes<'a>(
    codec: &Codec,
    out: &DataType,
    cells: impl Iterator<Item = &'a Cell>,
) -> Result<ArrayRef> {
    let cells: Vec<Option<&[u8]>> = cells
        .map(|c| match c {
            Cell::Bytes(v) => v.as_deref(),
            _ => None,
        })
        .collect();
    let present: Vec<&[u8]> = cells.iter().flatten().copied().collect();
    let decoded = codec.decode(present)?;
    let values = decoded
        .into_iter()
        .next()
        .unwrap_or_else(|| arrow::array::new_empty_array(out));
    let mut next = 0u32;
    let indices: Vec<Option<u32>> = cells
        .iter()
        .map(|c| {
            c.map(|_| {
                next += 1;
                next - 1
            })
        })
        .collect();
    Ok(super::zset::take_optional(&[values], &indices)?.remove(0))
}

fn cells(specs: &[AggSpec], group: &Group) -> Vec<Cell> {
    specs
        .iter()
        .zip(&group.accs)
        .map(|(spec, acc)| match (spec.kind, acc) {
            (AggKind::Count, Acc::Count(n)) => Cell::Int(Some(*n)),
            (AggKind::CountDistinct, Acc::Distinct(m)) => Cell::Int(Some(m.len() as i64)),
            (AggKind::Sum(_), Acc::SumInt { sum, n }) => Cell::Int((*n > 0).then_some(*sum)),
            (AggKind::Sum(_), Acc::SumFloat { sum, n }) => Cell::Float((*n > 0).then_some(*sum)),
            (AggKind::Sum(_), Acc::SumDec { sum, n }) => Cell::Dec((*n > 0).then_some(*sum)),
            (AggKind::Avg(_), Acc::SumInt { sum, n }) => {
                Cell::Float((*n > 0).then(|| *sum as f64 / *n as f64))
            }
            (AggKind::Avg(_), Acc::SumFloat { sum, n }) => {
                Cell::Float((*n > 0).then(|| *sum / *n as f64))
            }
            (AggKind::Avg(_), Acc::SumDec { sum, n }) => {
                Cell::Dec((*n > 0).then(|| sum.wrapping_mul(spec.avg_mul) / *n as i128))
            }
            (_, Acc::Extreme(v)) => Cell::Bytes(v.clone()),
            (AggKind::Min, Acc::Values(m)) => Cell::Bytes(m.keys().next().cloned()),
            (_, Acc::Values(m)) => Cell::Bytes(m.keys().next_back().cloned()),
            _ => Cell::Int(None),
        })
        .collect()
}

fn update(kind: AggKind, acc: &mut Acc, arg: &Arg, i: usize, w: i64) -> Result<()> {
    if !arg.is_valid(i) {
        return Ok(());
    }
    match (acc, arg) {
        (Acc::Count(n), _) => *n += w,
        (Acc::SumInt { sum, n }, Arg::Int(a)) => {
            *sum = sum.wrapping_add(a.value(i).wrapping_mul(w));
            *n += w;
        }
        (Acc::SumFloat { sum, n }, Arg::Float(a)) => {
            *sum += a.value(i) * w as f64;
            *n += w;
            if *n == 0 {
                *sum = 0.0;
            }
        }
        (Acc::SumDec { sum, n }, Arg::Dec(a)) => {
            *sum = sum.wrapping_add(a.value(i).wrapping_mul(w as i128));
            *n += w;
        }
        (Acc::Extreme(cur), Arg::Encoded(rows, _)) => {
            if w < 0 {
                return Err(DataFusionError::Internal(
                    "a retraction reached an insert-only MIN/MAX".into(),
                ));
            }
            let v = rows.row(i);
            let v = v.data();
            let better = match cur.as_deref() {
                None => true,
                Some(c) if kind == AggKind::Min => v < c,
                Some(c) => v > c,
            };
            if better {
                *cur = Some(v.into());
            }
        }
        (Acc::Values(m), Arg::Encoded(rows, _)) => {
            let v = rows.row(i);
            bump(m, v.data(), w);
        }
        (Acc::Distinct(m), Arg::Encoded(rows, _)) => {
            let v = rows.row(i);
            bump(m, v.data(), w);
        }
        _ => {
            return Err(DataFusionError::Internal(format!(
                "aggregate {kind:?} got an argument of the wrong kind"
            )));
        }
    }
    Ok(())
}

/// A counted set of values, ordered (MIN/MAX) or hashed (COUNT DISTINCT).
trait Counts {
    fn get_mut(&mut self, v: &[u8]) -> Option<&mut i64>;
    fn insert(&mut self, v: Box<[u8]>, w: i64);
    fn remove(&mut self, v: &[u8]);
}

impl Counts for BTreeMap<Box<[u8]>, i64> {
    fn get_mut(&mut self, v: &[u8]) -> Option<&mut i64> {
        BTreeMap::get_mut(self, v)
    }
    fn insert(&mut self, v: Box<[u8]>, w: i64) {
        BTreeMap::insert(self, v, w);
    }
    fn remove(&mut self, v: &[u8]) {
        BTreeMap::remove(self, v);
    }
}

impl Counts for Map<Box<[u8]>, i64> {
    fn get_mut(&mut self, v: &[u8]) -> Option<&mut i64> {
        std::collections::HashMap::get_mut(self, v)
    }
    fn insert(&mut self, v: Box<[u8]>, w: i64) {
        std::collections::HashMap::insert(self, v, w);
    }
    fn remove(&mut self, v: &[u8]) {
        std::collections::HashMap::remove(self, v);
    }
}

/// Adds `w` to the count of `v`; a value whose count reaches zero leaves the set.
fn bump(m: &mut impl Counts, v: &[u8], w: i64) {
    match m.get_mut(v) {
        Some(c) => {
            *c += w;
            if *c == 0 {
                m.remove(v);
            }
        }
        None => {
            m.insert(v.into(), w);
        }
    }
}

fn save_acc(w: &mut Writer, acc: &Acc) {
    match acc {
        Acc::Count(n) => w.i64(*n),
        Acc::SumInt { sum, n } => {
            w.i64(*sum);
            w.i64(*n);
        }
        Acc::SumFloat { sum, n } => {
            w.f64(*sum);
            w.i64(*n);
        }
        Acc::SumDec { sum, n } => {
            w.i128(*sum);
            w.i64(*n);
        }
        Acc::Extreme(v) => match v {
            Some(b) => {
                w.u64(1);
                w.bytes(b);
            }
            None => w.u64(0),
        },
        Acc::Values(m) => save_counts(w, m.len(), m.iter()),
        Acc::Distinct(m) => save_counts(w, m.len(), m.iter()),
    }
}

fn load_acc(r: &mut Reader<'_>, acc: &mut Acc) -> Result<()> {
    match acc {
        Acc::Count(n) => *n = r.i64()?,
        Acc::SumInt { sum, n } => {
            *sum = r.i64()?;
            *n = r.i64()?;
        }
        Acc::SumFloat { sum, n } => {
            *sum = r.f64()?;
            *n = r.i64()?;
        }
        Acc::SumDec { sum, n } => {
            *sum = r.i128()?;
            *n = r.i64()?;
        }
        Acc::Extreme(v) => {
            *v = if r.u64()? == 1 {
                Some(r.boxed()?)
            } else {
                None
            };
        }
        Acc::Values(m) => m.extend(load_counts(r)?),
        Acc::Distinct(m) => m.extend(load_counts(r)?),
    }
    Ok(())
}

/// Writes counted values.
fn save_counts<'a>(
    w: &mut Writer,
    n: usize,
    values: impl Iterator<Item = (&'a Box<[u8]>, &'a i64)>,
) {
    w.u64(n as u64);
    for (k, c) in values {
        w.bytes(k);
        w.i64(*c);
    }
}

/// Reads what [`save_counts`] wrote.
fn load_counts(r: &mut Reader<'_>) -> Result<Vec<(Box<[u8]>, i64)>> {
    (0..r.u64()?).map(|_| Ok((r.boxed()?, r.i64()?))).collect()
}
