//! `quiver report run NAME --out FILE`: runs a report on a running server, waits for the
//! run, and saves its file.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Map, Value};

use super::{RemoteArgs, call};

/// The `report` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(super) enum ReportCommand {
    /// Run a report now, wait for it, and save its file.
    Run {
        /// The report's name.
        name: String,
        /// Where to save the file (default: the name the server gives it).
        #[arg(long)]
        out: Option<PathBuf>,
        /// A parameter for this run, `name=value` (repeatable); numbers and true/false
        /// are sent as such, anything else as text.
        #[arg(long = "param", value_parser = parse_param)]
        params: Vec<(String, Value)>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

fn parse_param(s: &str) -> Result<(String, Value), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not name=value"))?;
    let value = serde_json::from_str::<Value>(v)
        .ok()
        .filter(|v| v.is_number() || v.is_boolean() || v.is_null())
        .unwrap_or_else(|| Value::String(v.to_owned()));
    Ok((k.to_owned(), value))
}

pub(super) async fn run(cmd: ReportCommand) -> anyhow::Result<()> {
    let ReportCommand::Run {
        name,
        out,
        params,
        remote,
    } = cmd;
    let client = reqwest::Client::new();
    let params: Map<String, Value> = params.into_iter().collect();
    let run = call(
        client
            .post(remote.endpoint(&format!("v1/reports/{name}/run")))
            .json(&serde_json::json!({ "params": params })),
        &remote,
    )
    .await?;
    let id = run["id"]
        .as_str()
        .context("the server answered without a run id")?;
    eprintln!("run {id} queued");
    let run = loop {
        let run = call(
            client.get(remote.endpoint(&format!("v1/reports/{name}/runs/{id}"))),
            &remote,
        )
        .await?;
        match run["state"].as_str() {
            Some("succeeded") => break run,
            Some("failed") => bail!(
                "run {id} failed: {}",
                run["error"].as_str().unwrap_or("no reason given")
            ),
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    };
    let path = out.unwrap_or_else(|| PathBuf::from(run["file_name"].as_str().unwrap_or("report")));
    let resp = client
        .get(remote.endpoint(&format!("v1/reports/{name}/runs/{id}/file")))
        .bearer_auth(remote.token()?)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("downloading the file: {}", resp.status());
    }
    let bytes = resp.bytes().await?;
    std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "{} ({} rows, {} bytes)",
        path.display(),
        run["rows"],
        bytes.len()
    );
    Ok(())
}
