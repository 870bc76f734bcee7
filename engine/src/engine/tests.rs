use arrow::array::{Int64Array, StringArray};

use super::*;
use crate::query::Prepared;

fn inventory_batch(ids: &[&str]) -> RecordBatch {
    let n = ids.len();
    let schema = StreamSchema::inventory();
    RecordBatch::try_new(
        Arc::clone(schema.input_schema()),
        vec![
            Arc::new(StringArray::from(ids.to_vec())),
            Arc::new(
                TimestampMicrosecondArray::from(vec![1_764_064_800_000_000; n])
                    .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from(vec!["SKU-1"; n])),
            Arc::new(StringArray::from(vec!["W1"; n])),
            Arc::new(StringArray::from(vec!["receipt"; n])),
            Arc::new(Int64Array::from(vec![5; n])),
            Arc::new(
                arrow::array::Decimal128Array::from(vec![None::<i128>; n])
                    .with_precision_and_scale(18, 2)
                    .unwrap(),
            ),
        ],
    )
    .unwrap()
}

async fn stored(engine: &Engine, stream: &str) -> (u64, usize) {
    let info = engine.streams().await;
    let s = info.iter().find(|s| s.schema.name() == stream).unwrap();
    (s.stored_events, s.buffered_events)
}

/// The first row's first two columns (both BIGINT) of `sql`, through the query session.
async fn two_counts(engine: &Engine, sql: &str) -> (i64, i64) {
    let session = engine.query_session();
    let Prepared::Query(plan) = session.prepare(sql, &[]).await.unwrap() else {
        panic!("a query")
    };
    let batches = datafusion::physical_plan::common::collect(session.execute(*plan).await.unwrap())
        .await
        .unwrap();
    let col = |i: usize| {
        batches[0]
            .column(i)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .value(0)
    };
    (col(0), col(1))
}

#[tokio::test]
async fn memory_store_ingest_flush_and_replay() {
    let wal = tempfile::tempdir().unwrap();
    let mut config = EngineConfig::new("memory://", wal.path());
    config.upkeep_interval = Duration::ZERO;
    let metrics = Arc::new(EngineMetrics::unregistered());
    let engine = Engine::open(config.clone(), Arc::clone(&metrics))
        .await
        .unwrap();

    let out = engine
        .ingest("inventory", inventory_batch(&["a", "b"]), None)
        .await
        .unwrap();
    assert_eq!(out, IngestOutcome::Accepted(2));
    assert_eq!(stored(&engine, "inventory").await, (0, 2));
    engine.flush_all().await.unwrap();
    assert_eq!(stored(&engine, "inventory").await, (2, 0));

    let unknown = engine
        .ingest("returns", inventory_batch(&["c"]), None)
        .await;
    assert!(matches!(unknown, Err(Error::UnknownStream(_))));
    let wrong = engine.ingest("orders", inventory_batch(&["c"]), None).await;
    assert!(matches!(wrong, Err(Error::SchemaMismatch { .. })));

    // Buffered but not flushed: a second engine on the same WAL (as after a crash)
    // replays it; the memory store itself is gone with the process, as documented.
    engine
        .ingest("inventory", inventory_batch(&["d"]), None)
        .await
        .unwrap();
    engine.stop_accepting();
    let refused = engine
        .ingest("inventory", inventory_batch(&["e"]), None)
        .await;
    assert!(matches!(refused, Err(Error::Unavailable { .. })));
    drop(engine);
    let again = Engine::open(config, metrics).await.unwrap();
    let (_, buffered) = stored(&again, "inventory").await;
    assert!(buffered >= 1, "the unflushed event came back from the WAL");
}

#[tokio::test]
async fn a_write_over_the_buffer_bound_waits_for_a_flush_then_is_refused() {
    let wal = tempfile::tempdir().unwrap();
    let mut config = EngineConfig::new("memory://", wal.path());
    config.upkeep_interval = Duration::ZERO;
    config.flush_interval = Duration::from_secs(3600);
    config.max_buffer_bytes = 4096;
    config.ingest_max_wait = Duration::from_millis(300);
    let engine = Engine::open(config, Arc::new(EngineMetrics::unregistered()))
        .await
        .unwrap();
    let ids: Vec<String> = (0..40).map(|i| format!("id-{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut refused = 0;
    for _ in 0..10 {
        let started = std::time::Instant::now();
        if let Err(Error::Unavailable {
            retry_after_secs, ..
        }) = engine
            .ingest("inventory", inventory_batch(&ids), None)
            .await
        {
            // Nothing flushes here: each refusal comes after the whole wait.
            assert!(started.elapsed() >= Duration::from_millis(300));
            assert!(retry_after_secs > 0);
            refused += 1;
        }
    }
    assert!(refused > 0);
    // A write that waits is admitted as soon as a flush frees room.
    let waiting = tokio::spawn({
        let engine = engine.clone();
        let batch = inventory_batch(&ids);
        async move { engine.ingest("inventory", batch, None).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished());
    engine.flush_all().await.unwrap();
    assert!(matches!(
        waiting.await.unwrap(),
        Ok(IngestOutcome::Accepted(40))
    ));
}

#[tokio::test]
async fn queries_read_table_and_buffer_once_each() {
    let wal = tempfile::tempdir().unwrap();
    let mut config = EngineConfig::new("memory://", wal.path());
    config.upkeep_interval = Duration::ZERO;
    config.flush_interval = Duration::from_secs(3600);
    let engine = Engine::open(config, Arc::new(EngineMetrics::unregistered()))
        .await
        .unwrap();
    let count = |engine: Engine| async move {
        two_counts(
            &engine,
            "SELECT COUNT(*), COUNT(DISTINCT event_id) FROM inventory",
        )
        .await
    };
    engine
        .ingest("inventory", inventory_batch(&["a", "b"]), None)
        .await
        .unwrap();
    assert_eq!(count(engine.clone()).await, (2, 2), "buffer only");
    engine.flush_all().await.unwrap();
    engine
        .ingest("inventory", inventory_batch(&["c"]), None)
        .await
        .unwrap();
    assert_eq!(count(engine.clone()).await, (3, 3), "table and buffer");

    // The scan's schema is the query schema of the stored one, so both sides unite.
    let snapshot = engine.read_snapshot("inventory").unwrap();
    let scan = crate::query::delta_scan(&snapshot.table).unwrap();
    let stored = StreamSchema::inventory();
    let scan_schema = datafusion::catalog::TableProvider::schema(&scan);
    let types = |s: &arrow::datatypes::Schema| {
        s.fields()
            .iter()
            .map(|f| (f.name().clone(), f.data_type().clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        types(&scan_schema),
        types(&crate::query::query_schema(stored.stored_schema()))
    );
    assert_eq!(snapshot.buffered.len(), 1);
}

/// Two processes append to one result table at once (a CLI job and a server job both
/// add their `model_runs` row): every row lands, whether the table exists yet or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_from_two_engines_on_one_store_keep_every_row() {
    let store = tempfile::tempdir().unwrap();
    let open = |wal: std::path::PathBuf| {
        let mut config = EngineConfig::new(format!("file://{}", store.path().display()), wal);
        config.upkeep_interval = Duration::ZERO;
        config.views.maintain = false;
        Engine::open(config, Arc::new(EngineMetrics::unregistered()))
    };
    let (wal_a, wal_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = open(wal_a.path().to_path_buf()).await.unwrap();
    let b = open(wal_b.path().to_path_buf()).await.unwrap();
    let schema = Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("run_id", arrow::datatypes::DataType::Utf8, false),
    ]));
    let row = |id: String| {
        RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(StringArray::from(vec![id]))],
        )
        .unwrap()
    };
    let appends = |engine: &Engine, who: &'static str| {
        let engine = engine.clone();
        async move {
            for i in 0..8 {
                engine
                    .append_result_table("model_runs", vec![row(format!("{who}-{i}"))])
                    .await
                    .unwrap_or_else(|e| panic!("{who} append {i}: {e}"));
            }
        }
    };
    // The first appends race to create the table.
    tokio::join!(appends(&a, "a"), appends(&b, "b"));

    let reader = open(tempfile::tempdir().unwrap().keep()).await.unwrap();
    assert_eq!(
        two_counts(
            &reader,
            "SELECT count(*) AS n, count(DISTINCT run_id) AS ids FROM model_runs"
        )
        .await,
        (16, 16)
    );
}
