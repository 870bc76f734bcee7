//! File tools: `quiver generate` writes demo events to files, `quiver load` sends a
//! file to a running server.

use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use arrow::record_batch::RecordBatch;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use quiver_engine::StreamSchema;
use quiver_ingest::Format;
use quiver_ingest::generator::{GeneratedEvent, StreamKind};
use sha2::{Digest, Sha256};
use tracing::info;

use super::{DataArgs, RemoteArgs};

pub(super) fn generate(
    events: usize,
    format: &str,
    out: &Path,
    data: &DataArgs,
) -> anyhow::Result<()> {
    let format: Format = format.parse()?;
    std::fs::create_dir_all(out)?;
    let ext = match format {
        Format::Ndjson | Format::Json => "ndjson",
        Format::Csv => "csv",
        Format::ArrowIpc => "arrow",
    };
    let mut generator = data.generator(50.0);
    let bar = progress(events as u64, "generating");
    let mut writers = Vec::new();
    for kind in [StreamKind::Orders, StreamKind::Inventory] {
        let path = out.join(format!("{}.{ext}", kind.name()));
        let schema = match kind {
            StreamKind::Orders => StreamSchema::orders(),
            StreamKind::Inventory => StreamSchema::inventory(),
        };
        writers.push((kind, FileSink::create(&path, format, &schema)?, path));
    }
    let mut done = 0usize;
    let mut pending = generator.opening_stock();
    while done < events {
        if pending.is_empty() {
            pending = generator.next_events((events - done).min(10_000));
        }
        let take = pending.len().min(events - done);
        let chunk: Vec<GeneratedEvent> = pending.drain(..take).collect();
        for (kind, sink, _) in &mut writers {
            let lines: Vec<&str> = chunk
                .iter()
                .filter(|e| e.stream == *kind)
                .map(|e| e.json.as_str())
                .collect();
            sink.write(&lines)?;
        }
        done += take;
        bar.set_position(done as u64);
    }
    bar.finish_and_clear();
    for (_, sink, path) in writers {
        let n = sink.finish()?;
        println!("{}: {n} events", path.display());
    }
    Ok(())
}

/// Writes generated JSON lines as NDJSON, CSV or Arrow IPC.
#[derive(Debug)]
struct FileSink {
    out: SinkOut,
    schema: StreamSchema,
    events: usize,
}

enum SinkOut {
    Ndjson(BufWriter<std::fs::File>),
    Csv(Box<arrow::csv::Writer<BufWriter<std::fs::File>>>),
    Arrow(Box<arrow::ipc::writer::StreamWriter<BufWriter<std::fs::File>>>),
}

impl std::fmt::Debug for SinkOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ndjson(_) => "ndjson",
            Self::Csv(_) => "csv",
            Self::Arrow(_) => "arrow",
        })
    }
}

impl FileSink {
    fn create(path: &Path, format: Format, schema: &StreamSchema) -> anyhow::Result<Self> {
        let file = BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        );
        let out = match format {
            Format::Ndjson | Format::Json => SinkOut::Ndjson(file),
            Format::Csv => SinkOut::Csv(Box::new(arrow::csv::Writer::new(file))),
            Format::ArrowIpc => SinkOut::Arrow(Box::new(
                arrow::ipc::writer::StreamWriter::try_new(file, schema.input_schema())?,
            )),
        };
        Ok(Self {
            out,
            schema: schema.clone(),
            events: 0,
        })
    }

    fn to_batch(&self, lines: &[&str]) -> anyhow::Result<RecordBatch> {
        let body = lines.join("\n");
        Ok(quiver_ingest::decode(
            &self.schema,
            Format::Ndjson,
            body.as_bytes(),
        )?)
    }

    fn write(&mut self, lines: &[&str]) -> anyhow::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        match &mut self.out {
            SinkOut::Ndjson(w) => {
                for l in lines {
                    w.write_all(l.as_bytes())?;
                    w.write_all(b"\n")?;
                }
            }
            SinkOut::Csv(_) | SinkOut::Arrow(_) => {
                let batch = self.to_batch(lines)?;
                match &mut self.out {
                    SinkOut::Csv(w) => w.write(&batch)?,
                    SinkOut::Arrow(w) => w.write(&batch)?,
                    SinkOut::Ndjson(_) => {}
                }
            }
        }
        self.events += lines.len();
        Ok(())
    }

    fn finish(self) -> anyhow::Result<usize> {
        match self.out {
            SinkOut::Ndjson(mut w) => w.flush()?,
            SinkOut::Csv(w) => w.into_inner().flush()?,
            SinkOut::Arrow(mut w) => w.finish()?,
        }
        Ok(self.events)
    }
}

fn progress(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_owned());
    bar
}

/// One request body and the number of events in it.
type Chunk = (usize, Vec<u8>);

/// Splits a file into request bodies of about `batch` events each.
fn chunks(file: &Path, batch: usize) -> anyhow::Result<(Format, Vec<Chunk>)> {
    let ext = file.extension().and_then(|e| e.to_str()).unwrap_or("");
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    match ext {
        "ndjson" | "jsonl" | "json" => {
            let lines: Vec<&[u8]> = bytes
                .split(|b| *b == b'\n')
                .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
                .collect();
            Ok((
                Format::Ndjson,
                lines
                    .chunks(batch)
                    .map(|c| (c.len(), c.join(&b'\n')))
                    .collect(),
            ))
        }
        "csv" => {
            let mut reader = csv::ReaderBuilder::new().from_reader(bytes.as_slice());
            let header = reader.byte_headers()?.clone();
            let mut out = Vec::new();
            let mut w = csv::Writer::from_writer(Vec::new());
            w.write_byte_record(&header)?;
            let mut n = 0;
            for rec in reader.byte_records() {
                w.write_byte_record(&rec?)?;
                n += 1;
                if n == batch {
                    out.push((n, w.into_inner()?));
                    w = csv::Writer::from_writer(Vec::new());
                    w.write_byte_record(&header)?;
                    n = 0;
                }
            }
            if n > 0 {
                out.push((n, w.into_inner()?));
            }
            Ok((Format::Csv, out))
        }
        "arrow" | "arrows" | "ipc" => {
            let reader =
                arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
            let schema = reader.schema();
            let mut out = Vec::new();
            for b in reader {
                let b = b?;
                let mut offset = 0;
                while offset < b.num_rows() {
                    let len = batch.min(b.num_rows() - offset);
                    let slice = b.slice(offset, len);
                    let mut buf = Vec::new();
                    let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut buf, &schema)?;
                    w.write(&slice)?;
                    w.finish()?;
                    drop(w);
                    out.push((len, buf));
                    offset += len;
                }
            }
            Ok((Format::ArrowIpc, out))
        }
        other => bail!(
            "cannot tell the format of '{}' (extension '{other}'): use .ndjson, .csv or .arrow",
            file.display()
        ),
    }
}

pub(super) async fn load(
    file: &Path,
    stream: &str,
    batch: usize,
    concurrency: usize,
    remote: &RemoteArgs,
) -> anyhow::Result<()> {
    let token = remote.token()?;
    let (format, bodies) = chunks(file, batch)?;
    let total: usize = bodies.iter().map(|(n, _)| n).sum();
    let file_id = hex::encode(&Sha256::digest(file.display().to_string().as_bytes())[..8]);
    let bar = progress(total as u64, "loading");
    let client = reqwest::Client::new();
    let url = remote.endpoint(&format!("v1/streams/{stream}/events"));
    let client = Arc::new(client);
    let mut results = futures::stream::iter(bodies.into_iter().enumerate())
        .map(|(i, (n, body))| {
            let client = Arc::clone(&client);
            let url = url.clone();
            let token = token.clone();
            // A stable key per chunk: re-running a load stores nothing twice.
            let key = format!("load-{file_id}-{i}");
            async move {
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    let resp = client
                        .post(&url)
                        .bearer_auth(&token)
                        .header("content-type", format.content_type())
                        .header("idempotency-key", &key)
                        .body(body.clone())
                        .send()
                        .await;
                    match resp {
                        Ok(r) if r.status().is_success() => return Ok(n),
                        Ok(r) if r.status().as_u16() == 503 || r.status().as_u16() == 429 => {}
                        Ok(r) => {
                            let status = r.status();
                            let text = r.text().await.unwrap_or_default();
                            bail!("chunk {i} refused ({status}): {text}");
                        }
                        Err(e) if attempt >= 5 => return Err(e.into()),
                        Err(_) => {}
                    }
                    if attempt >= 30 {
                        bail!("chunk {i}: server kept refusing");
                    }
                    tokio::time::sleep(Duration::from_millis(200 * attempt.min(10))).await;
                }
            }
        })
        .buffer_unordered(concurrency);
    let started = Instant::now();
    let mut sent = 0usize;
    while let Some(r) = results.next().await {
        sent += r?;
        bar.set_position(sent as u64);
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "loaded {sent} events into '{stream}' in {secs:.1}s ({:.0} events/s)",
        sent as f64 / secs.max(1e-9)
    );
    info!(sent, stream, "load finished");
    Ok(())
}
