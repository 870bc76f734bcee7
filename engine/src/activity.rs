//! Who changed what: one entry per creation, change or removal of a stream, view,
//! alert, dashboard or token, and per notification acknowledged. Kept in the catalog
//! document `activity` (the newest [`KEEP`] entries) and readable as the `activity`
//! table.

use std::sync::Arc;

use arrow::array::{ArrayRef, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::catalog::Document;

/// Entries kept.
pub const KEEP: usize = 1_000;

/// One thing someone did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// When (ms since the epoch).
    pub at: i64,
    /// Who: the token's name.
    pub who: String,
    /// `create`, `replace`, `drop`, `read`, …
    pub action: String,
    /// `stream`, `view`, `alert`, `dashboard`, `token`, `notification`, `silence`.
    pub kind: String,
    /// The object's name or id.
    pub name: String,
}

/// The activity log of a store.
#[derive(Debug)]
pub struct Activity {
    doc: Document<Vec<Entry>>,
    cached: Mutex<Option<Vec<Entry>>>,
}

impl Activity {
    pub(crate) fn new(store: &crate::Store, node: &str) -> Self {
        Self {
            doc: Document::new(store, "activity", None, node),
            cached: Mutex::new(None),
        }
    }

    /// Records an entry; a failure to save is logged, never passed on: what was done
    /// stays done.
    pub async fn record(&self, who: &str, action: &str, kind: &str, name: &str) {
        let entry = Entry {
            at: chrono::Utc::now().timestamp_millis(),
            who: who.to_owned(),
            action: action.to_owned(),
            kind: kind.to_owned(),
            name: name.to_owned(),
        };
        match self
            .doc
            .update(|list| {
                list.push(entry.clone());
                let over = list.len().saturating_sub(KEEP);
                list.drain(..over);
                Ok(())
            })
            .await
        {
            Ok((_, list)) => *self.cached.lock() = Some(list),
            Err(e) => warn!(error = %e, action, kind, name, "cannot record the activity"),
        }
    }

    /// Every entry kept, oldest first.
    pub async fn entries(&self) -> Vec<Entry> {
        if let Some(list) = self.cached.lock().clone() {
            return list;
        }
        match self.doc.read().await {
            Ok(list) => {
                *self.cached.lock() = Some(list.clone());
                list
            }
            Err(e) => {
                warn!(error = %e, "cannot read the activity");
                Vec::new()
            }
        }
    }

    /// The `activity` table as last read or written.
    pub(crate) fn table(&self) -> RecordBatch {
        let list = self.cached.lock().clone().unwrap_or_default();
        let text = |f: &dyn Fn(&Entry) -> &str| -> ArrayRef {
            Arc::new(StringArray::from_iter_values(list.iter().map(f)))
        };
        let columns: Vec<ArrayRef> = vec![
            Arc::new(
                TimestampMillisecondArray::from_iter_values(list.iter().map(|e| e.at))
                    .with_timezone("UTC"),
            ),
            text(&|e| &e.who),
            text(&|e| &e.action),
            text(&|e| &e.kind),
            text(&|e| &e.name),
        ];
        RecordBatch::try_new(schema(), columns).expect("columns match the schema")
    }
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(
            "at",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new("who", DataType::Utf8, false),
        Field::new("action", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("name", DataType::Utf8, false),
    ]))
}
