//! A view's current rows, by key, and the change sets that move them forward.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::common::Result;
use tracing::warn;

use super::codec::{Reader, Writer};
use super::tracked::{Footprint, Part, Stored, Tracked, alloc_bytes};
use super::zset::{Codec, Map, ZBatch, decode_batch, row_codec};

#[derive(Debug)]
struct Slot {
    row: Box<[u8]>,
    count: i64,
}

impl Stored for Slot {
    type Ctx = ();
    fn encode(&self, w: &mut Writer) {
        w.bytes(&self.row);
        w.i64(self.count);
    }
    fn decode(r: &mut Reader<'_>, (): &()) -> Result<Self> {
        Ok(Slot {
            row: r.boxed()?,
            count: r.i64()?,
        })
    }
}

impl Footprint for Slot {
    fn footprint(&self) -> usize {
        alloc_bytes(self.row.len())
    }
}

/// A key's old row and new row in one change, as far as it has them.
type LostAndGained<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);

/// What one batch of changes did to a view.
#[derive(Debug)]
pub(crate) struct Applied {
    /// Rows whose key is new or whose values changed (full rows).
    pub(crate) upserts: RecordBatch,
    /// Keys that left the view (key columns).
    pub(crate) deletes: RecordBatch,
    /// The rows the upserts replaced and the deletes removed, as they were (whole rows;
    /// a new key has none; empty for a view without a key).
    pub(crate) replaced: RecordBatch,
    /// The same change as weighted rows, for views that read this one.
    pub(crate) diff: ZBatch,
}

impl Applied {
    pub(crate) fn is_empty(&self) -> bool {
        self.upserts.num_rows() == 0 && self.deletes.num_rows() == 0
    }
}

/// Where a view's rows live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rows {
    /// Held here and written into checkpoints (views over a stream, left joins,
    /// recomputed views).
    Saved,
    /// Held here, and listed again from the operators' state on restore (a view
    /// without a key whose operators can list their output).
    Rebuilt,
    /// Not held at all: the operators' state is the rows (a keyed aggregate,
    /// `DISTINCT ON` or inner join). Changes are told from the weighted diff alone,
    /// and the rows are listed from the operators when asked for.
    Derived,
}

/// The rows of a view. With a key, one row per key; without one, the key is the whole
/// row and the count says how many times it occurs.
#[derive(Debug)]
pub(crate) struct Output {
    schema: SchemaRef,
    key_schema: SchemaRef,
    key_cols: Vec<usize>,
    keyed: bool,
    row_codec: Codec,
    key_codec: Codec,
    rows: Tracked<Slot>,
    /// The rows counted with their multiplicity, kept up to date by `apply`.
    total: usize,
    /// The approximate bytes the rows hold, kept up to date by `apply`.
    bytes: usize,
    /// Where the rows live. When the view's operators can list its rows from their own
    /// state ([`super::plan::Node::can_emit_all`]) checkpoints do not hold them, and
    /// with a key they are not held here either.
    mode: Rows,
}

/// What a row held under `key` costs: both allocations.
fn row_bytes(key: &[u8], row: &[u8]) -> usize {
    alloc_bytes(key.len()) + alloc_bytes(row.len())
}

fn slot_bytes(key: &[u8], slot: &Slot) -> usize {
    row_bytes(key, &slot.row)
}

impl Output {
    pub(crate) fn new(schema: SchemaRef, key: Option<Vec<usize>>, mode: Rows) -> Result<Self> {
        let keyed = key.is_some();
        debug_assert!(keyed || mode != Rows::Derived, "derived rows need a key");
        let key_cols = key.unwrap_or_else(|| (0..schema.fields().len()).collect());
        let key_schema = Arc::new(schema.project(&key_cols)?);
        Ok(Self {
            row_codec: row_codec(&schema)?,
            key_codec: row_codec(&key_schema)?,
            schema,
            key_schema,
            key_cols,
            keyed,
            rows: if mode == Rows::Saved {
                Tracked::default()
            } else {
                Tracked::untracked()
            },
            total: 0,
            bytes: 0,
            mode,
        })
    }

    pub(crate) fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    pub(crate) fn key_columns(&self) -> &[usize] {
        &self.key_cols
    }

    pub(crate) fn len(&self) -> usize {
        self.total
    }

    /// Approximate bytes the rows hold, with their table.
    pub(crate) fn state_bytes(&self) -> usize {
        self.bytes + self.rows.table_bytes()
    }

    pub(crate) fn mode(&self) -> Rows {
        self.mode
    }

    /// Counts `n` rows listed from the operators' state on restore, for a view whose
    /// rows are [`Rows::Derived`].
    pub(crate) fn restored(&mut self, n: usize) {
        debug_assert_eq!(self.mode, Rows::Derived);
        self.total += n;
    }

    fn key_of<'a>(&self, key: &'a [u8], row: &'a [u8]) -> &'a [u8] {
        // (`key` is empty for an aggregate without GROUP BY.)
        if self.keyed { key } else { row }
    }

    /// Applies weighted changes; returns what changed. The weighted diff is built only
    /// with `with_diff` (when other views read this one).
    pub(crate) fn apply(&mut self, diff: &ZBatch, with_diff: bool) -> Result<Applied> {
        let rows = self.row_codec.encode(diff.batch.columns())?;
        // An empty key (an aggregate without GROUP BY) is the same for every row.
        let keys = if self.keyed && !self.key_cols.is_empty() {
            Some(
                self.key_codec
                    .encode(diff.batch.project(&self.key_cols)?.columns())?,
            )
        } else {
            None
        };
        // Consolidate: the same row added and taken away in one batch is no change.
        let mut net: Map<&[u8], (usize, i64)> = Map::default();
        for (i, w) in diff.weights.iter().enumerate() {
            net.entry(rows.row(i).data()).or_insert((i, 0)).1 += w;
        }
        net.retain(|_, (_, w)| *w != 0);
        if self.mode == Rows::Derived {
            let keys = keys.as_ref();
            return self.apply_derived(
                &net,
                |i| keys.map_or(&[][..], |k| k.row(i).data()),
                with_diff,
            );
        }
        let mut before: Map<Box<[u8]>, Option<Box<[u8]>>> = Map::default();
        let (minus, plus): (Vec<_>, Vec<_>) = net.iter().partition(|(_, (_, w))| *w < 0);
        for (row, (i, w)) in minus {
            let key = self.key_of(keys.as_ref().map_or(&[][..], |k| k.row(*i).data()), row);
            let Some(slot) = self.rows.get_mut(key) else {
                warn!("a view change removed a row the view does not hold; ignored");
                continue;
            };
            if !before.contains_key(key) {
                before.insert(key.into(), Some(slot.row.clone()));
                self.total -= slot.count.max(0) as usize;
            }
            if &*slot.row != *row {
                warn!("a view change removed a row the view holds with other values; ignored");
                continue;
            }
            slot.count += w;
            if slot.count <= 0 {
                self.rows.remove(key);
            }
        }
        for (row, (i, w)) in plus {
            let key = self.key_of(keys.as_ref().map_or(&[][..], |k| k.row(*i).data()), row);
            match self.rows.get_mut(key) {
                Some(slot) => {
                    if !before.contains_key(key) {
                        before.insert(key.into(), Some(slot.row.clone()));
                        self.total -= slot.count.max(0) as usize;
                    }
                    if &*slot.row == *row {
                        slot.count += w;
                    } else {
                        warn!("two rows of a view share one key; the later one is kept");
                        slot.row = (*row).into();
                        slot.count = *w;
                    }
                }
                None => {
                    if !before.contains_key(key) {
                        before.insert(key.into(), None);
                    }
                    self.rows.insert(
                        key.into(),
                        Slot {
                            row: (*row).into(),
                            count: *w,
                        },
                    );
                }
            }
        }
        let mut upserts: Vec<&[u8]> = Vec::new();
        let mut deletes: Vec<&[u8]> = Vec::new();
        let mut replaced: Vec<&[u8]> = Vec::new();
        for (key, old) in &before {
            let new = self.rows.get_held(key);
            self.total += new.map_or(0, |s| s.count.max(0) as usize);
            self.bytes -= old.as_ref().map_or(0, |r| row_bytes(key, r));
            self.bytes += new.map_or(0, |s| slot_bytes(key, s));
            let changed = match new {
                Some(slot) if old.as_deref() != Some(&*slot.row) || !self.keyed => {
                    upserts.push(&slot.row);
                    true
                }
                None if old.is_some() => {
                    deletes.push(key);
                    true
                }
                _ => false,
            };
            if changed && self.keyed {
                replaced.extend(old.as_deref());
            }
        }
        debug_assert_eq!(
            self.bytes,
            self.rows
                .iter_in_memory()
                .map(|(k, s)| slot_bytes(k, s))
                .sum::<usize>(),
            "the kept byte count drifted"
        );
        debug_assert_eq!(
            self.total,
            self.rows
                .iter_in_memory()
                .map(|(_, s)| s.count.max(0) as usize)
                .sum::<usize>(),
            "the kept row count drifted"
        );
        self.applied([upserts, deletes, replaced], &net, with_diff)
    }

    /// [`Output::apply`] for rows that are not held: each key the diff touches loses
    /// its old row (weight -1) and gains its new one (weight +1), so a key with only a
    /// new row is added, one with only an old row is deleted, and one with both is
    /// updated. The same row taken away and added back was consolidated away already.
    fn apply_derived<'a>(
        &mut self,
        net: &Map<&'a [u8], (usize, i64)>,
        key_at: impl Fn(usize) -> &'a [u8],
        with_diff: bool,
    ) -> Result<Applied> {
        // Per key: the row it lost, and the row it gained.
        let mut by_key: Map<&[u8], LostAndGained<'_>> = Map::default();
        for (row, (i, w)) in net {
            let entry = by_key.entry(key_at(*i)).or_insert((None, None));
            let side = if *w < 0 { &mut entry.0 } else { &mut entry.1 };
            if side.replace(row).is_some() {
                warn!("two rows of a view share one key; the later one is kept");
            }
        }
        let mut upserts: Vec<&[u8]> = Vec::new();
        let mut deletes: Vec<&[u8]> = Vec::new();
        let mut replaced: Vec<&[u8]> = Vec::new();
        for (key, (lost, gained)) in by_key {
            match gained {
                Some(row) => {
                    upserts.push(row);
                    self.total += usize::from(lost.is_none());
                }
                None => {
                    deletes.push(key);
                    self.total = self.total.saturating_sub(1);
                }
            }
            replaced.extend(lost);
        }
        self.applied([upserts, deletes, replaced], net, with_diff)
    }

    /// Decodes what changed (upserted rows, deleted keys, replaced rows), and the
    /// weighted diff when `with_diff`.
    fn applied(
        &self,
        [upserts, deletes, replaced]: [Vec<&[u8]>; 3],
        net: &Map<&[u8], (usize, i64)>,
        with_diff: bool,
    ) -> Result<Applied> {
        let upserts = decode_batch(&self.row_codec, &self.schema, upserts)?;
        let deletes = decode_batch(&self.key_codec, &self.key_schema, deletes)?;
        let replaced = decode_batch(&self.row_codec, &self.schema, replaced)?;
        let mut changed: Vec<&[u8]> = Vec::new();
        let mut weights = Vec::new();
        if with_diff {
            for (row, (_, w)) in net {
                changed.push(row);
                weights.push(*w);
            }
        }
        let diff = ZBatch {
            batch: decode_batch(&self.row_codec, &self.schema, changed)?,
            weights,
        };
        Ok(Applied {
            upserts,
            deletes,
            replaced,
            diff,
        })
    }

    /// Every row (repeated by its count). Only for rows held here.
    pub(crate) fn snapshot(&self) -> Result<RecordBatch> {
        debug_assert_ne!(
            self.mode,
            Rows::Derived,
            "derived rows are listed by the operators"
        );
        let rows = self
            .rows
            .iter_in_memory()
            .flat_map(|(_, s)| std::iter::repeat_n(&*s.row, s.count.max(0) as usize));
        decode_batch(&self.row_codec, &self.schema, rows)
    }

    /// Replaces every row, `current` (as the view holds them now), by `batch`'s;
    /// returns the change.
    pub(crate) fn replace(
        &mut self,
        current: &RecordBatch,
        batch: &RecordBatch,
    ) -> Result<Applied> {
        let mut weights = vec![-1; current.num_rows()];
        weights.extend(std::iter::repeat_n(1, batch.num_rows()));
        let both = arrow::compute::concat_batches(&self.schema, [current, batch])?;
        self.apply(
            &ZBatch {
                batch: both,
                weights,
            },
            true,
        )
    }

    /// What a checkpoint holds of the rows: nothing when they are not saved.
    pub(crate) fn parts<'a>(&'a mut self, out: &mut Vec<Part<'a>>) {
        if self.mode == Rows::Saved {
            out.push(Part::Map(&mut self.rows));
        }
    }

    pub(crate) fn load(&mut self, r: &mut Reader<'_>, delta: bool) -> Result<()> {
        if self.mode != Rows::Saved {
            return Ok(());
        }
        self.rows.load(r, delta)?;
        self.total = self
            .rows
            .iter_in_memory()
            .map(|(_, s)| s.count.max(0) as usize)
            .sum();
        self.bytes = self
            .rows
            .iter_in_memory()
            .map(|(k, s)| slot_bytes(k, s))
            .sum();
        Ok(())
    }
}
