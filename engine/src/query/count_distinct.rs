//! `COUNT(DISTINCT text)` per group in one hash set for all groups.
//!
//! DataFusion 55 counts distinct text values per group with one set object per group,
//! fed row by row through its adapter for plain accumulators. Over many groups
//! (`hourly_sales_by_sku` over thousands of SKUs, `revenue_per_minute`'s distinct
//! orders per minute) that was most of the query. [`QuiverCount`] is DataFusion's
//! `count` with one change: in a GROUP BY, `COUNT(DISTINCT x)` over text uses
//! [`TextDistinctCount`], which numbers each distinct text once and keeps the pairs
//! (group, text number) it has seen in one set of `u64`. Its state between the partial
//! and final aggregation is DataFusion's (a list of the group's distinct values), so
//! either side may be DataFusion's own accumulator.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, ListArray, UInt32Array,
};
use datafusion::arrow::buffer::OffsetBuffer;
use datafusion::arrow::compute::take;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Schema};
use datafusion::common::{Result, ScalarValue, internal_err};
use datafusion::functions_aggregate::count::count_udaf;
use datafusion::logical_expr::expr::AggregateFunctionParams;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::AggregateOrderSensitivity;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Documentation, EmitTo, GroupsAccumulator,
    ReversedUDAF, SetMonotonicity, Signature, StatisticsArgs,
};
use datafusion::physical_plan::aggregates::group_values::{GroupValues, new_group_values};
use datafusion::physical_plan::aggregates::order::GroupOrdering;

type Hasher = foldhash::fast::RandomState;

/// DataFusion's `count`, with [`TextDistinctCount`] for `COUNT(DISTINCT text)`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct QuiverCount {
    inner: Arc<AggregateUDF>,
}

impl QuiverCount {
    pub(crate) fn udaf() -> AggregateUDF {
        AggregateUDF::new_from_impl(Self {
            inner: count_udaf(),
        })
    }

    fn ours(args: &AccumulatorArgs) -> Option<DataType> {
        let [field] = args.expr_fields else {
            return None;
        };
        let text = matches!(
            field.data_type(),
            DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8
        );
        (args.is_distinct && text).then(|| field.data_type().clone())
    }
}

impl AggregateUDFImpl for QuiverCount {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn is_nullable(&self) -> bool {
        self.inner.is_nullable()
    }

    fn schema_name(&self, params: &AggregateFunctionParams) -> Result<String> {
        self.inner.inner().schema_name(params)
    }

    fn display_name(&self, params: &AggregateFunctionParams) -> Result<String> {
        self.inner.inner().display_name(params)
    }

    fn human_display(&self, params: &AggregateFunctionParams) -> Result<String> {
        self.inner.inner().human_display(params)
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        self.inner.state_fields(args)
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        self.inner.accumulator(args)
    }

    fn groups_accumulator_supported(&self, args: AccumulatorArgs) -> bool {
        Self::ours(&args).is_some() || self.inner.groups_accumulator_supported(args)
    }

    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        match Self::ours(&args) {
            Some(data_type) => Ok(Box::new(TextDistinctCount::new(data_type)?)),
            None => self.inner.create_groups_accumulator(args),
        }
    }

    fn create_sliding_accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        self.inner.create_sliding_accumulator(args)
    }

    fn order_sensitivity(&self) -> AggregateOrderSensitivity {
        self.inner.inner().order_sensitivity()
    }

    fn reverse_expr(&self) -> ReversedUDAF {
        self.inner.reverse_udf()
    }

    fn value_from_stats(&self, args: &StatisticsArgs) -> Option<ScalarValue> {
        self.inner.value_from_stats(args)
    }

    fn default_value(&self, data_type: &DataType) -> Result<ScalarValue> {
        self.inner.default_value(data_type)
    }

    fn set_monotonicity(&self, data_type: &DataType) -> SetMonotonicity {
        self.inner.inner().set_monotonicity(data_type)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }
}

/// Distinct text values per group, for all groups of one aggregation.
struct TextDistinctCount {
    /// The type of the values, and of the items of the state's lists.
    data_type: DataType,
    /// Every distinct text seen, numbered in order of first sight: DataFusion's
    /// one-column GROUP BY table, which hashes a whole column at a time and keeps the
    /// texts in one buffer.
    texts: Box<dyn GroupValues>,
    /// Text numbers of the values at hand (reused).
    numbers: Vec<usize>,
    /// (group << 32) | text number, for each pair seen.
    seen: HashSet<u64, Hasher>,
    /// Distinct texts per group.
    counts: Vec<i64>,
}

impl std::fmt::Debug for TextDistinctCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextDistinctCount")
            .field("data_type", &self.data_type)
            .field("texts", &self.texts.len())
            .field("pairs", &self.seen.len())
            .finish()
    }
}

impl TextDistinctCount {
    fn new(data_type: DataType) -> Result<Self> {
        #[cfg(test)]
        tests::CREATED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let schema = Schema::new(vec![Field::new("text", data_type.clone(), true)]);
        Ok(Self {
            data_type,
            texts: new_group_values(Arc::new(schema), &GroupOrdering::None)?,
            numbers: Vec::new(),
            seen: HashSet::default(),
            counts: Vec::new(),
        })
    }

    /// Numbers `values` into `self.numbers`.
    fn number(&mut self, values: &ArrayRef) -> Result<()> {
        self.numbers.clear();
        self.texts
            .intern(std::slice::from_ref(values), &mut self.numbers)?;
        if self.texts.len() > u32::MAX as usize {
            return internal_err!("COUNT(DISTINCT) over more than 2^32 texts");
        }
        Ok(())
    }

    fn add(&mut self, group: usize, number: usize) -> Result<()> {
        let Ok(group) = u32::try_from(group) else {
            return internal_err!("COUNT(DISTINCT) over more than 2^32 groups");
        };
        if self.seen.insert(u64::from(group) << 32 | number as u64) {
            self.counts[group as usize] += 1;
        }
        Ok(())
    }

    /// Forgets the pairs of the first `n` groups and numbers the rest from 0; with
    /// `EmitTo::All`, everything.
    fn drop_first(&mut self, emit_to: EmitTo) {
        match emit_to {
            EmitTo::All => {
                self.seen.clear();
                self.texts.clear_shrink(0);
            }
            EmitTo::First(n) => {
                let n = n as u64;
                self.seen = self
                    .seen
                    .drain()
                    .filter(|pair| pair >> 32 >= n)
                    .map(|pair| pair - (n << 32))
                    .collect();
            }
        }
    }
}

impl GroupsAccumulator for TextDistinctCount {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        let [values] = values else {
            return internal_err!("COUNT(DISTINCT) takes one argument");
        };
        self.counts.resize(total_num_groups, 0);
        self.number(values)?;
        for (row, &group) in group_indices.iter().enumerate() {
            let included = opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row));
            if included && values.is_valid(row) {
                self.add(group, self.numbers[row])?;
            }
        }
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let counts = emit_to.take_needed(&mut self.counts);
        self.drop_first(emit_to);
        Ok(Arc::new(Int64Array::from(counts)))
    }

    /// For each group emitted, the list of its distinct texts.
    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        let emitted = match emit_to {
            EmitTo::All => self.counts.len(),
            EmitTo::First(n) => n,
        };
        let mut offsets = Vec::with_capacity(emitted + 1);
        offsets.push(0usize);
        for &c in &self.counts[..emitted] {
            offsets.push(offsets[offsets.len() - 1] + c as usize);
        }
        let mut next = offsets[..emitted].to_vec();
        let mut items = vec![0u32; offsets[emitted]];
        for &pair in &self.seen {
            let group = (pair >> 32) as usize;
            if group < emitted {
                items[next[group]] = pair as u32;
                next[group] += 1;
            }
        }
        // The texts by number: the table gives them up, and takes them back (numbered
        // the same) when groups stay.
        let Some(texts) = self.texts.emit(EmitTo::All)?.pop() else {
            return internal_err!("COUNT(DISTINCT) texts emitted no column");
        };
        let values = take(&texts, &UInt32Array::from(items), None)?;
        if matches!(emit_to, EmitTo::First(_)) {
            self.number(&texts)?;
        }
        let Ok(offsets) = offsets
            .into_iter()
            .map(i32::try_from)
            .collect::<Result<Vec<_>, _>>()
        else {
            return internal_err!("COUNT(DISTINCT) state over 2^31 values");
        };
        let list = ListArray::try_new(
            Arc::new(Field::new_list_field(self.data_type.clone(), true)),
            OffsetBuffer::new(offsets.into()),
            values,
            None,
        )?;
        let _ = emit_to.take_needed(&mut self.counts);
        self.drop_first(emit_to);
        Ok(vec![Arc::new(list)])
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        let [lists] = values else {
            return internal_err!("COUNT(DISTINCT) state is one list");
        };
        self.counts.resize(total_num_groups, 0);
        let lists = lists.as_list::<i32>();
        let texts = lists.values();
        self.number(texts)?;
        let offsets = lists.value_offsets();
        for (row, &group) in group_indices.iter().enumerate() {
            for i in offsets[row] as usize..offsets[row + 1] as usize {
                if texts.is_valid(i) {
                    self.add(group, self.numbers[i])?;
                }
            }
        }
        Ok(())
    }

    /// Each row as the state of a group of its own: a list of its value, or an empty
    /// list when it is null or filtered out.
    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let [values] = values else {
            return internal_err!("COUNT(DISTINCT) takes one argument");
        };
        let mut offsets = Vec::with_capacity(values.len() + 1);
        let mut kept = Vec::with_capacity(values.len());
        offsets.push(0i32);
        for row in 0..values.len() {
            let included = opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row));
            if included && values.is_valid(row) {
                kept.push(row as u32);
            }
            let Ok(end) = i32::try_from(kept.len()) else {
                return internal_err!("COUNT(DISTINCT) state over 2^31 values");
            };
            offsets.push(end);
        }
        let items = take(values, &UInt32Array::from(kept), None)?;
        let list = ListArray::try_new(
            Arc::new(Field::new_list_field(self.data_type.clone(), true)),
            OffsetBuffer::new(offsets.into()),
            items,
            None,
        )?;
        Ok(vec![Arc::new(list)])
    }

    fn size(&self) -> usize {
        size_of::<Self>()
            + self.texts.size()
            + self.numbers.capacity() * size_of::<usize>()
            + self.seen.capacity() * (size_of::<u64>() + 1)
            + self.counts.capacity() * size_of::<i64>()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{
        Int64Array, LargeStringArray, RecordBatch, StringArray, StringViewArray,
    };
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::util::pretty::pretty_format_batches;
    use datafusion::datasource::MemTable;
    use datafusion::prelude::{SessionConfig, SessionContext};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use datafusion::arrow::array::{ArrayRef, AsArray};
    use datafusion::arrow::datatypes::Int64Type;
    use datafusion::logical_expr::{EmitTo, GroupsAccumulator};

    use super::{QuiverCount, TextDistinctCount};

    /// Accumulators made, so the test knows its queries went through this one.
    pub(super) static CREATED: std::sync::atomic::AtomicUsize =
        std::sync::atomic::AtomicUsize::new(0);

    /// Two partitions (so partial states are merged) of rows over 3,000 groups, with the
    /// same texts in the three string layouts, some null.
    fn context(ours: bool, skip_partial: bool) -> SessionContext {
        let schema = Arc::new(Schema::new(vec![
            Field::new("g", DataType::Int64, false),
            Field::new("h", DataType::Int64, false),
            Field::new("view", DataType::Utf8View, true),
            Field::new("small", DataType::Utf8, true),
            Field::new("large", DataType::LargeUtf8, true),
        ]));
        let mut rng = StdRng::seed_from_u64(22);
        let mut partitions = vec![Vec::new(), Vec::new()];
        for b in 0..40 {
            let n = 5_000;
            let g: Vec<i64> = (0..n).map(|_| rng.random_range(0..3_000)).collect();
            let h: Vec<i64> = (0..n).map(|_| rng.random_range(0..4)).collect();
            let text: Vec<Option<String>> = (0..n)
                .map(|_| {
                    (rng.random_range(0..15) > 0)
                        .then(|| format!("customer-{:05}", rng.random_range(0..2_000)))
                })
                .collect();
            let batch = RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    Arc::new(Int64Array::from(g)),
                    Arc::new(Int64Array::from(h)),
                    Arc::new(StringViewArray::from(text.clone())),
                    Arc::new(StringArray::from(text.clone())),
                    Arc::new(LargeStringArray::from(text)),
                ],
            )
            .unwrap();
            partitions[b % 2].push(batch);
        }
        let mut config = SessionConfig::new()
            .with_target_partitions(2)
            .with_batch_size(1_000);
        if skip_partial {
            // The partial aggregation gives up after 1,000 rows and passes each row on
            // as a state of its own (`convert_to_state`).
            let options = &mut config.options_mut().execution;
            options.skip_partial_aggregation_probe_rows_threshold = 1_000;
            options.skip_partial_aggregation_probe_ratio_threshold = 0.0;
        }
        let ctx = SessionContext::new_with_config(config);
        if ours {
            ctx.register_udaf(QuiverCount::udaf());
        }
        let table = MemTable::try_new(schema, partitions).unwrap();
        ctx.register_table("t", Arc::new(table)).unwrap();
        ctx
    }

    async fn run(ctx: &SessionContext, sql: &str) -> String {
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        pretty_format_batches(&batches).unwrap().to_string()
    }

    fn counts(acc: &mut TextDistinctCount, emit_to: EmitTo) -> Vec<i64> {
        let counts = acc.evaluate(emit_to).unwrap();
        counts.as_primitive::<Int64Type>().values().to_vec()
    }

    fn texts(texts: &[Option<&str>]) -> Vec<ArrayRef> {
        vec![Arc::new(StringViewArray::from(texts.to_vec()))]
    }

    /// Emitting the first groups (as an aggregation under memory pressure does) hands
    /// over their texts and keeps the other groups' texts under the same numbers.
    #[test]
    fn emitting_the_first_groups_keeps_the_rest_exact() {
        let mut acc = TextDistinctCount::new(DataType::Utf8View).unwrap();
        let values = texts(&[
            Some("a"),
            Some("b"),
            Some("a"),
            None,
            Some("c"),
            Some("b"),
            Some("d"),
        ]);
        acc.update_batch(&values, &[0, 0, 1, 1, 2, 2, 2], None, 3)
            .unwrap();
        let state = acc.state(EmitTo::First(1)).unwrap();
        let mut other = TextDistinctCount::new(DataType::Utf8View).unwrap();
        other.merge_batch(&state, &[0], 1).unwrap();
        assert_eq!(counts(&mut other, EmitTo::All), [2]);
        // The groups left are numbered from 0: {a} and {c, b, d}.
        let values = texts(&[Some("e"), Some("c"), Some("a")]);
        acc.update_batch(&values, &[1, 1, 0], None, 2).unwrap();
        assert_eq!(counts(&mut acc, EmitTo::First(1)), [1]);
        let values = texts(&[Some("b"), Some("f")]);
        acc.update_batch(&values, &[0, 0], None, 1).unwrap();
        assert_eq!(counts(&mut acc, EmitTo::All), [5]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn distinct_text_counts_equal_datafusions_own() {
        for skip_partial in [false, true] {
            same_answers(context(true, skip_partial), context(false, false)).await;
        }
        let created = CREATED.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            created >= 2 * 3 * 2 * 2,
            "the GROUP BY queries used {created} accumulators of ours"
        );
    }

    async fn same_answers(ours: SessionContext, theirs: SessionContext) {
        let queries = [
            "SELECT g, COUNT(DISTINCT view) AS v, COUNT(DISTINCT small) AS s, COUNT(DISTINCT large) AS l, COUNT(*) AS n, SUM(h) AS sh FROM t GROUP BY g ORDER BY g",
            "SELECT g, h, COUNT(DISTINCT view) FILTER (WHERE h < 2) AS v, COUNT(view) AS c FROM t GROUP BY g, h ORDER BY g, h",
            "SELECT h, COUNT(DISTINCT small) AS s FROM t GROUP BY h ORDER BY h",
            "SELECT COUNT(DISTINCT view) AS v, COUNT(*) AS n FROM t",
        ];
        for sql in queries {
            assert_eq!(run(&ours, sql).await, run(&theirs, sql).await, "{sql}");
        }
    }
}
