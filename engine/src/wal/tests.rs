use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::Int64Array;
use arrow::datatypes::{DataType, Field, Schema};
use parking_lot::Mutex;

use super::*;

#[derive(Debug, Default)]
struct Collect(Mutex<Vec<u64>>);

impl DurableSink for Collect {
    fn on_durable(&self, records: &[WalRecord], batches: Vec<RecordBatch>) {
        assert_eq!(records.len(), batches.len());
        self.0.lock().extend(records.iter().map(|r| r.seq));
    }
}

fn batch(v: i64) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
    RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![v]))]).unwrap()
}

fn append_of(stream: &str, v: i64) -> WalAppend {
    WalAppend {
        stream: stream.into(),
        idempotency_key: (v % 2 == 0).then(|| format!("key-{v}")),
        fingerprint: format!("fp-{v}"),
        data: Bytes::from(format!("payload-{v}").repeat(10)),
        batch: batch(v),
    }
}

fn open(dir: &Path, options: WalOptions) -> (Wal, Replay, Arc<Collect>) {
    let sink = Arc::new(Collect::default());
    let (wal, replay) = Wal::open(
        dir,
        options,
        1,
        Arc::clone(&sink) as Arc<dyn DurableSink>,
        Arc::new(EngineMetrics::unregistered()),
    )
    .unwrap();
    (wal, replay, sink)
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    list_segments(dir)
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

#[tokio::test]
async fn appends_replay_in_order_with_their_contents() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, replay, sink) = open(dir.path(), WalOptions::default());
    assert!(replay.records.is_empty());
    let mut seqs = Vec::new();
    for v in 0..20 {
        seqs.push(wal.append(append_of("orders", v)).await.unwrap());
    }
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    assert_eq!(*sink.0.lock(), seqs);
    drop(wal);

    let (_wal, replay, _) = open(dir.path(), WalOptions::default());
    assert_eq!(replay.truncations, 0);
    assert_eq!(replay.records.len(), 20);
    let r = &replay.records[4];
    assert_eq!(r.seq, 5);
    assert_eq!(r.stream, "orders");
    assert_eq!(r.idempotency_key.as_deref(), Some("key-4"));
    assert_eq!(r.fingerprint, "fp-4");
    assert_eq!(r.data, Bytes::from("payload-4".repeat(10)));
    assert_eq!(replay.records[5].idempotency_key, None);
}

#[tokio::test]
async fn concurrent_appends_get_unique_increasing_positions() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _, sink) = open(dir.path(), WalOptions::default());
    let wal = Arc::new(wal);
    let mut handles = Vec::new();
    for t in 0..8 {
        let wal = Arc::clone(&wal);
        handles.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..50 {
                got.push(
                    wal.append(append_of("inventory", t * 100 + i))
                        .await
                        .unwrap(),
                );
            }
            got
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    all.sort();
    assert_eq!(all, (1..=400).collect::<Vec<_>>());
    // The sink saw them in sequence order.
    let seen = sink.0.lock().clone();
    assert!(seen.windows(2).all(|w| w[0] < w[1]));
}

#[tokio::test]
async fn torn_tail_is_truncated_and_logging_continues() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (wal, _, _) = open(dir.path(), WalOptions::default());
        for v in 0..5 {
            wal.append(append_of("orders", v)).await.unwrap();
        }
    }
    let seg = segment_files(dir.path()).pop().unwrap();
    let len = fs::metadata(&seg).unwrap().len();
    // Cut the last record in half, as a crash mid-write would.
    let f = OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len - 20).unwrap();
    drop(f);

    let (wal, replay, _) = open(dir.path(), WalOptions::default());
    assert_eq!(replay.truncations, 1);
    assert_eq!(
        replay.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    // The torn bytes are gone from the file.
    assert!(fs::metadata(&seg).unwrap().len() < len - 20);
    // New appends continue after the last intact record and survive another restart.
    let seq = wal.append(append_of("orders", 99)).await.unwrap();
    assert_eq!(seq, 5);
    drop(wal);
    let (_wal, replay, _) = open(dir.path(), WalOptions::default());
    assert_eq!(replay.truncations, 0);
    assert_eq!(
        replay.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
}

#[tokio::test]
async fn flipped_bit_is_caught_by_the_checksum() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (wal, _, _) = open(dir.path(), WalOptions::default());
        for v in 0..3 {
            wal.append(append_of("orders", v)).await.unwrap();
        }
    }
    let seg = segment_files(dir.path()).pop().unwrap();
    let mut bytes = fs::read(&seg).unwrap();
    let one = bytes.len() / 3;
    // A bit in the second record's payload.
    bytes[one + HEADER_LEN + 12] ^= 0x10;
    fs::write(&seg, &bytes).unwrap();

    let (_wal, replay, _) = open(dir.path(), WalOptions::default());
    assert_eq!(replay.truncations, 1);
    assert_eq!(replay.records.len(), 1);
    assert_eq!(replay.records[0].seq, 1);
}

#[tokio::test]
async fn garbage_length_does_not_allocate_or_panic() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join(segment_name(1)),
        [0xff, 0xff, 0xff, 0x7f, 1, 2, 3, 4, 5, 6],
    )
    .unwrap();
    let (_wal, replay, _) = open(dir.path(), WalOptions::default());
    assert_eq!(replay.truncations, 1);
    assert!(replay.records.is_empty());
}

#[tokio::test]
async fn empty_segments_are_harmless() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(segment_name(1)), b"").unwrap();
    let (wal, replay, _) = open(dir.path(), WalOptions::default());
    assert_eq!(replay.truncations, 0);
    assert!(replay.records.is_empty());
    assert_eq!(wal.append(append_of("orders", 1)).await.unwrap(), 1);
}

#[tokio::test]
async fn truncation_deletes_only_committed_segments_and_positions_never_repeat() {
    let dir = tempfile::tempdir().unwrap();
    let small = WalOptions {
        segment_bytes: 200,
        ..WalOptions::default()
    };
    {
        let (wal, _, _) = open(dir.path(), small.clone());
        for v in 0..10 {
            let stream = if v % 3 == 0 { "inventory" } else { "orders" };
            wal.append(append_of(stream, v)).await.unwrap();
        }
        let before = wal.segment_count();
        assert!(before >= 5, "small segments rotate: {before}");
        // orders committed through 8, inventory only through 4: the segment holding
        // inventory seq 7 and everything after it must stay.
        let committed = HashMap::from([("orders".to_owned(), 8), ("inventory".to_owned(), 4)]);
        let mut saved = false;
        let deleted = wal
            .truncate(&committed, || {
                saved = true;
                Ok(())
            })
            .unwrap();
        assert!(saved);
        assert!(deleted > 0);
        assert_eq!(wal.segment_count(), before - deleted);
    }
    let (wal, replay, _) = open(dir.path(), small);
    let seqs: Vec<u64> = replay.records.iter().map(|r| r.seq).collect();
    assert!(
        seqs.contains(&7),
        "uncommitted inventory record kept: {seqs:?}"
    );
    assert!(seqs.contains(&10));
    assert!(!seqs.contains(&1));
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(wal.append(append_of("orders", 11)).await.unwrap(), 11);
}

#[tokio::test]
async fn next_position_respects_the_committed_floor() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(Collect::default());
    let (wal, _) = Wal::open(
        dir.path(),
        WalOptions::default(),
        500,
        sink as Arc<dyn DurableSink>,
        Arc::new(EngineMetrics::unregistered()),
    )
    .unwrap();
    assert_eq!(wal.append(append_of("orders", 1)).await.unwrap(), 500);
}

#[tokio::test]
async fn segments_with_keys_stay_when_keys_cannot_be_saved() {
    let dir = tempfile::tempdir().unwrap();
    let small = WalOptions {
        segment_bytes: 1,
        ..WalOptions::default()
    };
    let (wal, _, _) = open(dir.path(), small);
    // One record per segment: odd values carry no key, even values do.
    for v in 1..=4 {
        wal.append(append_of("orders", v)).await.unwrap();
    }
    let committed = HashMap::from([("orders".to_owned(), 4)]);
    let deleted = wal
        .truncate(&committed, || Err(Error::Wal("disk full".into())))
        .unwrap();
    assert_eq!(deleted, 2, "only the two key-less segments go");
    drop(wal);
    let (_wal, replay, _) = open(dir.path(), WalOptions::default());
    let kept: Vec<_> = replay.records.iter().map(|r| r.seq).collect();
    assert_eq!(kept, vec![2, 4]);
}

#[tokio::test]
async fn replayed_segments_remember_that_they_hold_keys() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (wal, _, _) = open(dir.path(), WalOptions::default());
        wal.append(append_of("orders", 2)).await.unwrap();
    }
    let (wal, _, _) = open(dir.path(), WalOptions::default());
    let committed = HashMap::from([("orders".to_owned(), 1)]);
    let mut saved = false;
    let deleted = wal
        .truncate(&committed, || {
            saved = true;
            Ok(())
        })
        .unwrap();
    assert_eq!(deleted, 1);
    assert!(
        saved,
        "the keys of a replayed segment are saved before it goes"
    );
}

/// The on-disk record layout is a persisted format: this pins it byte for byte.
#[test]
fn record_layout_is_stable() {
    let record = WalRecord {
        seq: 7,
        stream: "orders".into(),
        idempotency_key: Some("k".into()),
        fingerprint: "fp".into(),
        data: Bytes::from_static(b"IPC"),
    };
    let mut framed = Vec::new();
    record.frame(&mut framed);
    assert_eq!(
        hex::encode(&framed),
        "20000000\
         df5f1aa7\
         0700000000000000\
         060000006f7264657273\
         010000006b\
         020000006670\
         495043"
            .replace(' ', ""),
    );
    let (back, used) = read_record(&framed).unwrap();
    assert_eq!(back, record);
    assert_eq!(used, framed.len());
}

/// Property: whatever single damage a crash or a bad disk does to the end of the log
/// (a cut anywhere, a flipped bit anywhere), replay returns exactly the records that lie
/// wholly before the damage, in order, and never panics.
#[tokio::test]
async fn replay_after_random_damage_is_the_intact_prefix() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    for case in 0..60 {
        let dir = tempfile::tempdir().unwrap();
        let count = rng.random_range(1..12);
        let mut written = Vec::new();
        {
            let (wal, _, _) = open(dir.path(), WalOptions::default());
            for v in 0..count {
                let stream = if rng.random_bool(0.5) {
                    "orders"
                } else {
                    "inventory"
                };
                let seq = wal.append(append_of(stream, v)).await.unwrap();
                written.push((
                    seq,
                    stream.to_owned(),
                    Bytes::from(format!("payload-{v}").repeat(10)),
                ));
            }
        }
        let seg = segment_files(dir.path()).into_iter().next().unwrap();
        let mut bytes = fs::read(&seg).unwrap();
        // Record boundaries, to know which records the damage leaves whole.
        let mut ends = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let (_, used) = read_record(&bytes[at..]).unwrap();
            at += used;
            ends.push(at);
        }
        let damage_at = rng.random_range(0..bytes.len());
        if rng.random_bool(0.5) {
            bytes.truncate(damage_at);
        } else {
            bytes[damage_at] ^= 1 << rng.random_range(0..8);
        }
        fs::write(&seg, &bytes).unwrap();
        let intact = ends.iter().filter(|end| **end <= damage_at).count();

        let (_wal, replay, _) = open(dir.path(), WalOptions::default());
        let got: Vec<(u64, String, Bytes)> = replay
            .records
            .iter()
            .map(|r| (r.seq, r.stream.clone(), r.data.clone()))
            .collect();
        assert_eq!(
            got,
            written[..intact].to_vec(),
            "case {case}: damage at byte {damage_at}"
        );
    }
}

#[tokio::test]
async fn a_record_over_the_limit_is_refused_before_it_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 4096;
    let options = WalOptions {
        max_record_bytes: limit,
        ..WalOptions::default()
    };
    let sized = |payload: usize| {
        let mut a = append_of("orders", 1);
        a.idempotency_key = None;
        let overhead = a.payload_len() - a.data.len();
        a.data = Bytes::from(vec![7u8; payload - overhead]);
        assert_eq!(a.payload_len(), payload);
        a
    };
    {
        let (wal, _, sink) = open(dir.path(), options.clone());
        assert_eq!(wal.append(sized(limit)).await.unwrap(), 1);
        let err = wal.append(sized(limit + 1)).await.unwrap_err();
        assert!(
            matches!(err, Error::TooLarge { bytes, limit: l, .. } if bytes == limit + 1 && l == limit),
            "{err}"
        );
        assert!(err.to_string().contains("4096-byte limit"), "{err}");
        assert!(err.is_user_error());
        // Nothing of the refused record reached the sink or the disk; the next record
        // takes the next position.
        assert_eq!(*sink.0.lock(), vec![1]);
        assert_eq!(wal.append(sized(100)).await.unwrap(), 2);
    }
    let (_, replay, _) = open(dir.path(), options);
    assert_eq!(replay.truncations, 0);
    let lens: Vec<usize> = replay.records.iter().map(|r| r.data.len()).collect();
    assert_eq!(replay.records.len(), 2, "{lens:?}");
    assert_eq!(replay.records[0].seq, 1);
    assert_eq!(replay.records[1].seq, 2);
}

#[test]
fn the_record_limit_cannot_exceed_what_replay_reads() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(Collect::default());
    for bad in [0, MAX_RECORD_LEN + 1] {
        let options = WalOptions {
            max_record_bytes: bad,
            ..WalOptions::default()
        };
        let err = Wal::open(
            dir.path(),
            options,
            1,
            Arc::clone(&sink) as Arc<dyn DurableSink>,
            Arc::new(EngineMetrics::unregistered()),
        )
        .unwrap_err();
        assert!(err.to_string().contains("largest WAL record"), "{err}");
    }
}
