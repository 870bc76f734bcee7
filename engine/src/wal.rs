//! Write-ahead log: acknowledged events are on disk here before the producer hears 200.
//!
//! The log is a folder of segment files named by the sequence number of their first
//! record. A record is framed as `len: u32 | crc32(payload): u32 | payload`, and the
//! payload is `seq: u64 | stream | idempotency key | fingerprint | Arrow IPC stream`.
//! One writer thread owns the open segment: it takes every append that is waiting,
//! writes them with one `write`, calls `fdatasync` once (group commit), hands the records
//! to a [`DurableSink`] in sequence order and only then answers the callers.
//!
//! On open the log is replayed. A record whose length or checksum does not hold (a torn
//! write, a flipped bit) ends its segment: the file is truncated there and the fault is
//! logged. Segments are deleted once every stream has committed past their records.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::durable_file::sync_dir;
use crate::metrics::EngineMetrics;
use crate::{Error, Result};

const HEADER_LEN: usize = 8;
const SEGMENT_SUFFIX: &str = ".wal";
/// Largest record the format can hold and replay will read: the length is a `u32`, and
/// a larger length read back is taken for garbage (a torn header), not an allocation.
/// [`WalOptions::max_record_bytes`] may only lower it.
pub const MAX_RECORD_LEN: usize = 1 << 30;

/// One record as the log stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalRecord {
    /// Position in the log; strictly increasing.
    pub seq: u64,
    /// Stream the events belong to.
    pub stream: String,
    /// The request's `Idempotency-Key`, if any.
    pub idempotency_key: Option<String>,
    /// Hash of the request body, to tell a retry from a different request reusing a key.
    pub fingerprint: String,
    /// The events, as an Arrow IPC stream.
    pub data: Bytes,
}

impl WalRecord {
    fn encode_payload(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.seq.to_le_bytes());
        put_str(out, &self.stream);
        put_str(out, self.idempotency_key.as_deref().unwrap_or(""));
        put_str(out, &self.fingerprint);
        out.extend_from_slice(&self.data);
    }

    fn decode_payload(payload: &[u8]) -> Option<Self> {
        let mut rest = payload;
        let seq = u64::from_le_bytes(take(&mut rest, 8)?.try_into().ok()?);
        let stream = take_str(&mut rest)?;
        let key = take_str(&mut rest)?;
        let fingerprint = take_str(&mut rest)?;
        Some(Self {
            seq,
            stream,
            idempotency_key: (!key.is_empty()).then_some(key),
            fingerprint,
            data: Bytes::copy_from_slice(rest),
        })
    }

    /// Frames the record: header plus payload.
    fn frame(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; HEADER_LEN]);
        self.encode_payload(out);
        let payload = &out[start + HEADER_LEN..];
        let len = payload.len() as u32;
        let crc = crc32fast::hash(payload);
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if rest.len() < n {
        return None;
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Some(head)
}

fn take_str(rest: &mut &[u8]) -> Option<String> {
    let len = u32::from_le_bytes(take(rest, 4)?.try_into().ok()?) as usize;
    String::from_utf8(take(rest, len)?.to_vec()).ok()
}

/// Receives records once they are durable, in sequence order, before callers are answered.
pub trait DurableSink: Send + Sync + std::fmt::Debug {
    /// Called by the writer thread with each group of durable records and their decoded
    /// batches (same order, same length).
    fn on_durable(&self, records: &[WalRecord], batches: Vec<RecordBatch>);
}

/// Tuning for the log.
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// Segment size after which a new segment is started.
    pub segment_bytes: u64,
    /// Most bytes written in one group commit.
    pub max_group_bytes: usize,
    /// Call fsync (off only for benchmarks that measure everything but the disk).
    pub fsync: bool,
    /// Largest record an append may write, at most [`MAX_RECORD_LEN`]. A larger one is
    /// refused before anything is written: it could not be read back.
    pub max_record_bytes: usize,
}

impl Default for WalOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            max_group_bytes: 16 << 20,
            fsync: true,
            max_record_bytes: MAX_RECORD_LEN,
        }
    }
}

/// What an append carries in: everything but the sequence number.
#[derive(Debug)]
pub struct WalAppend {
    /// Stream name.
    pub stream: String,
    /// Idempotency key of the request, if any.
    pub idempotency_key: Option<String>,
    /// Body fingerprint.
    pub fingerprint: String,
    /// Arrow IPC stream bytes.
    pub data: Bytes,
    /// The same events, decoded, for the sink.
    pub batch: RecordBatch,
}

impl WalAppend {
    /// Bytes of the record's payload once framed (what the header's length counts).
    pub fn payload_len(&self) -> usize {
        8 + 4
            + self.stream.len()
            + 4
            + self.idempotency_key.as_deref().map_or(0, str::len)
            + 4
            + self.fingerprint.len()
            + self.data.len()
    }
}

struct Pending {
    append: WalAppend,
    reply: oneshot::Sender<Result<u64>>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("stream", &self.append.stream)
            .finish()
    }
}

/// Per-segment bookkeeping: the highest sequence number each stream has in it.
#[derive(Debug, Default, Clone)]
struct SegmentInfo {
    path: PathBuf,
    max_seq_by_stream: HashMap<String, u64>,
    /// Whether any record in it carries an idempotency key.
    has_keys: bool,
}

#[derive(Debug, Default)]
struct Segments {
    /// Keyed by first sequence number.
    by_first_seq: BTreeMap<u64, SegmentInfo>,
    /// First sequence number of the segment being written.
    active: u64,
}

/// Handle to the log: appends go to the writer thread.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    max_record_bytes: usize,
    tx: mpsc::Sender<Pending>,
    segments: Arc<Mutex<Segments>>,
}

/// What [`Wal::open`] found on disk.
#[derive(Debug)]
pub struct Replay {
    /// Every intact record, in sequence order.
    pub records: Vec<WalRecord>,
    /// Records dropped because their segment had a bad tail (count of truncations).
    pub truncations: usize,
}

impl Wal {
    /// Opens (or creates) the log in `dir`, replays it, and starts the writer thread.
    ///
    /// `min_next_seq` is a floor for the next sequence number (the highest position any
    /// table has committed, plus one), so that numbers are never reused even when every
    /// segment has been deleted.
    pub fn open(
        dir: &Path,
        options: WalOptions,
        min_next_seq: u64,
        sink: Arc<dyn DurableSink>,
        metrics: Arc<EngineMetrics>,
    ) -> Result<(Self, Replay)> {
        if options.max_record_bytes == 0 || options.max_record_bytes > MAX_RECORD_LEN {
            return Err(Error::Config(format!(
                "the largest WAL record must be between 1 and {MAX_RECORD_LEN} bytes, not {}",
                options.max_record_bytes
            )));
        }
        fs::create_dir_all(dir)?;
        let (replay, mut segments) = replay_dir(dir)?;
        let last_seq = replay.records.last().map(|r| r.seq).unwrap_or(0);
        let last_named = segments
            .by_first_seq
            .keys()
            .next_back()
            .copied()
            .unwrap_or(1);
        let next_seq = (last_seq + 1).max(last_named).max(min_next_seq).max(1);

        // Always write into a fresh segment after a restart: the old tail may have been
        // truncated, and a new file keeps the framing of every segment simple.
        let (file, path) = create_segment(dir, next_seq)?;
        segments.by_first_seq.insert(
            next_seq,
            SegmentInfo {
                path,
                ..SegmentInfo::default()
            },
        );
        segments.active = next_seq;
        let segments = Arc::new(Mutex::new(segments));

        let (tx, rx) = mpsc::channel(8192);
        let max_record_bytes = options.max_record_bytes;
        let writer = Writer {
            dir: dir.to_owned(),
            file,
            written: 0,
            next_seq,
            options,
            segments: Arc::clone(&segments),
            sink,
            metrics,
        };
        std::thread::Builder::new()
            .name("quiver-wal".into())
            .spawn(move || writer.run(rx))?;
        Ok((
            Self {
                dir: dir.to_owned(),
                max_record_bytes,
                tx,
                segments,
            },
            replay,
        ))
    }

    /// Appends a record and waits until it is durable; returns its sequence number.
    ///
    /// A record larger than [`WalOptions::max_record_bytes`] is refused with
    /// [`Error::TooLarge`] and nothing is written.
    pub async fn append(&self, append: WalAppend) -> Result<u64> {
        let len = append.payload_len();
        if len > self.max_record_bytes {
            return Err(Error::TooLarge {
                what: format!("the events for stream '{}'", append.stream),
                bytes: len,
                limit: self.max_record_bytes,
            });
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending { append, reply })
            .await
            .map_err(|_| Error::Wal("the log writer has stopped".into()))?;
        rx.await
            .map_err(|_| Error::Wal("the log writer stopped before answering".into()))?
    }

    /// Deletes every closed segment all of whose records are committed, as told by
    /// `committed` (stream → highest committed sequence number). `save_keys` runs once,
    /// only when a segment holding idempotency keys is about to go, to save what only
    /// the segments remembered; if it fails, segments with keys are kept and the rest
    /// are still deleted (so a full disk can free itself). Returns how many went.
    pub fn truncate(
        &self,
        committed: &HashMap<String, u64>,
        save_keys: impl FnOnce() -> Result<()>,
    ) -> Result<usize> {
        let mut victims: Vec<(u64, PathBuf, bool)> = {
            let segs = self.segments.lock();
            segs.by_first_seq
                .iter()
                .filter(|(first, _)| **first != segs.active)
                .filter(|(_, info)| {
                    info.max_seq_by_stream
                        .iter()
                        .all(|(stream, max)| committed.get(stream).is_some_and(|c| c >= max))
                })
                .map(|(first, info)| (*first, info.path.clone(), info.has_keys))
                .collect()
        };
        if victims.iter().any(|(_, _, keys)| *keys)
            && let Err(e) = save_keys()
        {
            warn!(error = %e, "could not save idempotency keys; keeping the log segments that hold them");
            victims.retain(|(_, _, keys)| !keys);
        }
        if victims.is_empty() {
            return Ok(0);
        }
        for (first, path, _) in &victims {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            self.segments.lock().by_first_seq.remove(first);
        }
        sync_dir(&self.dir)?;
        Ok(victims.len())
    }

    /// Number of segment files, the active one included.
    pub fn segment_count(&self) -> usize {
        self.segments.lock().by_first_seq.len()
    }
}

struct Writer {
    dir: PathBuf,
    file: File,
    written: u64,
    next_seq: u64,
    options: WalOptions,
    segments: Arc<Mutex<Segments>>,
    sink: Arc<dyn DurableSink>,
    metrics: Arc<EngineMetrics>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Pending>) {
        let mut buf = Vec::with_capacity(1 << 20);
        while let Some(first) = rx.blocking_recv() {
            let mut group = vec![first];
            let mut bytes = group[0].append.data.len();
            while bytes < self.options.max_group_bytes {
                match rx.try_recv() {
                    Ok(p) => {
                        bytes += p.append.data.len();
                        group.push(p);
                    }
                    Err(_) => break,
                }
            }
            self.commit_group(group, &mut buf);
        }
        info!("write-ahead log writer stopped");
    }

    fn commit_group(&mut self, group: Vec<Pending>, buf: &mut Vec<u8>) {
        buf.clear();
        let mut records = Vec::with_capacity(group.len());
        let mut replies = Vec::with_capacity(group.len());
        let mut batches = Vec::with_capacity(group.len());
        for (i, p) in group.into_iter().enumerate() {
            batches.push(p.append.batch);
            let record = WalRecord {
                seq: self.next_seq + i as u64,
                stream: p.append.stream,
                idempotency_key: p.append.idempotency_key,
                fingerprint: p.append.fingerprint,
                data: p.append.data,
            };
            record.frame(buf);
            records.push(record);
            replies.push(p.reply);
        }
        match self.write_durably(buf) {
            Ok(()) => {
                self.next_seq += records.len() as u64;
                {
                    let mut segs = self.segments.lock();
                    let active = segs.active;
                    if let Some(info) = segs.by_first_seq.get_mut(&active) {
                        for r in &records {
                            info.max_seq_by_stream.insert(r.stream.clone(), r.seq);
                            info.has_keys |= r.idempotency_key.is_some();
                        }
                    }
                }
                self.sink.on_durable(&records, batches);
                if self.written >= self.options.segment_bytes
                    && let Err(e) = self.rotate()
                {
                    error!(error = %e, "could not start a new log segment; continuing in the current one");
                }
                for (record, reply) in records.iter().zip(replies) {
                    let _ = reply.send(Ok(record.seq));
                }
            }
            Err(e) => {
                let disk_full = matches!(&e, Error::Io(io) if Error::is_disk_full(io));
                error!(error = %e, disk_full, "write-ahead log append failed; nothing of the group was acknowledged");
                for reply in replies {
                    let err = if disk_full {
                        Error::Unavailable {
                            reason: "the write-ahead log disk is full".into(),
                            retry_after_secs: 5,
                        }
                    } else {
                        Error::Wal(e.to_string())
                    };
                    let _ = reply.send(Err(err));
                }
            }
        }
    }

    /// Writes `buf` at the end of the segment and syncs it; on failure the segment is cut
    /// back to where it was, so a partial group never survives.
    fn write_durably(&mut self, buf: &[u8]) -> Result<()> {
        let before = self.written;
        let started = Instant::now();
        let result = self.file.write_all(buf).and_then(|()| {
            if self.options.fsync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        match result {
            Ok(()) => {
                self.written += buf.len() as u64;
                self.metrics
                    .wal_fsync_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.metrics.wal_bytes_total.inc_by(buf.len() as u64);
                Ok(())
            }
            Err(e) => {
                if let Err(cut) = self.file.set_len(before) {
                    error!(error = %cut, "could not cut the log back after a failed write");
                }
                let _ = self.file.sync_data();
                // Keep the cursor at the cut point for the next append.
                let _ = std::io::Seek::seek(&mut self.file, std::io::SeekFrom::Start(before));
                Err(e.into())
            }
        }
    }

    fn rotate(&mut self) -> Result<()> {
        let (file, path) = create_segment(&self.dir, self.next_seq)?;
        self.file = file;
        self.written = 0;
        let mut segs = self.segments.lock();
        segs.by_first_seq.insert(
            self.next_seq,
            SegmentInfo {
                path,
                ..SegmentInfo::default()
            },
        );
        segs.active = self.next_seq;
        Ok(())
    }
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SEGMENT_SUFFIX}")
}

fn create_segment(dir: &Path, first_seq: u64) -> Result<(File, PathBuf)> {
    let path = dir.join(segment_name(first_seq));
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(&path)?;
    file.sync_all()?;
    sync_dir(dir)?;
    Ok((file, path))
}

fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX) else {
            continue;
        };
        if let Ok(first) = stem.parse::<u64>() {
            out.push((first, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Reads every segment; truncates a segment at its first bad record.
fn replay_dir(dir: &Path) -> Result<(Replay, Segments)> {
    let listed = list_segments(dir)?;
    let count = listed.len();
    let mut records = Vec::new();
    let mut truncations = 0;
    let mut segments = Segments::default();
    let mut last_seq = 0u64;
    for (i, (first, path)) in listed.into_iter().enumerate() {
        let mut bytes = Vec::new();
        File::open(&path)?.read_to_end(&mut bytes)?;
        let mut info = SegmentInfo {
            path: path.clone(),
            ..SegmentInfo::default()
        };
        let mut offset = 0usize;
        let mut bad: Option<&'static str> = None;
        while offset < bytes.len() {
            match read_record(&bytes[offset..]) {
                Ok((record, used)) => {
                    if record.seq <= last_seq {
                        bad = Some("sequence number went backwards");
                        break;
                    }
                    last_seq = record.seq;
                    info.max_seq_by_stream
                        .insert(record.stream.clone(), record.seq);
                    info.has_keys |= record.idempotency_key.is_some();
                    records.push(record);
                    offset += used;
                }
                Err(reason) => {
                    bad = Some(reason);
                    break;
                }
            }
        }
        if let Some(reason) = bad {
            truncations += 1;
            let dropped = bytes.len() - offset;
            if i + 1 == count {
                warn!(segment = %path.display(), offset, dropped, reason, "truncating torn tail of the write-ahead log");
            } else {
                error!(segment = %path.display(), offset, dropped, reason, "corrupt record inside the write-ahead log; truncating that segment");
            }
            let file = OpenOptions::new().write(true).open(&path)?;
            file.set_len(offset as u64)?;
            file.sync_all()?;
        }
        segments.by_first_seq.insert(first, info);
    }
    Ok((
        Replay {
            records,
            truncations,
        },
        segments,
    ))
}

/// Parses one framed record from the front of `bytes`.
fn read_record(bytes: &[u8]) -> std::result::Result<(WalRecord, usize), &'static str> {
    if bytes.len() < HEADER_LEN {
        return Err("partial record header");
    }
    let len = u32::from_le_bytes(bytes[0..4].try_into().map_err(|_| "header")?) as usize;
    let crc = u32::from_le_bytes(bytes[4..8].try_into().map_err(|_| "header")?);
    if len == 0 || len > MAX_RECORD_LEN {
        return Err("impossible record length");
    }
    if bytes.len() < HEADER_LEN + len {
        return Err("partial record");
    }
    let payload = &bytes[HEADER_LEN..HEADER_LEN + len];
    if crc32fast::hash(payload) != crc {
        return Err("checksum mismatch");
    }
    let record = WalRecord::decode_payload(payload).ok_or("malformed payload")?;
    Ok((record, HEADER_LEN + len))
}

#[cfg(test)]
mod tests;
