//! Change sets as push frames: filtered and encoded once per (view, filter), then sent to
//! every subscriber of that pair with only the subscription id spliced in.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arrow::array::RecordBatch;
use arrow::array::{Array, BooleanArray};
use arrow::compute::{filter_record_batch, not, prep_null_mask_filter};
use arrow::error::ArrowError;
use arrow::row::{Row, RowConverter, SortField};
use bytes::Bytes;
use quiver_engine::ChangeSet;

use super::filter::Filter;
use crate::sql::encode::JsonRows;

/// The keys of `gone` (key columns) whose row before `change` passed `filter`.
fn held_before(
    change: &ChangeSet,
    filter: &Filter,
    key_idx: &[usize],
    gone: &RecordBatch,
) -> Result<RecordBatch, ArrowError> {
    if gone.num_rows() == 0 || change.replaced.num_rows() == 0 {
        return Ok(gone.slice(0, 0));
    }
    let passed = filter_record_batch(
        &change.replaced.project(key_idx)?,
        &no_nulls(filter.mask(&change.replaced)?),
    )?;
    let fields = gone
        .schema()
        .fields()
        .iter()
        .map(|f| SortField::new(f.data_type().clone()))
        .collect();
    let codec = RowConverter::new(fields)?;
    let passed = codec.convert_columns(passed.columns())?;
    let held: HashSet<Row<'_>> = passed.iter().collect();
    let gone_rows = codec.convert_columns(gone.columns())?;
    let keep: BooleanArray = gone_rows.iter().map(|k| Some(held.contains(&k))).collect();
    filter_record_batch(gone, &keep)
}

/// One view change as one group of subscribers sees it.
#[derive(Debug)]
pub(crate) struct Delta {
    pub(crate) version: u64,
    /// When the oldest event behind it was acknowledged.
    pub(crate) acked_at: Option<Instant>,
    upserts: JsonRows,
    deletes: JsonRows,
    /// The upserted rows' key columns, for subscribers that coalesce.
    upsert_key_batch: RecordBatch,
    upsert_keys: OnceLock<JsonRows>,
}

impl Delta {
    /// `change` through `filter`; `None` when nothing in it concerns the filter.
    ///
    /// With a filter on values, a key leaves a subscriber's rows when it is deleted or
    /// its new row fails the filter; either is sent as a delete only when the key's row
    /// before the change passed the filter (`ChangeSet::replaced`), that is, only for
    /// keys the subscriber holds.
    pub(crate) fn build(
        change: &ChangeSet,
        filter: &Filter,
        key_idx: &[usize],
    ) -> Result<Option<Self>, ArrowError> {
        let (upserts, deletes) = if filter.is_empty() {
            (change.upserts.clone(), change.deletes.clone())
        } else {
            let pass = no_nulls(filter.mask(&change.upserts)?);
            let upserts = filter_record_batch(&change.upserts, &pass)?;
            let deletes = if filter.on_key_only() {
                filter.apply(&change.deletes)?
            } else {
                let failed = filter_record_batch(&change.upserts.project(key_idx)?, &not(&pass)?)?;
                let failed =
                    RecordBatch::try_new(change.deletes.schema(), failed.columns().to_vec())?;
                let gone = arrow::compute::concat_batches(
                    &change.deletes.schema(),
                    [&change.deletes, &failed],
                )?;
                held_before(change, filter, key_idx, &gone)?
            };
            (upserts, deletes)
        };
        if upserts.num_rows() == 0 && deletes.num_rows() == 0 {
            return Ok(None);
        }
        Ok(Some(Self {
            version: change.version,
            acked_at: change.acked_at,
            upserts: JsonRows::encode(&upserts)?,
            deletes: JsonRows::encode(&deletes)?,
            upsert_key_batch: upserts.project(key_idx)?,
            upsert_keys: OnceLock::new(),
        }))
    }

    /// Bytes this delta holds while queued.
    pub(crate) fn size(&self) -> usize {
        self.upserts.text.len() + self.deletes.text.len() + 64
    }

    /// The message for subscription `id` (already JSON-quoted), in parts: the rows
    /// are shared with every other subscriber of the group, not copied.
    pub(crate) fn message(&self, id: &str) -> Vec<Bytes> {
        let mut head = Vec::with_capacity(id.len() + 96);
        let _ = write!(
            head,
            r#"{{"type":"delta","id":{id},"version":{}"#,
            self.version
        );
        write_acked(&mut head, self.acked_at);
        head.extend_from_slice(br#","upserts":["#);
        vec![
            Bytes::from(head),
            self.upserts.text.clone(),
            Bytes::from_static(br#"],"deletes":["#),
            self.deletes.text.clone(),
            Bytes::from_static(b"]}"),
        ]
    }

    fn upsert_keys(&self) -> Result<&JsonRows, ArrowError> {
        if let Some(k) = self.upsert_keys.get() {
            return Ok(k);
        }
        let keys = JsonRows::encode(&self.upsert_key_batch)?;
        Ok(self.upsert_keys.get_or_init(|| keys))
    }
}

/// NULL as false, so the mask can be negated.
fn no_nulls(mask: BooleanArray) -> BooleanArray {
    if mask.null_count() == 0 {
        mask
    } else {
        prep_null_mask_filter(&mask)
    }
}

/// `,"acked_at":<epoch ms>` when known: when the oldest event behind the change was
/// acknowledged, so a client on the same clock can measure ack → arrival.
fn write_acked(out: &mut Vec<u8>, acked_at: Option<Instant>) {
    if let Some(t) = acked_at {
        let wall = SystemTime::now() - t.elapsed();
        if let Ok(d) = wall.duration_since(UNIX_EPOCH) {
            let _ = write!(out, r#","acked_at":{:.3}"#, d.as_secs_f64() * 1e3);
        }
    }
}

/// A slow subscriber's pending changes folded per key: the last state of each key wins.
#[derive(Debug, Default)]
pub(crate) struct Coalesced {
    pub(crate) version: u64,
    pub(crate) acked_at: Option<Instant>,
    /// Key text → row text (`None`: deleted).
    rows: HashMap<Box<[u8]>, Option<Box<[u8]>>>,
    bytes: usize,
}

impl Coalesced {
    /// Approximate bytes of its frame.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Folds `delta` in.
    pub(crate) fn fold(&mut self, delta: &Delta) -> Result<(), ArrowError> {
        self.version = self.version.max(delta.version);
        self.acked_at = match (self.acked_at, delta.acked_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        for i in 0..delta.deletes.len() {
            self.set(delta.deletes.row(i), None);
        }
        let keys = delta.upsert_keys()?;
        for i in 0..delta.upserts.len() {
            self.set(keys.row(i), Some(delta.upserts.row(i)));
        }
        Ok(())
    }

    fn set(&mut self, key: &[u8], row: Option<&[u8]>) {
        let row: Option<Box<[u8]>> = row.map(Box::from);
        let added = key.len() + row.as_ref().map_or(0, |r| r.len()) + 48;
        match self.rows.get_mut(key) {
            Some(slot) => {
                self.bytes = self.bytes + row.as_ref().map_or(0, |r| r.len())
                    - slot.as_ref().map_or(0, |r| r.len());
                *slot = row;
            }
            None => {
                self.bytes += added;
                self.rows.insert(Box::from(key), row);
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn rows(&self) -> usize {
        self.rows.len()
    }

    /// One delta frame holding every key's last state.
    pub(crate) fn frame(&self, id: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes + id.len() + 96);
        let _ = write!(
            out,
            r#"{{"type":"delta","id":{id},"version":{},"coalesced":true"#,
            self.version
        );
        write_acked(&mut out, self.acked_at);
        out.extend_from_slice(br#","upserts":["#);
        let mut first = true;
        for row in self.rows.values().flatten() {
            if !std::mem::take(&mut first) {
                out.push(b',');
            }
            out.extend_from_slice(row);
        }
        out.extend_from_slice(br#"],"deletes":["#);
        first = true;
        for (key, _) in self.rows.iter().filter(|(_, r)| r.is_none()) {
            if !std::mem::take(&mut first) {
                out.push(b',');
            }
            out.extend_from_slice(key);
        }
        out.extend_from_slice(b"]}");
        out
    }
}

/// A filtered snapshot's rows, encoded once per (view, filter, version).
#[derive(Debug)]
pub(crate) struct SnapshotRows {
    pub(crate) version: u64,
    /// `{"name","type"}` per column.
    pub(crate) columns: String,
    pub(crate) key: String,
    pub(crate) rows: Bytes,
}

impl SnapshotRows {
    pub(crate) fn encode(
        version: u64,
        key: &[String],
        rows: &RecordBatch,
        filter: &Filter,
    ) -> Result<Self, ArrowError> {
        let rows = filter.apply(rows)?;
        let columns: Vec<serde_json::Value> = rows
            .schema()
            .fields()
            .iter()
            .map(|f| {
                serde_json::json!({
                    "name": f.name(),
                    "type": crate::sql::encode::type_name(f.data_type()),
                })
            })
            .collect();
        let encoded = JsonRows::encode(&rows)?;
        Ok(Self {
            version,
            columns: serde_json::Value::Array(columns).to_string(),
            key: serde_json::to_string(key).unwrap_or_else(|_| "[]".into()),
            rows: encoded.text,
        })
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.rows.len() + self.columns.len() + self.key.len()
    }

    /// The snapshot message for subscription `id`, in parts; the rows are shared.
    pub(crate) fn message(&self, id: &str, view: &str) -> Vec<Bytes> {
        let mut head = Vec::with_capacity(self.columns.len() + 256);
        let view = serde_json::Value::from(view).to_string();
        let _ = write!(
            head,
            r#"{{"type":"snapshot","id":{id},"view":{view},"version":{},"key":{},"columns":{},"rows":["#,
            self.version, self.key, self.columns
        );
        vec![
            Bytes::from(head),
            self.rows.clone(),
            Bytes::from_static(b"]}"),
        ]
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use serde_json::{Value, json};

    use super::*;

    fn rows(rows: &[(&str, i64)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("sku", DataType::Utf8, false),
            Field::new("on_hand", DataType::Int64, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(
                    rows.iter().map(|r| r.0).collect::<Vec<_>>(),
                )),
                Arc::new(Int64Array::from(
                    rows.iter().map(|r| r.1).collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap()
    }

    /// A change upserting `up` and deleting `del`, whose keys held `was` before.
    fn change_from(
        version: u64,
        up: &[(&str, i64)],
        del: &[&str],
        was: &[(&str, i64)],
    ) -> ChangeSet {
        let keys = Arc::new(Schema::new(vec![Field::new("sku", DataType::Utf8, false)]));
        ChangeSet {
            view: "v".into(),
            version,
            upserts: rows(up),
            deletes: RecordBatch::try_new(keys, vec![Arc::new(StringArray::from(del.to_vec()))])
                .unwrap(),
            replaced: rows(was),
            acked_at: None,
        }
    }

    /// A change whose every upserted and deleted key held a row (on hand 10) before.
    fn change(version: u64, up: &[(&str, i64)], del: &[&str]) -> ChangeSet {
        let was: Vec<(&str, i64)> = up
            .iter()
            .map(|r| r.0)
            .chain(del.iter().copied())
            .map(|k| (k, 10))
            .collect();
        change_from(version, up, del, &was)
    }

    fn filter(spec: Value) -> Filter {
        let schema = Schema::new(vec![
            Field::new("sku", DataType::Utf8, false),
            Field::new("on_hand", DataType::Int64, true),
        ]);
        Filter::parse(Some(&spec), &schema, &["sku".to_owned()]).unwrap()
    }

    fn frame(d: &Delta) -> Value {
        serde_json::from_slice(&d.message("\"s1\"").concat()).unwrap()
    }

    #[test]
    fn a_row_leaving_a_value_filter_is_deleted() {
        let f = filter(json!({"on_hand": {"gte": 10}}));
        let d = Delta::build(&change(3, &[("A", 12), ("B", 4)], &["C"]), &f, &[0])
            .unwrap()
            .unwrap();
        assert_eq!(
            frame(&d),
            json!({"type":"delta","id":"s1","version":3,"upserts":[["A",12]],"deletes":[["C"],["B"]]})
        );
    }

    #[test]
    fn a_value_filter_deletes_only_keys_whose_old_row_passed() {
        let f = filter(json!({"on_hand": {"gte": 10}}));
        // B (was 12) and D (was 20) leave; C (was 3) and E (was 1) were never held;
        // F is new and fails.
        let ch = change_from(
            5,
            &[("A", 11), ("B", 4), ("C", 2), ("F", 1)],
            &["D", "E"],
            &[("A", 9), ("B", 12), ("C", 3), ("D", 20), ("E", 1)],
        );
        let d = Delta::build(&ch, &f, &[0]).unwrap().unwrap();
        let v = frame(&d);
        assert_eq!(v["upserts"], json!([["A", 11]]));
        let mut deletes = v["deletes"].as_array().unwrap().clone();
        deletes.sort_by_key(|k| k[0].as_str().unwrap().to_owned());
        assert_eq!(deletes, vec![json!(["B"]), json!(["D"])]);
        // Nothing the subscriber holds is touched: no frame at all.
        let ch = change_from(6, &[("C", 5)], &["E"], &[("C", 3), ("E", 1)]);
        assert!(Delta::build(&ch, &f, &[0]).unwrap().is_none());
    }

    #[test]
    fn a_key_filter_drops_what_it_never_passed() {
        let f = filter(json!({"sku": "A"}));
        assert!(
            Delta::build(&change(3, &[("B", 1)], &["C"]), &f, &[0])
                .unwrap()
                .is_none()
        );
        let d = Delta::build(&change(4, &[("B", 1)], &["A"]), &f, &[0])
            .unwrap()
            .unwrap();
        assert_eq!(frame(&d)["deletes"], json!([["A"]]));
        assert_eq!(frame(&d)["upserts"], json!([]));
    }

    #[test]
    fn coalescing_keeps_each_keys_last_state() {
        let f = filter(json!({}));
        let mut c = Coalesced::default();
        for ch in [
            change(1, &[("A", 1), ("B", 2)], &[]),
            change(2, &[("A", 5)], &["B"]),
            change(3, &[("C", 7)], &[]),
        ] {
            c.fold(&Delta::build(&ch, &f, &[0]).unwrap().unwrap())
                .unwrap();
        }
        let v: Value = serde_json::from_slice(&c.frame("\"x\"")).unwrap();
        assert_eq!(v["version"], 3);
        let mut ups = v["upserts"].as_array().unwrap().clone();
        ups.sort_by_key(|r| r[0].as_str().unwrap().to_owned());
        assert_eq!(ups, vec![json!(["A", 5]), json!(["C", 7])]);
        assert_eq!(v["deletes"], json!([["B"]]));
        assert_eq!(c.rows(), 3);
    }
}
