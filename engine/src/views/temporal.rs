//! Temporal filters: conditions on the current time, such as
//! `WHERE event_time > now() - INTERVAL '7 days'`, maintained as time passes.
//!
//! Such a condition holds for a row during one span of time: from the instant it
//! starts to hold (`event_time <= now()` starts at `event_time`) until the instant it
//! stops (`event_time > now() - INTERVAL '7 days'` stops at `event_time + 7 days`). The
//! operator computes both instants per row when the row arrives. A row inside its span
//! passes at once; a row whose span has not begun waits; a row whose span is over is
//! dropped. The rows that will start or stop holding are kept in time order, and as
//! the clock moves ([`CLOCK`] ticks) they enter (+1) or leave (−1) as ordinary changes,
//! so the views above see insertions and retractions like any others.
//!
//! Rows whose span never ends and has begun are not kept: nothing will happen to them.
//!
//! Over a `DISTINCT ON` (one row per key, which it keeps) only the key and the span are
//! kept, and a row is read back from it by key when its time comes: the rows are not
//! held twice. Nor are the spans checkpointed: they follow from the rows, and are
//! computed again from them on restore ([`Temporal::rebuild`]).

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::common::{DataFusionError, Result};
use datafusion::physical_expr::PhysicalExpr;

use super::codec::{Reader, Writer};
use super::tracked::{Footprint, Part, Stored, Tracked, alloc_bytes, sampled};
use super::zset::{Codec, Map, ZBatch, decode_batch};

/// The name of the clock as a source: its change is one row, the time now in
/// microseconds since the epoch. Not a valid stream or view name.
pub(crate) const CLOCK: &str = "\u{1}clock";

/// A tick of the clock, as the change of [`CLOCK`].
pub(crate) fn clock_delta(now_us: i64) -> ZBatch {
    let schema = Arc::new(Schema::new(vec![Field::new("now", DataType::Int64, false)]));
    let batch = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![now_us]))])
        .unwrap_or_else(|_| unreachable!("one Int64 column of one row"));
    ZBatch::inserts(batch)
}

/// The time a [`clock_delta`] carries.
pub(crate) fn clock_time(d: &ZBatch) -> Option<i64> {
    let col = d
        .batch
        .columns()
        .first()?
        .as_primitive_opt::<arrow::datatypes::Int64Type>()?;
    (col.len() == 1).then(|| col.value(0))
}

/// Encoded bytes of a row.
type Bytes = Box<[u8]>;

/// A kept row's span and weight. `from` is past for a row that has entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    from: i64,
    until: i64,
    weight: i64,
}

impl Stored for Span {
    type Ctx = ();
    fn encode(&self, w: &mut Writer) {
        w.i64(self.from);
        w.i64(self.until);
        w.i64(self.weight);
    }
    fn decode(r: &mut Reader<'_>, (): &()) -> Result<Self> {
        Ok(Span {
            from: r.i64()?,
            until: r.i64()?,
            weight: r.i64()?,
        })
    }
}

impl Footprint for Span {
    fn footprint(&self) -> usize {
        0
    }
}

/// One bound of a row's span, as an expression over the row giving an instant.
#[derive(Debug)]
pub(crate) struct Bound {
    /// Evaluates to a timestamp or an integer count of microseconds.
    pub(crate) expr: Arc<dyn PhysicalExpr>,
    /// Microseconds added to the value (one to make a strict comparison inclusive).
    pub(crate) offset: i64,
}

/// A temporal filter over one input.
#[derive(Debug)]
pub(crate) struct Temporal {
    /// Instants the row starts holding at (inclusive); the latest applies.
    from: Vec<Bound>,
    /// Instants the row stops holding at (exclusive); the earliest applies.
    until: Vec<Bound>,
    /// Rows not to be kept past their span: evaluates to true where a row holds
    /// forever regardless of the time (`status <> 'delivered' OR …`).
    always: Option<Arc<dyn PhysicalExpr>>,
    codec: Codec,
    schema: SchemaRef,
    /// The time of the last tick, in microseconds.
    now: i64,
    rows: Tracked<Span>,
    /// (instant of the row's next change, row), in time order.
    due: BTreeSet<(i64, Bytes)>,
    /// Rows that left, or arrived after their span: what is below may forget them.
    gone: Vec<Bytes>,
    /// Set over an operator with one row per key: `rows` and `due` are by key.
    keyed: Option<Keyed>,
}

/// The key of the rows, when the operator below holds one row per key.
#[derive(Debug)]
struct Keyed {
    columns: Vec<usize>,
    codec: Codec,
}

/// Reads the rows the operator below holds for keys (given as key columns), encoded as
/// this operator encodes rows; `None` for a key it does not hold.
pub(crate) type Lookup<'a> = dyn FnMut(&[ArrayRef]) -> Result<Vec<Option<Bytes>>> + 'a;

impl Temporal {
    pub(crate) fn new(
        from: Vec<Bound>,
        until: Vec<Bound>,
        always: Option<Arc<dyn PhysicalExpr>>,
        schema: SchemaRef,
    ) -> Result<Self> {
        Ok(Self {
            codec: super::zset::row_codec(&schema)?,
            from,
            until,
            always,
            schema,
            now: i64::MIN,
            rows: Tracked::default(),
            due: BTreeSet::new(),
            gone: Vec::new(),
            keyed: None,
        })
    }

    /// Keeps keys rather than rows: the operator below holds one row per key (in
    /// `key_columns`) and gives it back by key.
    pub(crate) fn by_key(mut self, key_columns: Vec<usize>) -> Result<Self> {
        let types = key_columns
            .iter()
            .map(|&i| self.schema.field(i).data_type().clone());
        self.keyed = Some(Keyed {
            codec: Codec::new(types)?,
            columns: key_columns,
        });
        self.rows = Tracked::untracked();
        Ok(self)
    }

    /// Rows waiting to enter or to leave.
    pub(crate) fn kept(&self) -> usize {
        self.rows.len()
    }

    /// Evaluates bounds to microseconds, combined with `pick` (None: a null, the row
    /// never holds).
    fn instants(
        bounds: &[Bound],
        batch: &RecordBatch,
        init: i64,
        pick: fn(i64, i64) -> i64,
    ) -> Result<Vec<Option<i64>>> {
        let mut out = vec![Some(init); batch.num_rows()];
        for b in bounds {
            let values = b.expr.evaluate(batch)?.into_array(batch.num_rows())?;
            let micros = to_micros(&values)?;
            for (o, v) in out.iter_mut().zip(micros.iter()) {
                *o = match (*o, v) {
                    (Some(o), Some(v)) => Some(pick(o, v.saturating_add(b.offset))),
                    _ => None,
                };
            }
        }
        Ok(out)
    }

    /// Each row's span: (from, until), or None where the condition is null.
    fn spans(&self, batch: &RecordBatch) -> Result<Vec<Option<(i64, i64)>>> {
        let from = Self::instants(&self.from, batch, i64::MIN, i64::max)?;
        let until = Self::instants(&self.until, batch, i64::MAX, i64::min)?;
        let always = match &self.always {
            Some(e) => Some(
                e.evaluate(batch)?
                    .into_array(batch.num_rows())?
                    .as_boolean_opt()
                    .cloned()
                    .ok_or_else(|| {
                        DataFusionError::Internal("a temporal filter's OR was not boolean".into())
                    })?,
            ),
            None => None,
        };
        Ok((0..batch.num_rows())
            .map(|i| {
                if always.as_ref().is_some_and(|a| a.is_valid(i) && a.value(i)) {
                    return Some((i64::MIN, i64::MAX));
                }
                Some((from[i]?, until[i]?))
            })
            .collect())
    }

    /// Adds `weight` of `row` with `span` to what is kept for its next change at `at`.
    fn keep(&mut self, row: Bytes, span: (i64, i64), weight: i64, at: i64) {
        let total = match self.rows.get_mut(&row) {
            Some(s) => {
                s.weight += weight;
                s.weight
            }
            None => {
                self.rows.insert(
                    row.clone(),
                    Span {
                        from: span.0,
                        until: span.1,
                        weight,
                    },
                );
                self.due.insert((at, row.clone()));
                weight
            }
        };
        if total == 0 {
            self.rows.remove(&row);
            self.due.remove(&(at, row));
        }
    }

    /// Passes the rows of `input` whose span holds now, keeps those that will change.
    pub(crate) fn apply(&mut self, input: &ZBatch) -> Result<ZBatch> {
        if input.is_empty() {
            return Ok(input.clone());
        }
        if self.keyed.is_some() {
            return self.apply_keyed(input);
        }
        let spans = self.spans(&input.batch)?;
        let now = self.now;
        let mut pass = Vec::with_capacity(input.len());
        // Encoded only when some row must be kept or forgotten.
        let mut encoded = None;
        for (i, span) in spans.iter().enumerate() {
            let w = input.weights[i];
            let Some((from, until)) = *span else {
                pass.push(false);
                continue;
            };
            let holds = from <= now && now < until;
            pass.push(holds);
            if holds && until == i64::MAX {
                continue;
            }
            let rows = match &encoded {
                Some(r) => r,
                None => encoded.insert(self.codec.encode(input.batch.columns())?),
            };
            let row: Bytes = rows.row(i).as_ref().into();
            if until <= now {
                self.gone.push(row);
            } else if from > now {
                self.keep(row, (from, until), w, from);
            } else {
                self.keep(row, (from, until), w, until);
            }
        }
        input.filter(&BooleanArray::from(pass))
    }

    /// [`Temporal::apply`] by key: a batch from the operator below retracts at most a
    /// key's old row and inserts its new one, so what is kept for a key follows its
    /// last row in the batch.
    fn apply_keyed(&mut self, input: &ZBatch) -> Result<ZBatch> {
        let spans = self.spans(&input.batch)?;
        let Some(keyed) = &self.keyed else {
            return Ok(input.clone());
        };
        let key_columns: Vec<ArrayRef> = keyed
            .columns
            .iter()
            .map(|&i| Arc::clone(input.batch.column(i)))
            .collect();
        let keys = keyed.codec.encode(&key_columns)?;
        let now = self.now;
        let mut pass = Vec::with_capacity(input.len());
        // Per key, the span of its row inserted in this batch (None: only retracted).
        let mut last: Map<Bytes, Option<(i64, i64)>> = Map::default();
        for (i, span) in spans.iter().enumerate() {
            let holds = span.is_some_and(|(f, u)| f <= now && now < u);
            pass.push(holds);
            let key: Bytes = keys.row(i).as_ref().into();
            if input.weights[i] > 0 {
                last.insert(key, *span);
            } else {
                last.entry(key).or_insert(None);
            }
        }
        let mut gone_keys = Vec::new();
        for (key, span) in last {
            if let Some(old) = self.rows.remove(&key) {
                let at = if old.from > now { old.from } else { old.until };
                self.due.remove(&(at, key.clone()));
            }
            let Some((from, until)) = span else { continue };
            if until <= now {
                gone_keys.push(key);
            } else {
                self.keep_key(key, from, until);
            }
        }
        if !gone_keys.is_empty() {
            // The rows to forget below are those of the batch with these keys.
            let gone: std::collections::HashSet<&[u8]> = gone_keys.iter().map(|k| &**k).collect();
            let rows = self.codec.encode(input.batch.columns())?;
            for i in 0..input.len() {
                if input.weights[i] > 0 && gone.contains(keys.row(i).as_ref()) {
                    self.gone.push(rows.row(i).as_ref().into());
                }
            }
        }
        input.filter(&BooleanArray::from(pass))
    }

    /// Moves the clock to `now_us`: rows whose span began enter, rows whose span ended
    /// leave. Over an operator with one row per key, `lookup` reads the rows.
    pub(crate) fn advance(
        &mut self,
        now_us: i64,
        lookup: &mut Lookup<'_>,
    ) -> Result<Option<ZBatch>> {
        if now_us <= self.now {
            return Ok(None);
        }
        if self.keyed.is_some() {
            return self.advance_keyed(now_us, lookup);
        }
        let before = self.now;
        self.now = now_us;
        let mut out: Map<Bytes, i64> = Map::default();
        while let Some((at, _)) = self.due.first() {
            if *at > now_us {
                break;
            }
            let Some((at, row)) = self.due.pop_first() else {
                break;
            };
            let Some(span) = self.rows.get(&row).map(|s| *s) else {
                continue;
            };
            if at == span.from && span.from > before {
                // Entering; and leaving too if its span is already over.
                if span.until > now_us {
                    *out.entry(row.clone()).or_default() += span.weight;
                    if span.until == i64::MAX {
                        self.rows.remove(&row);
                    } else {
                        self.due.insert((span.until, row));
                    }
                } else {
                    self.rows.remove(&row);
                    self.gone.push(row);
                }
            } else {
                *out.entry(row.clone()).or_default() -= span.weight;
                self.rows.remove(&row);
                self.gone.push(row);
            }
        }
        out.retain(|_, w| *w != 0);
        if out.is_empty() {
            return Ok(None);
        }
        let weights = out.values().copied().collect();
        let batch = decode_batch(&self.codec, &self.schema, out.keys().map(|r| &**r))?;
        Ok(Some(ZBatch { batch, weights }))
    }

    /// [`Temporal::advance`] by key: the keys due are read back from below.
    fn advance_keyed(&mut self, now_us: i64, lookup: &mut Lookup<'_>) -> Result<Option<ZBatch>> {
        let before = self.now;
        self.now = now_us;
        let mut due: Vec<(Bytes, i64)> = Vec::new();
        while self.due.first().is_some_and(|(at, _)| *at <= now_us) {
            let Some((at, key)) = self.due.pop_first() else {
                break;
            };
            let Some(span) = self.rows.get(&key).map(|s| *s) else {
                continue;
            };
            if at == span.from && span.from > before && span.until > now_us {
                // Entering now.
                if span.until == i64::MAX {
                    self.rows.remove(&key);
                } else {
                    self.due.insert((span.until, key.clone()));
                }
                due.push((key, 1));
            } else {
                // Leaving, or entering and leaving between two ticks (nothing to show).
                self.rows.remove(&key);
                due.push((
                    key,
                    if at == span.from && span.from > before {
                        0
                    } else {
                        -1
                    },
                ));
            }
        }
        if due.is_empty() {
            return Ok(None);
        }
        let Some(keyed) = &self.keyed else {
            return Ok(None);
        };
        let key_columns = keyed.codec.decode(due.iter().map(|(k, _)| &**k))?;
        let rows = lookup(&key_columns)?;
        let mut out_rows: Vec<Bytes> = Vec::new();
        let mut weights = Vec::new();
        for ((_, w), row) in due.into_iter().zip(rows) {
            let Some(row) = row else { continue };
            if w <= 0 {
                self.gone.push(row.clone());
            }
            if w != 0 {
                out_rows.push(row);
                weights.push(w);
            }
        }
        if out_rows.is_empty() {
            return Ok(None);
        }
        let batch = decode_batch(&self.codec, &self.schema, out_rows.iter().map(|r| &**r))?;
        Ok(Some(ZBatch { batch, weights }))
    }

    /// The rows of `d` (whole state listed from below) that hold now.
    pub(crate) fn holding(&self, d: ZBatch) -> Result<ZBatch> {
        let spans = self.spans(&d.batch)?;
        let now = self.now;
        let mask: BooleanArray = spans
            .iter()
            .map(|s| Some(s.is_some_and(|(f, u)| f <= now && now < u)))
            .collect();
        d.filter(&mask)
    }

    /// Takes the rows that left or arrived after their span, decoded, for the operator
    /// below to forget.
    pub(crate) fn take_gone(&mut self) -> Result<Option<RecordBatch>> {
        if self.gone.is_empty() {
            return Ok(None);
        }
        let gone = std::mem::take(&mut self.gone);
        Ok(Some(decode_batch(
            &self.codec,
            &self.schema,
            gone.iter().map(|r| &**r),
        )?))
    }

    pub(crate) fn parts<'a>(&'a mut self, out: &mut Vec<Part<'a>>) {
        out.push(Part::Bytes(self.now.to_le_bytes().to_vec()));
        // Keyed, the spans are rebuilt from the rows below on restore.
        if self.keyed.is_none() {
            out.push(Part::Map(&mut self.rows));
        }
    }

    pub(crate) fn load(&mut self, r: &mut Reader<'_>, delta: bool) -> Result<()> {
        self.now = r.i64()?;
        if self.keyed.is_some() {
            return Ok(());
        }
        self.rows.load(r, delta)?;
        let now = self.now;
        self.due = self
            .rows
            .iter_in_memory()
            .map(|(row, s)| (if s.from > now { s.from } else { s.until }, row.clone()))
            .collect();
        Ok(())
    }

    /// Keyed: what is kept, computed again from `rows`, the whole state of the operator
    /// below (in chunks), after a restore.
    pub(crate) fn rebuild(&mut self, rows: &ZBatch) -> Result<()> {
        if self.keyed.is_none() {
            return Ok(());
        }
        // As if they arrived now; rows past their span are kept due at once, so the
        // next tick takes them out.
        let spans = self.spans(&rows.batch)?;
        let Some(keyed) = &self.keyed else {
            return Ok(());
        };
        let key_columns: Vec<ArrayRef> = keyed
            .columns
            .iter()
            .map(|&i| Arc::clone(rows.batch.column(i)))
            .collect();
        let keys = keyed.codec.encode(&key_columns)?;
        for (i, span) in spans.into_iter().enumerate() {
            let Some((from, until)) = span else { continue };
            self.keep_key(keys.row(i).as_ref().into(), from, until);
        }
        Ok(())
    }

    /// Keyed: keeps `key`'s span if anything will happen to it (a row that holds for
    /// good is not kept). Rows past their span are due at once.
    fn keep_key(&mut self, key: Bytes, from: i64, until: i64) {
        let now = self.now;
        if from <= now && until == i64::MAX {
            return;
        }
        let at = if from > now { from } else { until };
        self.rows.insert(
            key.clone(),
            Span {
                from,
                until,
                weight: 1,
            },
        );
        self.due.insert((at, key));
    }

    /// Whether the kept state is rebuilt from below after a restore.
    pub(crate) fn rebuilds(&self) -> bool {
        self.keyed.is_some()
    }

    /// Approximate bytes held. Weighed every 100 ms, so it costs at most `WEIGHED`
    /// entries per set, not the state's size (ten million due keys took about a
    /// second to add up, and starved the maintainer).
    pub(crate) fn state_bytes(&self) -> usize {
        let rows = if self.keyed.is_some() {
            self.rows.table_bytes()
                + sampled(
                    self.rows
                        .iter_in_memory()
                        .map(|(k, _)| alloc_bytes(k.len())),
                    self.rows.len(),
                )
        } else {
            self.rows.footprint()
        };
        rows + sampled(
            self.due.iter().map(|(_, r)| alloc_bytes(r.len()) + 48),
            self.due.len(),
        )
    }

    /// The earliest instant something kept changes, in microseconds.
    pub(crate) fn next_due(&self) -> Option<i64> {
        self.due.first().map(|(t, _)| *t)
    }
}

/// Microseconds since the epoch from a timestamp column (any unit) or an integer one.
fn to_micros(values: &ArrayRef) -> Result<Int64Array> {
    let target = match values.data_type() {
        DataType::Timestamp(_, tz) => DataType::Timestamp(TimeUnit::Microsecond, tz.clone()),
        DataType::Date32 | DataType::Date64 => DataType::Timestamp(TimeUnit::Microsecond, None),
        DataType::Int64 => DataType::Int64,
        other => {
            return Err(DataFusionError::Plan(format!(
                "a temporal filter compares {other} with now(); it needs a timestamp"
            )));
        }
    };
    let micros = arrow::compute::cast(values, &target)?;
    let micros = arrow::compute::cast(&micros, &DataType::Int64)?;
    Ok(micros.as_primitive::<arrow::datatypes::Int64Type>().clone())
}

#[cfg(test)]
mod tests {
    use arrow::array::TimestampMicrosecondArray;
    use datafusion::physical_expr::expressions::Column;

    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new(
                "t",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
        ]))
    }

    fn rows(items: &[(i64, Option<i64>)], weight: i64) -> ZBatch {
        let ids: Vec<i64> = items.iter().map(|(i, _)| *i).collect();
        let ts: Vec<Option<i64>> = items.iter().map(|(_, t)| *t).collect();
        let batch = RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(Int64Array::from(ids)),
                Arc::new(TimestampMicrosecondArray::from(ts).with_timezone("UTC")),
            ],
        )
        .unwrap();
        ZBatch {
            weights: vec![weight; batch.num_rows()],
            batch,
        }
    }

    fn no_lookup(_: &[ArrayRef]) -> Result<Vec<Option<Bytes>>> {
        unreachable!("rows are kept whole here")
    }

    fn ids(d: &ZBatch) -> Vec<(i64, i64)> {
        let a = d
            .batch
            .column(0)
            .as_primitive::<arrow::datatypes::Int64Type>();
        let mut v: Vec<(i64, i64)> = (0..d.len()).map(|i| (a.value(i), d.weights[i])).collect();
        v.sort_unstable();
        v
    }

    /// `t > now() - 100 AND t <= now()`: a row holds from `t` until `t + 100`.
    fn window() -> Temporal {
        let t: Arc<dyn PhysicalExpr> = Arc::new(Column::new("t", 1));
        Temporal::new(
            vec![Bound {
                expr: Arc::clone(&t),
                offset: 0,
            }],
            vec![Bound {
                expr: t,
                offset: 100,
            }],
            None,
            schema(),
        )
        .unwrap()
    }

    #[test]
    fn rows_enter_at_their_time_and_leave_when_they_age_out() {
        let mut op = window();
        assert!(op.advance(1000, &mut no_lookup).unwrap().is_none());
        // Current, future, too old and null rows.
        let out = op
            .apply(&rows(
                &[(1, Some(950)), (2, Some(1050)), (3, Some(850)), (4, None)],
                1,
            ))
            .unwrap();
        assert_eq!(ids(&out), vec![(1, 1)]);
        assert_eq!(op.kept(), 2);
        assert_eq!(op.next_due(), Some(1050));
        // Row 1 leaves at 1050 (exclusive), row 2 enters then.
        assert_eq!(
            ids(&op
                .advance(1049, &mut no_lookup)
                .unwrap()
                .unwrap_or_else(|| rows(&[], 1))),
            vec![]
        );
        assert_eq!(
            ids(&op.advance(1050, &mut no_lookup).unwrap().unwrap()),
            vec![(1, -1), (2, 1)]
        );
        // The old row 3 may be forgotten below, and row 1 now too.
        let gone = op.take_gone().unwrap().unwrap();
        assert_eq!(gone.num_rows(), 2);
        // A retraction of row 2 while it holds passes and is no longer kept.
        let out = op.apply(&rows(&[(2, Some(1050))], -1)).unwrap();
        assert_eq!(ids(&out), vec![(2, -1)]);
        assert_eq!(op.kept(), 0);
        assert!(op.advance(5000, &mut no_lookup).unwrap().is_none());
    }

    #[test]
    fn a_row_that_enters_and_leaves_between_ticks_never_shows_and_state_survives_a_checkpoint() {
        let mut op = window();
        op.advance(1000, &mut no_lookup).unwrap();
        op.apply(&rows(&[(1, Some(1010)), (2, Some(1500))], 1))
            .unwrap();
        // A checkpoint and restore keep what is due.
        let mut w = Writer::default();
        let mut parts = Vec::new();
        op.parts(&mut parts);
        crate::views::tracked::save_all(parts, &mut w);
        let mut restored = window();
        restored.load(&mut Reader::new(&w.buf), false).unwrap();
        assert_eq!(restored.kept(), 2);
        assert_eq!(restored.next_due(), Some(1010));
        // Row 1's span (1010..1110) passed entirely before the next tick.
        let out = restored.advance(1200, &mut no_lookup).unwrap();
        assert!(out.is_none(), "{out:?}");
        assert_eq!(
            ids(&restored.advance(1500, &mut no_lookup).unwrap().unwrap()),
            vec![(2, 1)]
        );
        assert_eq!(
            ids(&restored.advance(1600, &mut no_lookup).unwrap().unwrap()),
            vec![(2, -1)]
        );
    }
}
