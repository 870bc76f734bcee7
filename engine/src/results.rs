//! Result tables: Delta tables that batch jobs write whole (`forecasts`,
//! `stockout_risk`, `anomalies`, `model_runs`), kept under `tables/<name>/` beside the
//! streams' tables and read by SQL like them.
//!
//! A job replaces a table's rows with one overwrite commit, so a reader sees the whole
//! previous run or the whole new one, never part of either, and every run stays
//! readable as a Delta version (`table_at_version`). The tables are found by listing
//! `tables/` in the store, at start and on every table refresh, so a table written by
//! another process on the same store (a CLI run) appears in SQL within the refresh
//! interval.

use std::collections::{BTreeMap, HashSet};

use arrow::record_batch::RecordBatch;
use deltalake::operations::write::SchemaMode;
use deltalake::parquet::basic::{Compression, ZstdLevel};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableError};
use futures::TryStreamExt;
use object_store::ObjectStore;
use parking_lot::RwLock;
use tracing::{info, warn};

use crate::schema::is_valid_identifier;
use crate::store::Store;
use crate::table::builder;
use crate::{Error, Result};

/// Tries at one result-table write before its commit conflict is the caller's.
const WRITE_ATTEMPTS: u32 = 8;

/// The result tables this process knows, by name, as last loaded.
#[derive(Debug, Default)]
pub(crate) struct ResultTables {
    tables: RwLock<BTreeMap<String, DeltaTable>>,
}

impl ResultTables {
    /// Names, sorted.
    pub(crate) fn names(&self) -> Vec<String> {
        self.tables.read().keys().cloned().collect()
    }

    /// A table as last loaded.
    pub(crate) fn get(&self, name: &str) -> Option<DeltaTable> {
        self.tables.read().get(name).cloned()
    }

    /// Finds the Delta tables under `tables/` that are not streams, and loads the
    /// latest version of each (new ones and known ones alike).
    pub(crate) async fn refresh(&self, store: &Store, streams: &HashSet<String>) -> Result<()> {
        let root = store.path("tables/")?;
        let listed = store
            .object_store()
            .list_with_delimiter(Some(&root))
            .await?;
        for prefix in listed.common_prefixes {
            let Some(name) = prefix.filename().map(str::to_owned) else {
                continue;
            };
            if streams.contains(&name) || !is_valid_identifier(&name) {
                continue;
            }
            // A known table only needs its new commits; an unknown folder is a result
            // table once it has a Delta log.
            let known = self.tables.read().contains_key(&name);
            let log = prefix.clone().join("_delta_log");
            let has_log = known
                || store
                    .object_store()
                    .list(Some(&log))
                    .try_next()
                    .await?
                    .is_some();
            if !has_log {
                continue;
            }
            match self.load(store, &name).await {
                Ok(table) => {
                    self.tables.write().insert(name, table);
                }
                Err(e) => warn!(table = name, error = %e, "cannot load a result table"),
            }
        }
        Ok(())
    }

    async fn load(&self, store: &Store, name: &str) -> Result<DeltaTable> {
        if let Some(mut known) = self.get(name) {
            known.update_incremental(None).await?;
            return Ok(known);
        }
        let mut table = builder(store, &store.table_url(name)?)?.build()?;
        table.load().await?;
        Ok(table)
    }

    /// Replaces every row of table `name` by `batches` in one commit (creating the
    /// table, or changing its schema, as needed); returns the new version.
    pub(crate) async fn replace(
        &self,
        store: &Store,
        name: &str,
        batches: Vec<RecordBatch>,
    ) -> Result<u64> {
        self.write(store, name, batches, SaveMode::Overwrite).await
    }

    /// Adds `batches` to table `name` in one commit (creating the table, or adding
    /// new columns, as needed); returns the new version.
    pub(crate) async fn append(
        &self,
        store: &Store,
        name: &str,
        batches: Vec<RecordBatch>,
    ) -> Result<u64> {
        self.write(store, name, batches, SaveMode::Append).await
    }

    async fn write(
        &self,
        store: &Store,
        name: &str,
        batches: Vec<RecordBatch>,
        mode: SaveMode,
    ) -> Result<u64> {
        if !is_valid_identifier(name) {
            return Err(Error::Config(format!(
                "'{name}' is not a valid table name (lower-case letters, digits and _)"
            )));
        }
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        // Another process may commit to the same table meanwhile (a CLI job and the
        // server both adding a `model_runs` row, or both creating the table): Delta
        // refuses a commit whose metadata raced another's, and the write is then made
        // again on the table as it now is. Appends of rows never conflict otherwise.
        let mut attempt = 0;
        let written = loop {
            attempt += 1;
            let mut table = builder(store, &store.table_url(name)?)?.build()?;
            // A table not there yet is created by the write.
            let _ = table.load().await;
            let result = table
                .write(batches.clone())
                .with_save_mode(mode)
                .with_schema_mode(match mode {
                    SaveMode::Overwrite => SchemaMode::Overwrite,
                    _ => SchemaMode::Merge,
                })
                .with_writer_properties(
                    WriterProperties::builder()
                        .set_compression(Compression::ZSTD(ZstdLevel::default()))
                        .build(),
                )
                .await;
            match result {
                Err(
                    e @ (DeltaTableError::Transaction { .. }
                    | DeltaTableError::VersionAlreadyExists(_)),
                ) if attempt < WRITE_ATTEMPTS => {
                    warn!(table = name, attempt, error = %e, "result table commit raced another writer; writing again");
                }
                other => break other?,
            }
        };
        let version = written.version().unwrap_or(0);
        info!(table = name, rows, version, ?mode, "result table written");
        self.tables.write().insert(name.to_owned(), written);
        Ok(version)
    }
}
