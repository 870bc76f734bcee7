//! The stateful operators besides GROUP BY: latest row per key, and equi-joins.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch};
use arrow::datatypes::SchemaRef;
use datafusion::common::{DataFusionError, Result};
use datafusion::physical_expr::PhysicalExpr;

use super::codec::{Reader, Writer};
use super::tracked::{Footprint, Part, Spillable, Stored, Tracked, alloc_bytes, table_bytes};

/// A sort position and a row, as `DISTINCT ON` keeps per key.
impl Footprint for (Bytes, Bytes) {
    fn footprint(&self) -> usize {
        alloc_bytes(self.0.len()) + alloc_bytes(self.1.len())
    }
}

impl Stored for (Bytes, Bytes) {
    type Ctx = ();
    fn encode(&self, w: &mut Writer) {
        w.bytes(&self.0);
        w.bytes(&self.1);
    }
    fn decode(r: &mut Reader<'_>, (): &()) -> Result<Self> {
        Ok((r.boxed()?, r.boxed()?))
    }
}

/// A join side's rows (with counts) under one join key.
impl Footprint for Map<Bytes, i64> {
    fn footprint(&self) -> usize {
        table_bytes::<(Bytes, i64)>(self.capacity())
            + self.keys().map(|r| alloc_bytes(r.len())).sum::<usize>()
    }
}

impl Stored for Map<Bytes, i64> {
    type Ctx = ();
    fn encode(&self, w: &mut Writer) {
        w.u64(self.len() as u64);
        for (r, c) in self {
            w.bytes(r);
            w.i64(*c);
        }
    }
    fn decode(r: &mut Reader<'_>, (): &()) -> Result<Self> {
        let mut rows = Map::default();
        for _ in 0..r.u64()? {
            let row = r.boxed()?;
            rows.insert(row, r.i64()?);
        }
        Ok(rows)
    }
}
use super::zset::{Codec, Map, ZBatch, decode_batch, evaluate, take_optional};

/// Encoded bytes: a key, a sort position or a row.
type Bytes = Box<[u8]>;
/// A join output row: the left row and the right one (none: no match, left join).
type Pair = (Bytes, Option<Bytes>);

/// `SELECT DISTINCT ON (key) … ORDER BY key, order…`: per key, the row that sorts
/// first; among rows that sort equal, the one that arrived last.
#[derive(Debug)]
pub(crate) struct DistinctOn {
    pub(crate) on: Vec<Arc<dyn PhysicalExpr>>,
    key_codec: Codec,
    pub(crate) order: Vec<Arc<dyn PhysicalExpr>>,
    order_codec: Codec,
    pub(crate) select: Vec<Arc<dyn PhysicalExpr>>,
    row_codec: Codec,
    schema: SchemaRef,
    /// Key → (sort position, output row).
    latest: Tracked<(Bytes, Bytes)>,
}

impl DistinctOn {
    pub(crate) fn new(
        on: Vec<Arc<dyn PhysicalExpr>>,
        key_codec: Codec,
        order: Vec<Arc<dyn PhysicalExpr>>,
        order_codec: Codec,
        select: Vec<Arc<dyn PhysicalExpr>>,
        schema: SchemaRef,
    ) -> Result<Self> {
        Ok(Self {
            row_codec: super::zset::row_codec(&schema)?,
            on,
            key_codec,
            order,
            order_codec,
            select,
            schema,
            latest: Tracked::default(),
        })
    }

    /// Forgets the latest rows of the keys in `key_columns` (a temporal filter above
    /// let them go for good).
    pub(crate) fn forget(&mut self, key_columns: &[ArrayRef]) -> Result<()> {
        let keys = self.key_codec.encode(key_columns)?;
        for key in keys.iter() {
            self.latest.remove(key.as_ref());
        }
        Ok(())
    }

    /// The latest row of each key in `key_columns`, encoded as whole output rows.
    pub(crate) fn rows_by_key(&self, key_columns: &[ArrayRef]) -> Result<Vec<Option<Bytes>>> {
        let keys = self.key_codec.encode(key_columns)?;
        Ok(keys
            .iter()
            .map(|k| self.latest.get(k.as_ref()).map(|v| v.1.clone()))
            .collect())
    }

    pub(crate) fn keys(&self) -> usize {
        self.latest.len()
    }

    pub(crate) fn apply(&mut self, input: &ZBatch) -> Result<ZBatch> {
        if input.weights.iter().any(|w| *w != 1) {
            return Err(DataFusionError::Internal(
                "DISTINCT ON is maintained over insert-only inputs".into(),
            ));
        }
        let batch = &input.batch;
        let keys = self.key_codec.encode(&evaluate(&self.on, batch)?)?;
        let orders = if self.order.is_empty() {
            None
        } else {
            Some(self.order_codec.encode(&evaluate(&self.order, batch)?)?)
        };
        let rows = self.row_codec.encode(&evaluate(&self.select, batch)?)?;
        // Key → the row it had before this batch (None: it had none).
        let mut before: Map<Box<[u8]>, Option<Box<[u8]>>> = Map::default();
        for i in 0..batch.num_rows() {
            let key = keys.row(i);
            let key = key.data();
            let order: &[u8] = orders.as_ref().map_or(&[], |o| o.row(i).data());
            let row = rows.row(i);
            match self.latest.get_mut(key) {
                Some((cur_order, cur_row)) => {
                    // Equal sort positions: the later arrival wins.
                    if order <= &**cur_order {
                        if !before.contains_key(key) {
                            before.insert(key.into(), Some(cur_row.clone()));
                        }
                        *cur_order = order.into();
                        *cur_row = row.data().into();
                    }
                }
                None => {
                    before.insert(key.into(), None);
                    self.latest
                        .insert(key.into(), (order.into(), row.data().into()));
                }
            }
        }
        let mut out: Vec<&[u8]> = Vec::new();
        let mut weights = Vec::new();
        for (key, old) in &before {
            // Every key of the batch was brought into memory above.
            let new = self.latest.get_held(key).map(|(_, r)| &**r);
            if old.as_deref() == new {
                continue;
            }
            if let Some(o) = old {
                out.push(o);
                weights.push(-1);
            }
            if let Some(n) = new {
                out.push(n);
                weights.push(1);
            }
        }
        let batch = decode_batch(&self.row_codec, &self.schema, out)?;
        Ok(ZBatch { batch, weights })
    }

    /// Every row it holds, as inserts, in batches of at most `chunk` rows.
    pub(crate) fn emit_all(
        &self,
        chunk: usize,
        f: &mut dyn FnMut(ZBatch) -> Result<()>,
    ) -> Result<()> {
        let mut part: Vec<Bytes> = Vec::new();
        let mut send = |part: &mut Vec<Bytes>| -> Result<()> {
            let batch = decode_batch(&self.row_codec, &self.schema, part.iter().map(|r| &**r))?;
            part.clear();
            f(ZBatch::inserts(batch))
        };
        self.latest.for_each(|_, (_, row)| {
            part.push(row.clone());
            if part.len() >= chunk.max(1) {
                send(&mut part)?;
            }
            Ok(())
        })?;
        if !part.is_empty() {
            send(&mut part)?;
        }
        Ok(())
    }

    pub(crate) fn parts<'a>(&'a mut self, out: &mut Vec<Part<'a>>) {
        out.push(Part::Map(&mut self.latest));
    }

    pub(crate) fn load(&mut self, r: &mut Reader<'_>, delta: bool) -> Result<()> {
        self.latest.load(r, delta)
    }

    pub(crate) fn maps(&mut self) -> Vec<&mut dyn Spillable> {
        vec![&mut self.latest]
    }

    pub(crate) fn disk_bytes(&self) -> usize {
        self.latest.disk_bytes()
    }

    pub(crate) fn state_bytes(&self) -> usize {
        self.latest.footprint()
    }
}

/// Which rows an equi-join keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JoinKind {
    Inner,
    Left,
}

/// One side of a join: rows (with their counts) by join key.
#[derive(Debug)]
struct Side {
    keys: Vec<Arc<dyn PhysicalExpr>>,
    codec: Codec,
    rows: Tracked<Map<Bytes, i64>>,
}

impl Side {
    fn load(&mut self, r: &mut Reader<'_>, delta: bool) -> Result<()> {
        self.rows.load(r, delta)
    }

    fn state_bytes(&self) -> usize {
        self.rows.footprint()
    }
}

/// An inner or left equi-join. For each join key a batch touches, the output pairs it
/// had are retracted and the pairs it has now inserted (equal ones cancel).
#[derive(Debug)]
pub(crate) struct Join {
    pub(crate) kind: JoinKind,
    key_codec: Codec,
    left: Side,
    right: Side,
    schema: SchemaRef,
}

impl Join {
    pub(crate) fn new(
        kind: JoinKind,
        key_types: Vec<arrow::datatypes::DataType>,
        left_keys: Vec<Arc<dyn PhysicalExpr>>,
        right_keys: Vec<Arc<dyn PhysicalExpr>>,
        left_schema: &SchemaRef,
        right_schema: &SchemaRef,
        schema: SchemaRef,
    ) -> Result<Self> {
        Ok(Self {
            kind,
            key_codec: Codec::new(key_types)?,
            left: Side {
                keys: left_keys,
                codec: super::zset::row_codec(left_schema)?,
                rows: Tracked::default(),
            },
            right: Side {
                keys: right_keys,
                codec: super::zset::row_codec(right_schema)?,
                rows: Tracked::default(),
            },
            schema,
        })
    }

    pub(crate) fn pairs(&self) -> usize {
        let mut pairs = 0;
        for side in [&self.left, &self.right] {
            // Only a broken spill file fails, and that stops the process.
            let _ = side.rows.for_each(|_, rows| {
                pairs += rows.len();
                Ok(())
            });
        }
        pairs
    }

    /// The output of one join key: (left row, right row or none, count).
    fn output(&self, key: &[u8]) -> Map<Pair, i64> {
        let mut out = Map::default();
        let Some(left) = self.left.rows.get(key) else {
            return out;
        };
        let right = self.right.rows.get(key).filter(|r| !r.is_empty());
        for (l, lc) in left.iter() {
            match &right {
                Some(right) => {
                    for (r, rc) in right.iter() {
                        *out.entry((l.clone(), Some(r.clone()))).or_insert(0) += lc * rc;
                    }
                }
                None if self.kind == JoinKind::Left => {
                    *out.entry((l.clone(), None)).or_insert(0) += lc;
                }
                None => {}
            }
        }
        out
    }

    /// Applies changes to one side; `left` tells which.
    pub(crate) fn apply(&mut self, delta: &ZBatch, left: bool) -> Result<ZBatch> {
        let side = if left { &self.left } else { &self.right };
        let key_cols = evaluate(&side.keys, &delta.batch)?;
        let keys = self.key_codec.encode(&key_cols)?;
        let rows = side.codec.encode(delta.batch.columns())?;
        let null_key = |i: usize| key_cols.iter().any(|c| c.is_null(i));
        // Pairs with a NULL join key never match; a left row still appears, alone.
        let mut direct: Vec<(Bytes, Option<Bytes>, i64)> = Vec::new();
        let mut by_key: Map<Box<[u8]>, Vec<usize>> = Map::default();
        for i in 0..delta.len() {
            if null_key(i) {
                if left && self.kind == JoinKind::Left {
                    direct.push((rows.row(i).data().into(), None, delta.weights[i]));
                }
                continue;
            }
            by_key.entry(keys.row(i).data().into()).or_default().push(i);
        }
        let mut changes: Map<Pair, i64> = Map::default();
        for (key, idx) in &by_key {
            for (pair, c) in self.output(key) {
                *changes.entry(pair).or_insert(0) -= c;
            }
            let side = if left {
                &mut self.left
            } else {
                &mut self.right
            };
            if !side.rows.contains_key(key) {
                side.rows.insert(key.clone(), Map::default());
            }
            let Some(entry) = side.rows.get_mut(key) else {
                continue;
            };
            for &i in idx {
                let row = rows.row(i);
                let row = row.data();
                match entry.get_mut(row) {
                    Some(c) => {
                        *c += delta.weights[i];
                        if *c == 0 {
                            entry.remove(row);
                        }
                    }
                    None => {
                        entry.insert(row.into(), delta.weights[i]);
                    }
                }
            }
            if entry.is_empty() {
                side.rows.remove(key);
            }
            for (pair, c) in self.output(key) {
                *changes.entry(pair).or_insert(0) += c;
            }
        }
        for (l, r, w) in direct {
            *changes.entry((l, r)).or_insert(0) += w;
        }
        changes.retain(|_, w| *w != 0);
        self.build(changes)
    }

    /// Every output pair with its count, in batches of about `chunk` pairs. Only an
    /// inner join can: a left join's rows with a NULL key are not kept.
    pub(crate) fn emit_all(
        &self,
        chunk: usize,
        f: &mut dyn FnMut(ZBatch) -> Result<()>,
    ) -> Result<()> {
        if !self.can_emit_all() {
            return Err(DataFusionError::Internal(
                "only an inner join can list its output from its state".into(),
            ));
        }
        let mut pairs: Map<Pair, i64> = Map::default();
        self.left.rows.for_each(|key, _| {
            for (pair, c) in self.output(key) {
                *pairs.entry(pair).or_insert(0) += c;
            }
            if pairs.len() >= chunk {
                pairs.retain(|_, c| *c != 0);
                f(self.build(std::mem::take(&mut pairs))?)?;
            }
            Ok(())
        })?;
        pairs.retain(|_, c| *c != 0);
        if !pairs.is_empty() {
            f(self.build(pairs)?)?;
        }
        Ok(())
    }

    /// Whether [`Join::emit_all`] can list the output.
    pub(crate) fn can_emit_all(&self) -> bool {
        self.kind == JoinKind::Inner
    }

    fn build(&self, changes: Map<Pair, i64>) -> Result<ZBatch> {
        let mut lefts: Vec<&[u8]> = Vec::with_capacity(changes.len());
        let mut rights: Vec<&[u8]> = Vec::new();
        let mut right_idx: Vec<Option<u32>> = Vec::with_capacity(changes.len());
        let mut weights = Vec::with_capacity(changes.len());
        for ((l, r), w) in &changes {
            lefts.push(l);
            right_idx.push(r.as_ref().map(|r| {
                rights.push(r);
                (rights.len() - 1) as u32
            }));
            weights.push(*w);
        }
        let mut columns: Vec<ArrayRef> = self.left.codec.decode(lefts)?;
        let right_cols = self.right.codec.decode(rights)?;
        columns.extend(take_optional(&right_cols, &right_idx)?);
        debug_assert_eq!(columns.len(), self.schema.fields().len());
        Ok(ZBatch {
            batch: RecordBatch::try_new(Arc::clone(&self.schema), columns)?,
            weights,
        })
    }

    pub(crate) fn parts<'a>(&'a mut self, out: &mut Vec<Part<'a>>) {
        out.push(Part::Map(&mut self.left.rows));
        out.push(Part::Map(&mut self.right.rows));
    }

    pub(crate) fn load(&mut self, r: &mut Reader<'_>, delta: bool) -> Result<()> {
        self.left.load(r, delta)?;
        self.right.load(r, delta)
    }

    pub(crate) fn maps(&mut self) -> Vec<&mut dyn Spillable> {
        vec![&mut self.left.rows, &mut self.right.rows]
    }

    pub(crate) fn disk_bytes(&self) -> usize {
        self.left.rows.disk_bytes() + self.right.rows.disk_bytes()
    }

    pub(crate) fn state_bytes(&self) -> usize {
        self.left.state_bytes() + self.right.state_bytes()
    }
}
