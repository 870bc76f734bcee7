//! A stream's Delta Lake table: created on first use, appended to by flushes, kept tidy
//! by compaction, checkpoints and vacuum.

use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use chrono::{DateTime, Utc};
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, StructType, Transaction};
use deltalake::parquet::basic::{Compression, ZstdLevel};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::DeltaOperation;
use deltalake::protocol::SaveMode;
use deltalake::writer::{DeltaWriter as _, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use parking_lot::RwLock;
use tokio::sync::Mutex;
use tracing::{info, instrument, warn};
use url::Url;

use crate::Result;
use crate::schema::{PARTITION_COLUMN, StreamSchema};
use crate::store::Store;

/// Upkeep settings for tables.
#[derive(Debug, Clone)]
pub struct TableOptions {
    /// Target size of compacted files.
    pub compact_target_bytes: u64,
    /// How long removed files are kept before vacuum deletes them.
    pub vacuum_retention: Duration,
    /// Zstd level for Parquet pages.
    pub zstd_level: i32,
    /// Files one flush encodes at once, each on its own task (Parquet encoding and
    /// zstd are most of a flush's time, and the one commit that takes them all is short).
    pub flush_parallelism: usize,
}

impl Default for TableOptions {
    fn default() -> Self {
        Self {
            compact_target_bytes: 128 << 20,
            vacuum_retention: Duration::from_secs(7 * 24 * 3600),
            zstd_level: 3,
            flush_parallelism: std::thread::available_parallelism()
                .map(std::num::NonZeroUsize::get)
                .unwrap_or(2),
        }
    }
}

/// What one upkeep pass did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UpkeepReport {
    /// Files added by compaction.
    pub(crate) files_added: u64,
    /// Files replaced by compaction.
    pub(crate) files_removed: u64,
    /// Files deleted by vacuum.
    pub(crate) files_vacuumed: u64,
    /// Whether a checkpoint was written.
    pub(crate) checkpointed: bool,
}

/// One stream's Delta table.
///
/// The writer's handle is behind an async lock held for a whole commit. Readers never
/// wait for it: each commit *publishes* the new table state together with the WAL
/// position it covers, and a query takes whatever was published last.
#[derive(Debug)]
pub(crate) struct StreamTable {
    url: Url,
    app_id: String,
    options: TableOptions,
    store: Store,
    table: Mutex<DeltaTable>,
    published: RwLock<Published>,
    /// When the published state was last brought up to date.
    published_at: parking_lot::Mutex<Instant>,
}

/// A committed table state and this writer's WAL position in it.
#[derive(Debug, Clone)]
pub(crate) struct Published {
    /// The table as of its last commit seen by this writer.
    pub(crate) table: DeltaTable,
    /// Highest WAL position this writer has committed into `table`.
    pub(crate) committed_seq: u64,
}

impl StreamTable {
    /// Opens the stream's table, creating it (partitioned by `event_date`) if absent.
    ///
    /// `app_id` names this writer in the Delta `txn` actions that record WAL positions.
    pub(crate) async fn open_or_create(
        store: &Store,
        schema: &StreamSchema,
        app_id: &str,
        options: TableOptions,
    ) -> Result<Self> {
        let url = store.table_url(schema.name())?;
        let mut table = builder(store, &url)?.build()?;
        match table.load().await {
            Ok(()) => {}
            // A folder that does not exist yet (local store) or holds no log: create.
            Err(DeltaTableError::NotATable(_) | DeltaTableError::InvalidTableLocation(_)) => {
                let kernel: StructType = schema.stored_schema().as_ref().try_into_kernel()?;
                let created = table
                    .create()
                    .with_table_name(schema.name())
                    .with_columns(kernel.fields().cloned())
                    .with_partition_columns([PARTITION_COLUMN])
                    .with_save_mode(SaveMode::Ignore)
                    .await;
                table = match created {
                    Ok(t) => {
                        info!(table = %url, "created Delta table");
                        t
                    }
                    // Another writer may have created it first: use theirs if it is there.
                    Err(create_err) => {
                        let mut t = builder(store, &url)?.build()?;
                        match t.load().await {
                            Ok(()) => t,
                            Err(_) => return Err(create_err.into()),
                        }
                    }
                };
            }
            Err(e) => return Err(e.into()),
        }
        let committed_seq = txn_version(&table, app_id).await?;
        Ok(Self {
            url,
            app_id: app_id.to_owned(),
            options,
            store: store.clone(),
            published: RwLock::new(Published {
                table: table.clone(),
                committed_seq,
            }),
            table: Mutex::new(table),
            published_at: parking_lot::Mutex::new(Instant::now()),
        })
    }

    /// The table's location.
    pub(crate) fn url(&self) -> &Url {
        &self.url
    }

    /// Highest WAL position this writer has committed to the table (0 if none).
    pub(crate) fn committed_seq(&self) -> u64 {
        self.published.read().committed_seq
    }

    /// The last published table state; never waits for a commit in progress.
    pub(crate) fn published(&self) -> Published {
        self.published.read().clone()
    }

    /// The table as it was at `at` (a version or a point in time), for time travel.
    pub(crate) async fn historical(&self, at: TableAt) -> Result<DeltaTable> {
        load_at(&self.store, &self.url, at).await
    }

    /// Reloads the writer's handle to the latest version and publishes it.
    async fn reload(&self, table: &mut DeltaTable) -> Result<()> {
        table.update_state().await?;
        let committed_seq = txn_version(table, &self.app_id).await?;
        self.publish(table.clone(), committed_seq);
        Ok(())
    }

    fn publish(&self, table: DeltaTable, committed_seq: u64) {
        *self.published.write() = Published {
            table,
            committed_seq,
        };
        *self.published_at.lock() = Instant::now();
    }

    /// Picks up commits of other writers (another Quiver, a batch job) once the published
    /// state is older than `max_age`. Skipped while this writer is committing.
    pub(crate) async fn refresh_if_older(&self, max_age: Duration) -> Result<bool> {
        if self.published_at.lock().elapsed() < max_age {
            return Ok(false);
        }
        let Ok(mut table) = self.table.try_lock() else {
            return Ok(false);
        };
        let before = table.version();
        self.reload(&mut table).await?;
        Ok(table.version() != before)
    }

    /// Version, stored rows and data files of the table as this writer last saw it.
    pub(crate) async fn stats(&self) -> (Option<u64>, u64, u64) {
        let table = self.table.lock().await;
        let Ok(snapshot) = table.snapshot() else {
            return (table.version(), 0, 0);
        };
        let (rows, files) = snapshot
            .log_data()
            .into_iter()
            .fold((0u64, 0u64), |(rows, files), f| {
                (rows + f.num_records().unwrap_or(0) as u64, files + 1)
            });
        (table.version(), rows, files)
    }

    /// Appends `batches` and records `seq` as this writer's position, in one commit.
    #[instrument(skip_all, fields(table = %self.url, seq, rows))]
    pub(crate) async fn append(&self, batches: Vec<RecordBatch>, seq: u64) -> Result<u64> {
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        tracing::Span::current().record("rows", rows);
        let mut table = self.table.lock().await;
        let written = self.write_and_commit(&table, batches, seq).await;
        let state = match written {
            Ok(state) => state,
            Err(e) => {
                // Another writer may have changed the table in a way that conflicts with
                // the state this one holds (e.g. a second metadata action from a create
                // race); start the next attempt from the latest version. The reload also
                // tells whether a commit reported as failed did land after all.
                if let Err(reload) = self.reload(&mut table).await {
                    warn!(error = %reload, "could not reload the table after a failed commit");
                } else if self.committed_seq() >= seq {
                    warn!(error = %e, seq, "the commit reported a failure but is in the table");
                    return Ok(table.version().unwrap_or(0));
                }
                return Err(e);
            }
        };
        table.state = Some(state);
        self.publish(table.clone(), seq);
        Ok(table.version().unwrap_or(0))
    }

    /// Encodes `batches` as Parquet files, up to `flush_parallelism` of them at once on
    /// their own tasks, then commits them all in one Delta commit that also records
    /// `seq` as this writer's transaction version. Returns the table state after it.
    async fn write_and_commit(
        &self,
        table: &DeltaTable,
        batches: Vec<RecordBatch>,
        seq: u64,
    ) -> Result<deltalake::table::state::DeltaTableState> {
        let mut tasks = tokio::task::JoinSet::new();
        for chunk in split_for_files(batches, self.options.flush_parallelism) {
            let mut writer = RecordBatchWriter::for_table(table)?
                .with_writer_properties(self.writer_properties());
            tasks.spawn(async move {
                for batch in chunk {
                    writer.write(batch).await?;
                }
                writer.flush().await
            });
        }
        let mut actions = Vec::new();
        while let Some(done) = tasks.join_next().await {
            let adds = done.map_err(|_| crate::Error::Internal("a flush task panicked"))??;
            actions.extend(adds.into_iter().map(Action::Add));
        }
        let commit = CommitProperties::default()
            .with_application_transaction(Transaction::new(&self.app_id, seq as i64));
        let operation = DeltaOperation::Write {
            mode: SaveMode::Append,
            partition_by: Some(vec![PARTITION_COLUMN.to_owned()]),
            predicate: None,
        };
        let finalized = CommitBuilder::from(commit)
            .with_actions(actions)
            .build(Some(table.snapshot()?), table.log_store(), operation)
            .await?;
        Ok(finalized.snapshot())
    }

    fn writer_properties(&self) -> WriterProperties {
        let level = ZstdLevel::try_new(self.options.zstd_level).unwrap_or_default();
        WriterProperties::builder()
            .set_compression(Compression::ZSTD(level))
            .build()
    }

    /// Compacts small files, writes a checkpoint and vacuums files past retention.
    #[instrument(skip_all, fields(table = %self.url))]
    pub(crate) async fn upkeep(&self) -> Result<UpkeepReport> {
        let started = Instant::now();
        let mut report = UpkeepReport::default();
        let mut table = self.table.lock().await;
        self.reload(&mut table).await?;
        let target = NonZeroU64::new(self.options.compact_target_bytes.max(1 << 20))
            .unwrap_or(NonZeroU64::MIN);
        let (compacted, metrics) = table
            .clone()
            .optimize()
            .with_target_size(target)
            .with_writer_properties(self.writer_properties())
            .await?;
        report.files_added = metrics.num_files_added;
        report.files_removed = metrics.num_files_removed;
        *table = compacted;

        deltalake::checkpoints::create_checkpoint(&table, None).await?;
        report.checkpointed = true;

        let retention = chrono::Duration::from_std(self.options.vacuum_retention)
            .unwrap_or(chrono::Duration::days(7));
        let (vacuumed, vm) = table
            .clone()
            .vacuum()
            .with_retention_period(retention)
            .with_enforce_retention_duration(false)
            .await?;
        report.files_vacuumed = vm.files_deleted.len() as u64;
        *table = vacuumed;
        let committed_seq = self.committed_seq();
        self.publish(table.clone(), committed_seq);
        info!(
            ?report,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "table upkeep done"
        );
        Ok(report)
    }
}

/// A point in a table's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableAt {
    /// A Delta table version.
    Version(u64),
    /// The latest version committed at or before this instant.
    Time(DateTime<Utc>),
}

/// The `txn` version recorded by `app_id` in `table`'s current state (0 if none).
async fn txn_version(table: &DeltaTable, app_id: &str) -> Result<u64> {
    let v = table
        .snapshot()?
        .transaction_version(table.log_store().as_ref(), app_id)
        .await?;
    Ok(v.map(|v| v.max(0) as u64).unwrap_or(0))
}

/// A builder for the Delta table at `url` on `store`. A local location is created
/// first: the Delta kernel refuses one that does not exist yet.
pub(crate) fn builder(store: &Store, url: &Url) -> Result<DeltaTableBuilder> {
    if url.scheme() == "file"
        && let Ok(path) = url.to_file_path()
    {
        std::fs::create_dir_all(path)?;
    }
    Ok(DeltaTableBuilder::from_url(url.clone())?
        .with_storage_backend(Arc::clone(&store.object_store()), url.clone()))
}

/// The Delta table at `url` as it was at a version or instant.
pub(crate) async fn load_at(store: &Store, url: &Url, at: TableAt) -> Result<DeltaTable> {
    let builder = builder(store, url)?;
    let builder = match at {
        TableAt::Version(v) => builder.with_version(v),
        TableAt::Time(t) => builder.with_timestamp(t),
    };
    Ok(builder.load().await?)
}

/// Fewest rows worth a file of their own in one flush; below it, more files cost more
/// (in footers, and in files for queries to open until compaction) than they save.
const MIN_ROWS_PER_FILE: usize = 64 * 1024;

/// Splits a flush's batches, in order, into at most `parts` runs of about equal rows,
/// each of at least `MIN_ROWS_PER_FILE` rows where there are enough.
fn split_for_files(batches: Vec<RecordBatch>, parts: usize) -> Vec<Vec<RecordBatch>> {
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    let parts = parts.clamp(1, (rows / MIN_ROWS_PER_FILE).max(1));
    let per_part = rows.div_ceil(parts);
    let mut out: Vec<Vec<RecordBatch>> = Vec::with_capacity(parts);
    let mut current = Vec::new();
    let mut in_current = 0;
    for batch in batches {
        in_current += batch.num_rows();
        current.push(batch);
        if in_current >= per_part && out.len() + 1 < parts {
            out.push(std::mem::take(&mut current));
            in_current = 0;
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod split_tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn batches(n: usize, rows: usize) -> Vec<RecordBatch> {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        (0..n)
            .map(|i| {
                let v: Vec<i64> = (0..rows).map(|r| (i * rows + r) as i64).collect();
                RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(Int64Array::from(v))])
                    .unwrap()
            })
            .collect()
    }

    fn shape(parts: &[Vec<RecordBatch>]) -> Vec<usize> {
        parts
            .iter()
            .map(|p| p.iter().map(RecordBatch::num_rows).sum())
            .collect()
    }

    #[test]
    fn flushes_split_into_ordered_runs_of_worthwhile_size() {
        // 300 requests of 1,000 events over 4 tasks: four runs in order.
        let parts = split_for_files(batches(300, 1000), 4);
        assert_eq!(shape(&parts), vec![75_000; 4]);
        let first: Vec<i64> = parts
            .iter()
            .map(|p| {
                let a = p[0]
                    .column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap();
                a.value(0)
            })
            .collect();
        assert_eq!(first, vec![0, 75_000, 150_000, 225_000]);
        // Too few rows for two worthwhile files: one.
        assert_eq!(
            shape(&split_for_files(batches(100, 1000), 4)),
            vec![100_000]
        );
        // One task: everything in one.
        assert_eq!(
            shape(&split_for_files(batches(300, 1000), 1)),
            vec![300_000]
        );
        assert!(split_for_files(Vec::new(), 2).is_empty());
    }
}
