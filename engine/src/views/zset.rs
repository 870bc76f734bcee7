//! Changes as weighted rows, and the byte encoding rows are kept in.
//!
//! Every operator consumes and produces a [`ZBatch`]: a record batch whose rows each
//! carry a weight, +1 for a row that appears and −1 for one that goes away. An update is
//! the old row with −1 and the new row with +1. Filters and projections keep weights as
//! they are; stateful operators turn the changes of one micro-batch into the retraction
//! of the outputs they held and the insertion of the outputs they hold now.
//!
//! State is kept in Arrow's row format ([`Codec`]): compact, hashable, and ordered the
//! way SQL orders the values, so MIN, MAX and `DISTINCT ON` compare plain bytes.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, UInt32Array};
use arrow::compute::{concat_batches, filter_record_batch, take};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::row::{RowConverter, Rows, SortField};
use datafusion::common::Result;
use datafusion::physical_expr::PhysicalExpr;

/// The hash map of view state: keys are encoded rows, hashed with foldhash (several
/// times faster than SipHash on short byte strings, and still seeded per process).
pub(crate) type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Rows with weights.
#[derive(Debug, Clone)]
pub(crate) struct ZBatch {
    pub(crate) batch: RecordBatch,
    pub(crate) weights: Vec<i64>,
}

impl ZBatch {
    /// Every row of `batch` inserted once.
    pub(crate) fn inserts(batch: RecordBatch) -> Self {
        let weights = vec![1; batch.num_rows()];
        Self { batch, weights }
    }

    pub(crate) fn empty(schema: SchemaRef) -> Self {
        Self {
            batch: RecordBatch::new_empty(schema),
            weights: Vec::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.weights.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// Keeps the rows where `mask` is true.
    pub(crate) fn filter(&self, mask: &arrow::array::BooleanArray) -> Result<Self> {
        let batch = filter_record_batch(&self.batch, mask)?;
        let weights = self
            .weights
            .iter()
            .zip(mask.iter())
            .filter(|(_, keep)| keep.unwrap_or(false))
            .map(|(w, _)| *w)
            .collect();
        Ok(Self { batch, weights })
    }

    /// The rows as a plain batch of `schema`, each repeated by its weight (none for a
    /// weight below one): for a listing of whole state, where every weight is positive.
    pub(crate) fn into_rows(self, schema: &SchemaRef) -> Result<RecordBatch> {
        let columns = if self.weights.iter().all(|w| *w == 1) {
            self.batch.columns().to_vec()
        } else {
            let indices: Vec<Option<u32>> = self
                .weights
                .iter()
                .enumerate()
                .flat_map(|(i, w)| std::iter::repeat_n(Some(i as u32), (*w).max(0) as usize))
                .collect();
            take_optional(self.batch.columns(), &indices)?
        };
        if schema.fields().is_empty() {
            return Ok(RecordBatch::new_empty(Arc::clone(schema)));
        }
        Ok(RecordBatch::try_new(Arc::clone(schema), columns)?)
    }

    /// Joins several batches of one schema.
    pub(crate) fn concat(schema: &SchemaRef, parts: &[ZBatch]) -> Result<Self> {
        if parts.len() == 1 {
            return Ok(parts[0].clone());
        }
        let batch = concat_batches(schema, parts.iter().map(|p| &p.batch))?;
        let weights = parts
            .iter()
            .flat_map(|p| p.weights.iter().copied())
            .collect();
        Ok(Self { batch, weights })
    }
}

/// Evaluates expressions over a batch, each to a full column.
pub(crate) fn evaluate(
    exprs: &[Arc<dyn PhysicalExpr>],
    batch: &RecordBatch,
) -> Result<Vec<ArrayRef>> {
    exprs
        .iter()
        .map(|e| e.evaluate(batch)?.into_array(batch.num_rows()))
        .collect()
}

/// Encodes values of fixed types to bytes and back.
#[derive(Debug)]
pub(crate) struct Codec {
    converter: RowConverter,
}

impl Codec {
    pub(crate) fn new(types: impl IntoIterator<Item = DataType>) -> Result<Self> {
        Self::sorted(types.into_iter().map(SortField::new))
    }

    pub(crate) fn sorted(fields: impl IntoIterator<Item = SortField>) -> Result<Self> {
        Ok(Self {
            converter: RowConverter::new(fields.into_iter().collect())?,
        })
    }

    pub(crate) fn encode(&self, columns: &[ArrayRef]) -> Result<Rows> {
        Ok(self.converter.convert_columns(columns)?)
    }

    /// Decodes encoded rows (from [`Self::encode`]) back to columns.
    pub(crate) fn decode<'a>(
        &self,
        rows: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Vec<ArrayRef>> {
        let parser = self.converter.parser();
        let parsed: Vec<_> = rows.into_iter().map(|r| parser.parse(r)).collect();
        Ok(self.converter.convert_rows(parsed)?)
    }
}

/// Encodes whole rows of `schema`.
pub(crate) fn row_codec(schema: &SchemaRef) -> Result<Codec> {
    Codec::new(schema.fields().iter().map(|f| f.data_type().clone()))
}

/// Builds a batch of `schema` from encoded rows.
pub(crate) fn decode_batch<'a>(
    codec: &Codec,
    schema: &SchemaRef,
    rows: impl IntoIterator<Item = &'a [u8]>,
) -> Result<RecordBatch> {
    let columns = codec.decode(rows)?;
    if schema.fields().is_empty() {
        return Ok(RecordBatch::new_empty(Arc::clone(schema)));
    }
    Ok(RecordBatch::try_new(Arc::clone(schema), columns)?)
}

/// Picks columns by row index, with `None` giving a null.
pub(crate) fn take_optional(
    columns: &[ArrayRef],
    indices: &[Option<u32>],
) -> Result<Vec<ArrayRef>> {
    let idx = UInt32Array::from(indices.to_vec());
    columns
        .iter()
        .map(|c| Ok(take(c.as_ref(), &idx, None)?))
        .collect()
}
