//! Batch jobs end to end: history ingested over HTTP, the forecast job run by the CLI
//! (`quiver forecast`, a second process on the server's store) and through the API,
//! read back over `/v1/sql`, the Postgres wire and Flight SQL; a CLI run killed half way and an API
//! run cancelled half way leave the previous forecasts in place; schedules fire.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use chrono::{Datelike, NaiveDate, Utc};
use serde_json::{Value, json};

use crate::bi::{pg_connect, psql_ok};
use crate::common::{ADMIN, TestServer, eventually};

/// Series in the history: enough that forecasting them takes a moment, so a run can be
/// stopped while it forecasts.
const SERIES: usize = 400;
const DAYS: i64 = 90;

/// `DAYS` days of paid order lines before today for `SERIES` (sku, warehouse) pairs,
/// with a weekly pattern and noise, as NDJSON bodies of at most 10,000 lines.
fn history(today: NaiveDate) -> Vec<String> {
    let mut lines = Vec::new();
    for back in 1..=DAYS {
        let day = today - chrono::Duration::days(back);
        let weekday = i64::from(day.weekday().num_days_from_monday());
        for s in 0..SERIES {
            // A weekly shape plus noise that repeats every 5 days, which a weekly
            // season cannot explain.
            let noise = ((back * 31 + s as i64 * 17) % 5) - 2;
            let qty = 4 + weekday + (s % 3) as i64 + noise;
            lines.push(format!(
                r#"{{"event_id":"h{back}-{s}","event_time":"{day}T15:00:00Z","order_id":"o{back}-{s}","customer_id":"c1","warehouse_id":"W{}","sku":"SKU-{s}","quantity":{qty},"unit_price":"4.50","status":"paid","channel":"web"}}"#,
                s % 4
            ));
        }
    }
    lines.chunks(10_000).map(|c| c.join("\n")).collect()
}

/// `quiver <job> --store … --json` as a child process, stderr piped.
fn job_command(server: &TestServer, job: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_quiver"));
    c.args([job, "--store", &server.store, "--json", "--threads", "1"])
        .env("QUIVER_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Runs `quiver <job>` to its end; its JSON summary.
fn run_cli(server: &TestServer, job: &str) -> Value {
    let out = job_command(server, job).output().expect("run quiver");
    assert!(
        out.status.success(),
        "quiver {job} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON summary")
}

/// Rows, run ids of `forecasts` (null until the server has found the table).
async fn forecast_runs(server: &TestServer) -> Value {
    let sql = "SELECT count(*) AS n, min(run_id) AS first, max(run_id) AS last FROM forecasts";
    let resp = server.sql_as(ADMIN, sql, json!([]), "json").await;
    if !resp.status().is_success() {
        return Value::Null;
    }
    resp.json::<Value>().await.expect("json")["rows"].clone()
}

async fn job_status(server: &TestServer, kind: &str) -> Value {
    let all = server.get_json("/v1/jobs").await;
    all["jobs"]
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["kind"] == kind))
        .cloned()
        .unwrap_or_else(|| panic!("no job '{kind}' in {all}"))
}

/// Waits until the API run `id` has ended; its summary.
async fn wait_for_run(server: &TestServer, id: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let job = job_status(server, "forecast").await;
        if job["last_run"]["run_id"] == id && job["running"].is_null() {
            return job["last_run"].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "run {id} did not end: {job}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Over Flight SQL: the names of the catalog's tables, and the forecast rows of run `id`.
async fn flight_tables_and_count(server: &TestServer, id: &str) -> (Vec<String>, i64) {
    use arrow::array::{Array as _, AsArray as _};
    use arrow_flight::sql::CommandGetTables;
    use arrow_flight::sql::client::FlightSqlServiceClient;
    use futures::TryStreamExt as _;

    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", server.flight_port))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut client = FlightSqlServiceClient::new(channel);
    client.set_token(ADMIN.to_owned());
    let mut batches = Vec::new();
    let listing = client
        .get_tables(CommandGetTables::default())
        .await
        .unwrap();
    let sql = format!("SELECT count(*) FROM forecasts WHERE run_id = '{id}'");
    let counted = client.execute(sql, None).await.unwrap();
    for info in [listing, counted] {
        let mut got = Vec::new();
        for endpoint in info.endpoint {
            let stream = client.do_get(endpoint.ticket.unwrap()).await.unwrap();
            got.extend(stream.try_collect::<Vec<_>>().await.unwrap());
        }
        batches.push(got);
    }
    let names = batches[0]
        .iter()
        .flat_map(|b| {
            let col = arrow::compute::cast(
                b.column_by_name("table_name").unwrap(),
                &arrow::datatypes::DataType::Utf8,
            )
            .unwrap();
            let col = col.as_string::<i32>().clone();
            (0..col.len()).map(move |i| col.value(i).to_owned())
        })
        .collect();
    let count = batches[1][0]
        .column(0)
        .as_primitive::<arrow::datatypes::Int64Type>()
        .value(0);
    (names, count)
}

async fn post_job(server: &TestServer, token: &str, kind: &str) -> reqwest::Response {
    server
        .client
        .post(format!("{}/v1/jobs/{kind}", server.url))
        .bearer_auth(token)
        .send()
        .await
        .expect("request")
}

#[tokio::test(flavor = "multi_thread")]
async fn forecasts_from_the_cli_and_the_api_are_read_over_sql_and_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(dir.path(), &["--table-refresh-interval", "200ms"]).await;
    let today = Utc::now().date_naive();
    for body in history(today) {
        let r = server.post("orders", "application/x-ndjson", body).await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    // The CLI reads what is in Delta: wait until the buffers are flushed.
    eventually(60, || async {
        server.stream_info("orders").await["buffered_events"] == 0
    })
    .await;

    // 1. A CLI run, on the store the server uses; the server sees its tables.
    let cli = run_cli(&server, "forecast");
    assert_eq!(cli["state"], "succeeded", "{cli}");
    assert_eq!(cli["series"], SERIES, "{cli}");
    assert_eq!(cli["rows"], SERIES * 14, "{cli}");
    let cli_id = cli["run_id"].as_str().unwrap().to_owned();
    eventually(30, || async {
        forecast_runs(&server).await == json!([[SERIES * 14, cli_id, cli_id]])
    })
    .await;
    // The chosen models beat seasonal naive in the backtest (it repeats last week's
    // noise; a model that smooths the level does not).
    assert!(
        cli["mase_vs_seasonal_naive"].as_f64().unwrap() < 1.0,
        "{cli}"
    );

    // 2. A CLI run killed with SIGKILL while it forecasts leaves the forecasts whole.
    let mut child = job_command(&server, "forecast").spawn().expect("spawn");
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        seen.push(line.clone());
        if line.contains(": forecasting") {
            break;
        }
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "killed: {seen:?}");
    assert!(
        seen.last().is_some_and(|l| l.contains("forecasting")),
        "the run never reached forecasting: {seen:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        forecast_runs(&server).await,
        json!([[SERIES * 14, cli_id, cli_id]])
    );
    assert_eq!(
        server
            .sql_rows("SELECT count(DISTINCT run_id) AS runs FROM stockout_risk")
            .await,
        json!([[1]])
    );

    // 3. Through the API: a second run while one runs is refused; a cancelled run
    //    writes nothing; a read token cannot start one; an unknown job is named.
    let reader = crate::bi::token(&server, &["read"]).await;
    let r = post_job(&server, &reader, "forecast").await;
    assert_eq!(r.status(), 403);
    let r = post_job(&server, ADMIN, "forcast").await;
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("forcast") && m.contains("forecast, anomalies")),
        "{body}"
    );
    let r = post_job(&server, ADMIN, "forecast").await;
    assert_eq!(r.status(), 202);
    let started: Value = r.json().await.unwrap();
    let cancelled_id = started["id"].as_str().unwrap().to_owned();
    let r = post_job(&server, ADMIN, "anomalies").await;
    assert_eq!(r.status(), 409, "{}", r.text().await.unwrap());
    let r = server
        .client
        .delete(format!("{}/v1/jobs/{cancelled_id}", server.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let run = wait_for_run(&server, &cancelled_id).await;
    assert_eq!(run["state"], "cancelled", "{run}");
    assert_eq!(run["trigger"], "api", "{run}");
    assert_eq!(
        forecast_runs(&server).await,
        json!([[SERIES * 14, cli_id, cli_id]])
    );

    // 4. An API run to its end; progress shows while it runs.
    let r = post_job(&server, ADMIN, "forecast").await;
    assert_eq!(r.status(), 202);
    let api_id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let running = job_status(&server, "forecast").await;
    if running["running"]["id"] == api_id {
        assert!(
            running["running"]["progress"]["stage"].is_string(),
            "{running}"
        );
    }
    let run = wait_for_run(&server, &api_id).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    assert_eq!(run["series"], SERIES, "{run}");
    assert_eq!(
        forecast_runs(&server).await,
        json!([[SERIES * 14, api_id, api_id]])
    );
    // Every run is in model_runs, the killed one excepted (it never got to write).
    let runs = server
        .sql_rows("SELECT run_id, state FROM model_runs WHERE kind = 'forecast' ORDER BY started")
        .await;
    assert_eq!(
        runs,
        json!([
            [cli_id, "succeeded"],
            [cancelled_id, "cancelled"],
            [api_id, "succeeded"],
        ])
    );

    // 5. Over the Postgres wire: the tables are listed and read like any other.
    let listed = psql_ok(&server, "\\dt");
    for table in [
        "forecasts",
        "forecast_models",
        "stockout_risk",
        "model_runs",
    ] {
        assert!(listed.contains(table), "{table} not in \\dt:\n{listed}");
    }
    let pg = pg_connect(&server, ADMIN).await.unwrap();
    let row = pg
        .query_one(
            "SELECT count(*) AS n, count(DISTINCT sku) AS skus, min(date)::text AS first \
             FROM forecasts WHERE run_id = $1 AND yhat_lower <= yhat AND yhat <= yhat_upper",
            &[&api_id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>("n"), (SERIES * 14) as i64);
    assert_eq!(row.get::<_, i64>("skus"), SERIES as i64);
    assert_eq!(row.get::<_, String>("first"), today.to_string());

    // Over Flight SQL: listed among the catalog's tables and read.
    let (tables, counted) = flight_tables_and_count(&server, &api_id).await;
    for table in [
        "forecasts",
        "forecast_models",
        "stockout_risk",
        "model_runs",
    ] {
        assert!(
            tables.iter().any(|t| t == table),
            "{table} not in {tables:?}"
        );
    }
    assert_eq!(counted, (SERIES * 14) as i64);

    // Older runs stay readable: the CLI run's forecasts at the version it wrote.
    let cli_version = cli["tables"]["forecasts"].as_u64().unwrap();
    assert_eq!(
        server
            .sql_rows(&format!(
                "SELECT count(*), min(run_id) FROM forecasts VERSION AS OF {cli_version}"
            ))
            .await,
        json!([[SERIES * 14, cli_id]])
    );

    // 6. The anomaly job from the CLI; its table appears too.
    let anomalies = run_cli(&server, "anomalies");
    assert_eq!(anomalies["state"], "succeeded", "{anomalies}");
    eventually(30, || async {
        server
            .sql_rows("SELECT count(*) AS n FROM model_runs WHERE kind = 'anomalies'")
            .await
            == json!([[1]])
    })
    .await;

    // 7. After a restart, GET /v1/jobs shows the last runs (from model_runs); with a
    //    schedule, runs start by themselves.
    server.set_flag("--forecast-schedule", "*/2 * * * * *");
    server.restart_clean().await;
    let job = job_status(&server, "forecast").await;
    assert_eq!(job["schedule"], "*/2 * * * * *", "{job}");
    assert!(
        job["last_run"]["run_id"] == api_id || job["last_run"]["trigger"] == "schedule",
        "{job}"
    );
    assert_eq!(
        job_status(&server, "anomalies").await["last_run"]["run_id"],
        anomalies["run_id"]
    );
    eventually(60, || async {
        job_status(&server, "forecast").await["last_run"]["trigger"] == "schedule"
    })
    .await;
    let job = job_status(&server, "forecast").await;
    assert_eq!(job["last_run"]["state"], "succeeded", "{job}");
    assert!(job["next_run"].is_string(), "{job}");
}

#[test]
fn a_bad_schedule_is_refused_at_start_with_the_flag_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args(["serve", "--store"])
        .arg(dir.path().join("store"))
        .arg("--wal-dir")
        .arg(dir.path().join("wal"))
        .args([
            "--http-addr",
            "127.0.0.1:0",
            "--pg-addr",
            "off",
            "--flight-addr",
            "off",
        ])
        .args(["--forecast-schedule", "every day at noon"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--forecast-schedule") && err.contains("every day at noon"),
        "{err}"
    );
}
