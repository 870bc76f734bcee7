//! Fetching one large result over each SQL surface, in the same run: Arrow Flight SQL,
//! the Postgres wire protocol (tokio-postgres, binary rows) and `POST /v1/sql` with
//! `format=arrow`. Each client reads every row (Flight and HTTP decode Arrow batches;
//! Postgres receives every data row), and the driver prints rows/s per surface.
//!
//!   fetch-bench --url http://127.0.0.1:18091 --pg-port 15433 --flight-port 15051 \
//!     --token T --sql "SELECT * FROM orders LIMIT 5000000" --rounds 3

use std::time::Instant;

use anyhow::{Context as _, bail};
use arrow::ipc::reader::StreamReader;
use arrow_flight::sql::client::FlightSqlServiceClient;
use clap::Parser;
use futures::{StreamExt, TryStreamExt};

#[derive(Debug, Parser)]
struct Args {
    /// Server URL (HTTP).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Postgres wire port.
    #[arg(long, default_value_t = 5433)]
    pg_port: u16,
    /// Flight SQL port.
    #[arg(long, default_value_t = 50051)]
    flight_port: u16,
    /// Token (read scope).
    #[arg(long)]
    token: String,
    /// The query to fetch.
    #[arg(long)]
    sql: String,
    /// Fetches per surface (the best and the median are printed).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    type Fetch = fn(&Args) -> futures::future::BoxFuture<'_, anyhow::Result<u64>>;
    let surfaces: [(&str, Fetch); 3] = [
        ("Flight SQL", |a| Box::pin(flight(a))),
        ("Postgres wire", |a| Box::pin(pg(a))),
        ("HTTP arrow", |a| Box::pin(http_arrow(a))),
    ];
    println!("query: {}", args.sql);
    for round in 1..=args.rounds {
        for (name, fetch) in &surfaces {
            let started = Instant::now();
            let rows = fetch(&args).await.with_context(|| name.to_string())?;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "round {round}  {name:<14} {rows:>10} rows in {secs:>7.2} s = {:>12.0} rows/s",
                rows as f64 / secs
            );
        }
    }
    Ok(())
}

async fn flight(args: &Args) -> anyhow::Result<u64> {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", args.flight_port))?
            .connect()
            .await?;
    let mut client = FlightSqlServiceClient::new(channel);
    client.set_token(args.token.clone());
    let info = client.execute(args.sql.clone(), None).await?;
    let mut rows = 0u64;
    for endpoint in info.endpoint {
        let ticket = endpoint.ticket.context("an endpoint without a ticket")?;
        let mut stream = client.do_get(ticket).await?;
        while let Some(batch) = stream.try_next().await? {
            rows += batch.num_rows() as u64;
        }
    }
    Ok(rows)
}

async fn pg(args: &Args) -> anyhow::Result<u64> {
    let config = format!(
        "host=127.0.0.1 port={} user=bench dbname=quiver password={}",
        args.pg_port, args.token
    );
    let (client, connection) = tokio_postgres::connect(&config, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let params: [&str; 0] = [];
    let stream = client.query_raw(&args.sql, params).await?;
    futures::pin_mut!(stream);
    let mut rows = 0u64;
    while let Some(row) = stream.next().await {
        let row = row?;
        // Touch the row so it is not optimised into a count of messages.
        if row.is_empty() {
            bail!("an empty row");
        }
        rows += 1;
    }
    Ok(rows)
}

async fn http_arrow(args: &Args) -> anyhow::Result<u64> {
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/v1/sql?format=arrow",
            args.url.trim_end_matches('/')
        ))
        .bearer_auth(&args.token)
        .json(&serde_json::json!({ "sql": args.sql }))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("HTTP {}: {}", resp.status(), resp.text().await?);
    }
    // Decode as the bytes arrive, on a blocking thread fed through a pipe.
    let (tx, rx) = std::sync::mpsc::sync_channel::<bytes::Bytes>(16);
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        let input = ChannelReader {
            rx,
            current: bytes::Bytes::new(),
        };
        let mut rows = 0u64;
        for batch in StreamReader::try_new(input, None)? {
            rows += batch?.num_rows() as u64;
        }
        Ok(rows)
    });
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        if tx.send(chunk?).is_err() {
            break;
        }
    }
    drop(tx);
    reader.await?
}

/// Bytes from a channel as a `Read`.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<bytes::Bytes>,
    current: bytes::Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.recv() {
                Ok(b) => self.current = b,
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}
