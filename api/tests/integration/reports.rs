//! Reports end to end: definitions over HTTP, runs, files read back by independent
//! readers (the `csv` crate, parquet's reader, calamine, poppler's pdftotext, pdfinfo
//! and pdftoppm) and compared with the same SQL over `/v1/sql`; bad definitions; a
//! schedule that fires, a run missed while the server was down that runs once, and
//! retention; emails to a real SMTP sink with the file attached, and a dead relay.

use std::io::{Cursor, Read as _};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::alerts::{mails, start_smtp};
use crate::common::{ADMIN, TestServer, eventually, request as send};

/// `n` paid order lines over six hours of 2026-11-25, four warehouses, seven SKUs.
fn orders(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                r#"{{"event_id":"e{i:04}","event_time":"2026-11-25T{:02}:{:02}:00Z","order_id":"o{i}","customer_id":"c{}","warehouse_id":"W{}","sku":"SKU-{}","quantity":{},"unit_price":"{}.25","status":"paid","channel":"web"}}"#,
                8 + i % 6,
                i % 60,
                i % 11,
                i % 4 + 1,
                i % 7,
                i % 5 + 1,
                i % 9 + 1,
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

const BY_WAREHOUSE: &str = "SELECT warehouse_id, SUM(quantity * unit_price) AS revenue, \
                            COUNT(*) AS lines FROM orders GROUP BY 1 ORDER BY 1";
const BY_HOUR: &str = "SELECT date_bin(INTERVAL '1 hour', event_time) AS hour, warehouse_id, \
                       SUM(quantity) AS units FROM orders GROUP BY 1, 2 ORDER BY 1, 2";
const ALL_LINES: &str = "SELECT event_id, event_time, sku, quantity, unit_price FROM orders \
                         ORDER BY event_id";

pub(crate) async fn create(server: &TestServer, def: Value) -> Value {
    let (status, body) = send(
        server,
        reqwest::Method::POST,
        ADMIN,
        "/v1/reports",
        Some(def),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body
}

/// Runs a report now and waits for the run to end; the run.
pub(crate) async fn run_to_end(server: &TestServer, name: &str, body: Option<Value>) -> Value {
    let (status, run) = send(
        server,
        reqwest::Method::POST,
        ADMIN,
        &format!("/v1/reports/{name}/run"),
        body,
    )
    .await;
    assert_eq!(status, 202, "{run}");
    assert_eq!(run["state"], "queued", "{run}");
    wait_run(server, name, run["id"].as_str().unwrap()).await
}

async fn wait_run(server: &TestServer, name: &str, id: &str) -> Value {
    let mut last = Value::Null;
    for _ in 0..600 {
        last = server
            .get_json(&format!("/v1/reports/{name}/runs/{id}"))
            .await;
        if last["state"] == "succeeded" || last["state"] == "failed" {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("run {id} of {name} did not end: {last}\n{}", server.log());
}

/// Downloads a run's file; its bytes, content type and disposition.
pub(crate) async fn download(server: &TestServer, run: &Value) -> (Vec<u8>, String, String) {
    let resp = server
        .client
        .get(format!(
            "{}{}",
            server.url,
            run["file"].as_str().expect("a file")
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let header = |h: &str| {
        resp.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let (ct, cd) = (header("content-type"), header("content-disposition"));
    (resp.bytes().await.unwrap().to_vec(), ct, cd)
}

/// The same SQL over `/v1/sql` as CSV records (header first).
async fn sql_csv(server: &TestServer, sql: &str) -> Vec<Vec<String>> {
    let text = server
        .sql_as(ADMIN, sql, json!([]), "csv")
        .await
        .text()
        .await
        .unwrap();
    csv_records(text.as_bytes())
}

fn csv_records(bytes: &[u8]) -> Vec<Vec<String>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(bytes);
    reader
        .records()
        .map(|r| r.unwrap().iter().map(str::to_owned).collect())
        .collect()
}

fn unzip(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).expect("a zip archive");
    (0..archive.len())
        .map(|i| {
            let mut f = archive.by_index(i).unwrap();
            let mut data = Vec::new();
            f.read_to_end(&mut data).unwrap();
            (f.name().unwrap().into_owned(), data)
        })
        .collect()
}

fn artifact_dir() -> std::path::PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let dir = std::path::Path::new(&target).join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn poppler(tool: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} (apt-get install poppler-utils): {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_reads_back_as_the_same_sql_gives() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), &[]).await;
    let r = server
        .post("orders", "application/x-ndjson", orders(300))
        .await;
    assert_eq!(r.status(), 200);
    let queries = json!([
        {"title": "Revenue by warehouse", "sql": BY_WAREHOUSE,
         "chart": {"type": "bar", "x": "warehouse_id", "y": ["revenue"]}},
        {"title": "Units by hour", "sql": BY_HOUR,
         "chart": {"type": "line", "x": "hour", "y": ["units"], "series": "warehouse_id"}},
        {"title": "All lines", "sql": ALL_LINES},
    ]);
    let expected = [
        sql_csv(&server, BY_WAREHOUSE).await,
        sql_csv(&server, BY_HOUR).await,
        sql_csv(&server, ALL_LINES).await,
    ];
    assert_eq!(expected[2].len(), 301);

    // CSV: one file per query, zipped.
    create(
        &server,
        json!({"name": "daily_csv", "title": "Daily sales", "queries": queries, "format": "csv"}),
    )
    .await;
    let run = run_to_end(&server, "daily_csv", None).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    assert_eq!(expected[0].len(), 1 + 4);
    assert_eq!(expected[1].len(), 1 + 12, "two warehouses an hour");
    assert_eq!(run["rows"], 4 + 12 + 300, "{run}");
    let (bytes, ct, cd) = download(&server, &run).await;
    assert_eq!(ct, "application/zip");
    assert!(
        cd.contains(&format!("daily_csv-{}.zip", run["id"].as_str().unwrap())),
        "{cd}"
    );
    assert_eq!(run["bytes"], bytes.len());
    let files = unzip(&bytes);
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "01-Revenue_by_warehouse.csv",
            "02-Units_by_hour.csv",
            "03-All_lines.csv"
        ]
    );
    for ((_, data), want) in files.iter().zip(&expected) {
        assert_eq!(&csv_records(data), want);
    }
    // Exact decimals and UTC times, as /v1/sql gives them.
    assert!(expected[0][1][1].contains('.'), "{:?}", expected[0]);
    assert!(expected[2][1][1].ends_with('Z'), "{:?}", expected[2]);

    // Parquet, one query: a plain Parquet file.
    create(
        &server,
        json!({"name": "lines_parquet", "queries": [{"sql": ALL_LINES}], "format": "parquet"}),
    )
    .await;
    let run = run_to_end(&server, "lines_parquet", None).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    let (bytes, ct, _) = download(&server, &run).await;
    assert_eq!(ct, "application/vnd.apache.parquet");
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        bytes::Bytes::from(bytes),
    )
    .unwrap()
    .build()
    .unwrap();
    let batches: Vec<_> = reader.map(Result::unwrap).collect();
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 300);
    let mut csv_out = Vec::new();
    {
        let mut w = arrow::csv::WriterBuilder::new()
            .with_header(true)
            .with_timestamp_tz_format("%Y-%m-%dT%H:%M:%S%.3fZ".into())
            .build(&mut csv_out);
        for b in &batches {
            w.write(b).unwrap();
        }
    }
    let from_parquet = csv_records(&csv_out);
    assert_eq!(from_parquet[0], expected[2][0]);
    for (got, want) in from_parquet.iter().zip(&expected[2]).skip(1) {
        assert_eq!(got[0], want[0]);
        assert_eq!(got[2..], want[2..], "{got:?} vs {want:?}");
    }

    // The same report from the command line: run, wait, save.
    let out = dir.path().join("lines.parquet");
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args([
            "report",
            "run",
            "lines_parquet",
            "--out",
            out.to_str().unwrap(),
        ])
        .args(["--url", &server.url, "--token", ADMIN])
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let saved = std::fs::read(&out).unwrap();
    assert_eq!(&saved[..4], b"PAR1");
    let runs = server.get_json("/v1/reports/lines_parquet/runs").await;
    assert_eq!(runs["runs"].as_array().unwrap().len(), 2);
    assert_eq!(runs["runs"][0]["bytes"], saved.len());
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args([
            "report",
            "run",
            "nope",
            "--url",
            &server.url,
            "--token",
            ADMIN,
        ])
        .output()
        .unwrap();
    assert!(!cli.status.success());
    assert!(String::from_utf8_lossy(&cli.stderr).contains("no report named 'nope'"));

    // Excel: a sheet per query, typed cells, a frozen header and native charts.
    create(
        &server,
        json!({"name": "daily_xlsx", "title": "Daily sales", "queries": queries, "format": "xlsx"}),
    )
    .await;
    let run = run_to_end(&server, "daily_xlsx", None).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    let (bytes, ct, _) = download(&server, &run).await;
    assert_eq!(
        ct,
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    );
    std::fs::write(artifact_dir().join("report.xlsx"), &bytes).unwrap();
    {
        use calamine::{Data, Reader as _, Xlsx};
        let mut book: Xlsx<_> = Xlsx::new(Cursor::new(bytes.clone())).unwrap();
        let sheets = book.sheet_names();
        assert_eq!(
            sheets[..3],
            ["Revenue by warehouse", "Units by hour", "All lines"]
        );
        let range = book.worksheet_range("Revenue by warehouse").unwrap();
        assert_eq!(
            range.get((0, 0)),
            Some(&Data::String("warehouse_id".into()))
        );
        for (r, want) in expected[0].iter().enumerate().skip(1) {
            assert_eq!(range.get((r, 0)), Some(&Data::String(want[0].clone())));
            let revenue: f64 = want[1].parse().unwrap();
            match range.get((r, 1)) {
                Some(Data::Float(v)) => assert!((v - revenue).abs() < 1e-9, "{v} vs {revenue}"),
                other => panic!("revenue is not a number: {other:?}"),
            }
        }
        let lines = book.worksheet_range("All lines").unwrap();
        assert_eq!(lines.height(), 301);
        match lines.get((1, 1)) {
            Some(Data::DateTime(d)) => {
                // Excel's serial date: days since 1899-12-30.
                let want = chrono::DateTime::parse_from_rfc3339(&expected[2][1][1])
                    .unwrap()
                    .timestamp_millis() as f64
                    / 86_400_000.0
                    + 25_569.0;
                assert!((d.as_f64() - want).abs() < 1e-6, "{} vs {want}", d.as_f64());
            }
            other => panic!("event_time is not a date: {other:?}"),
        }
        assert!(
            matches!(lines.get((1, 3)), Some(Data::Float(_))),
            "quantity is a number"
        );
    }
    let parts = unzip(&bytes);
    let part = |name: &str| {
        parts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| String::from_utf8_lossy(d).into_owned())
            .unwrap_or_else(|| panic!("no {name} in the workbook"))
    };
    assert!(part("xl/charts/chart1.xml").contains("<c:barChart>"));
    assert!(part("xl/charts/chart2.xml").contains("<c:lineChart>"));
    assert!(part("xl/worksheets/sheet1.xml").contains("<pane ySplit=\"1\""));
    assert!(part("xl/styles.xml").contains("#,##0.00"));

    // PDF: title, run time, values, pages with repeated headers, selectable text.
    create(
        &server,
        json!({"name": "daily_pdf", "title": "Daily sales", "queries": queries, "format": "pdf",
               "params": {}}),
    )
    .await;
    let run = run_to_end(&server, "daily_pdf", None).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    let (bytes, ct, _) = download(&server, &run).await;
    assert_eq!(ct, "application/pdf");
    let pdf = artifact_dir().join("report.pdf");
    std::fs::write(&pdf, &bytes).unwrap();
    let pdf = pdf.to_str().unwrap();
    let info = poppler("pdfinfo", &[pdf]);
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(field("Title:"), "Daily sales", "{info}");
    let pages: usize = field("Pages:").parse().unwrap();
    // 300 lines at about 38 a page, after the two short tables and a chart.
    assert!(pages >= 9, "{pages} pages\n{info}");
    let text = poppler("pdftotext", &["-layout", pdf, "-"]);
    assert!(text.contains("Daily sales"), "{text}");
    assert!(text.contains("Run at "), "{text}");
    assert!(text.contains("Revenue by warehouse"));
    // A known value: W1's revenue as /v1/sql gives it.
    assert!(text.contains(&expected[0][1][1]), "{}", expected[0][1][1]);
    assert!(text.contains("e0299"), "the last line is in the table");
    // The header is repeated on every page of the long table.
    let headers = text.matches("event_id").count();
    assert!(headers >= pages - 2, "{headers} headers on {pages} pages");
    assert!(text.contains(&format!("page {pages} of {pages}")));
    poppler(
        "pdftoppm",
        &[
            "-png",
            "-r",
            "60",
            "-f",
            "1",
            "-l",
            "2",
            pdf,
            artifact_dir().join("report").to_str().unwrap(),
        ],
    );
    assert!(
        artifact_dir().join("report-01.png").exists()
            || artifact_dir().join("report-1.png").exists()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reports_get_clear_errors_and_failed_runs_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), &["--max-result-bytes", "10000"]).await;
    assert_eq!(
        server
            .post("orders", "application/x-ndjson", orders(400))
            .await
            .status(),
        200
    );
    let post = |def: Value| {
        send(
            &server,
            reqwest::Method::POST,
            ADMIN,
            "/v1/reports",
            Some(def),
        )
    };
    let base = |extra: Value| {
        let mut v = json!({"name": "r", "queries": [{"sql": BY_WAREHOUSE}], "format": "csv"});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    let cases = [
        (
            base(json!({"schedule": "0 25 * * *"})),
            "schedule: '0 25 * * *' is not a cron expression",
        ),
        (
            base(json!({"schedule": "CRON_TZ=Nowhere/City 0 7 * * *"})),
            "'Nowhere/City' is not a time zone",
        ),
        (base(json!({"format": "docx"})), "unknown format 'docx'"),
        (
            base(json!({"queries": [{"sql": "DROP MATERIALIZED VIEW stock_on_hand"}]})),
            "queries[0]: a report runs queries only",
        ),
        (
            base(json!({"queries": [{"sql": "DELETE FROM orders"}]})),
            "queries[0]:",
        ),
        (
            base(json!({"queries": [{"sql": "SELECT nope FROM orders"}]})),
            "queries[0]:",
        ),
        (
            base(
                json!({"queries": [{"sql": BY_WAREHOUSE, "chart": {"type": "bar", "x": "warehouse", "y": ["revenue"]}}]}),
            ),
            "queries[0]: chart x column 'warehouse' is not in the result (columns: warehouse_id, revenue, lines)",
        ),
        (
            base(
                json!({"queries": [{"sql": BY_WAREHOUSE, "chart": {"type": "bar", "x": "revenue", "y": ["warehouse_id"]}}]}),
            ),
            "chart y column 'warehouse_id' is text",
        ),
        (
            base(
                json!({"queries": [{"sql": "SELECT * FROM orders WHERE warehouse_id = $warehouse"}]}),
            ),
            "$warehouse has no value: add \"warehouse\" to the report's params",
        ),
        (
            base(json!({"email": ["nobody"]})),
            "email[0]: 'nobody' is not an email address",
        ),
    ];
    for (def, want) in cases {
        let (status, body) = post(def.clone()).await;
        assert_eq!(status, 400, "{def}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(want), "{def}:\n{message}\nwanted: {want}");
    }
    // A read token may see reports but not create them.
    let reader = &read_token(&server).await;
    let (status, body) = send(
        &server,
        reqwest::Method::POST,
        reader,
        "/v1/reports",
        Some(base(json!({}))),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = send(&server, reqwest::Method::GET, reader, "/v1/reports", None).await;
    assert_eq!(status, 200);
    // A name taken, and one that is not there.
    let (status, _) = post(base(json!({}))).await;
    assert_eq!(status, 201);
    let (status, body) = post(base(json!({}))).await;
    assert_eq!(status, 409, "{body}");
    let (status, _) = send(
        &server,
        reqwest::Method::POST,
        ADMIN,
        "/v1/reports/nope/run",
        None,
    )
    .await;
    assert_eq!(status, 404);

    // A query that fails when it runs: the run records why, and the next run is fine.
    create(
        &server,
        json!({"name": "fails", "format": "csv", "params": {"sku": "SKU-1"},
               "queries": [{"sql": "SELECT CAST(sku AS INT) AS n FROM orders WHERE sku = $sku"}]}),
    )
    .await;
    let run = run_to_end(&server, "fails", None).await;
    assert_eq!(run["state"], "failed", "{run}");
    let error = run["error"].as_str().unwrap();
    assert!(error.starts_with("query 1 ('Query 1'):"), "{error}");
    assert!(error.contains("SKU-1"), "{error}");
    assert!(run["file"].is_null());
    let (status, _) = send(
        &server,
        reqwest::Method::GET,
        ADMIN,
        &format!(
            "/v1/reports/fails/runs/{}/file",
            run["id"].as_str().unwrap()
        ),
        None,
    )
    .await;
    assert_eq!(status, 404);
    // Parameters given at run time replace the report's own; unknown ones are refused.
    let (status, body) = send(
        &server,
        reqwest::Method::POST,
        ADMIN,
        "/v1/reports/fails/run",
        Some(json!({"params": {"warehouse": "W1"}})),
    )
    .await;
    assert_eq!(status, 400, "{body}");

    // A result over the result limit fails the run instead of filling the store.
    create(
        &server,
        json!({"name": "huge", "format": "csv", "queries": [{"sql": ALL_LINES}]}),
    )
    .await;
    let run = run_to_end(&server, "huge", None).await;
    assert_eq!(run["state"], "failed", "{run}");
    assert!(
        run["error"]
            .as_str()
            .unwrap()
            .contains("over the 10000-byte result limit"),
        "{run}"
    );
    // The store holds files only for runs that succeeded.
    let stored = dir.path().join("store/reports/huge");
    assert!(
        !stored.exists() || std::fs::read_dir(&stored).unwrap().next().is_none(),
        "a failed run left a file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_fire_missed_runs_run_once_and_old_runs_expire() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(
        dir.path(),
        &["--report-clock-start", "2026-01-05T09:59:57Z"],
    )
    .await;
    assert_eq!(
        server
            .post("orders", "application/x-ndjson", orders(30))
            .await
            .status(),
        200
    );
    create(
        &server,
        json!({"name": "morning", "format": "csv", "schedule": "CRON_TZ=Europe/Berlin 0 11 * * *",
               "queries": [{"sql": BY_WAREHOUSE}]}),
    )
    .await;
    // 11:00 in Berlin is 10:00 UTC in January: due three seconds after the start.
    let report = server.get_json("/v1/reports/morning").await;
    assert_eq!(report["next_run"], "2026-01-05T10:00:00.000Z", "{report}");
    eventually(30, || async {
        let runs = server.get_json("/v1/reports/morning/runs").await;
        runs["runs"][0]["state"] == "succeeded"
    })
    .await;
    let runs = server.get_json("/v1/reports/morning/runs").await["runs"].clone();
    assert_eq!(runs.as_array().unwrap().len(), 1, "{runs}");
    assert_eq!(runs[0]["trigger"], "schedule");
    let first = runs[0]["id"].as_str().unwrap().to_owned();
    assert!(first.starts_with("20260105T10000"), "{first}");
    let report = server.get_json("/v1/reports/morning").await;
    assert_eq!(report["next_run"], "2026-01-06T10:00:00.000Z", "{report}");

    // Down for three days: the three runs missed are one run at start.
    assert_eq!(server.terminate(), Some(0));
    server.set_flag("--report-clock-start", "2026-01-08T12:00:00Z");
    server.restart().await;
    eventually(30, || async {
        let runs = server.get_json("/v1/reports/morning/runs").await;
        runs["runs"][0]["state"] == "succeeded" && runs["runs"][0]["id"] != first.as_str()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let runs = server.get_json("/v1/reports/morning/runs").await["runs"].clone();
    let triggers: Vec<&str> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["trigger"].as_str().unwrap())
        .collect();
    assert_eq!(triggers, ["missed", "schedule"], "{runs}");
    let report = server.get_json("/v1/reports/morning").await;
    assert_eq!(report["next_run"], "2026-01-09T10:00:00.000Z", "{report}");
    let files = dir.path().join("store/reports/morning");
    assert_eq!(std::fs::read_dir(&files).unwrap().count(), 2);

    // Two weeks on with a week of retention: both runs and their files are gone, and
    // the missed run of that morning is the one left.
    assert_eq!(server.terminate(), Some(0));
    server.set_flag("--report-clock-start", "2026-01-22T12:00:00Z");
    server.set_flag("--report-retention", "7days");
    server.restart().await;
    eventually(30, || async {
        let runs = server.get_json("/v1/reports/morning/runs").await;
        runs["runs"].as_array().is_some_and(|r| r.len() == 1)
            && runs["runs"][0]["state"] == "succeeded"
    })
    .await;
    let runs = server.get_json("/v1/reports/morning/runs").await["runs"].clone();
    assert_eq!(runs[0]["trigger"], "missed", "{runs}");
    let left: Vec<String> = std::fs::read_dir(&files)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, [format!("{}.csv", runs[0]["id"].as_str().unwrap())]);

    // Deleting the report deletes its files.
    let (status, _) = send(
        &server,
        reqwest::Method::DELETE,
        ADMIN,
        "/v1/reports/morning",
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(std::fs::read_dir(&files).unwrap().count(), 0);
    let (status, _) = send(
        &server,
        reqwest::Method::GET,
        ADMIN,
        "/v1/reports/morning",
        None,
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn built_in_reports_load_run_and_keep_a_users_changes() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(dir.path(), &[]).await;
    let stock = r#"{"event_id":"s1","event_time":"2026-11-25T08:00:00Z","sku":"SKU-1","warehouse_id":"W1","kind":"receipt","quantity":5}"#;
    assert_eq!(
        server
            .post("inventory", "application/x-ndjson", stock)
            .await
            .status(),
        200
    );
    assert_eq!(
        server
            .post("orders", "application/x-ndjson", orders(50))
            .await
            .status(),
        200
    );
    let daily = server.get_json("/v1/reports/daily_sales").await;
    assert_eq!(daily["owner"], "built-in", "{daily}");
    assert_eq!(daily["format"], "xlsx");
    // `serve` runs them on request only.
    assert!(daily["schedule"].is_null(), "{daily}");
    assert!(daily["next_run"].is_null(), "{daily}");
    // No forecast tables yet: the weekly report leaves out its optional queries.
    let weekly = server.get_json("/v1/reports/weekly_stock").await;
    let titles: Vec<&str> = weekly["queries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, ["Low stock", "Sell-through"], "{weekly}");
    let run = run_to_end(&server, "weekly_stock", None).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    let (pdf, ct, _) = download(&server, &run).await;
    assert_eq!(ct, "application/pdf");
    let path = artifact_dir().join("weekly_stock.pdf");
    std::fs::write(&path, &pdf).unwrap();
    let text = poppler("pdftotext", &["-layout", path.to_str().unwrap(), "-"]);
    assert!(
        text.contains("Weekly stock") && text.contains("SKU-1"),
        "{text}"
    );
    let run = run_to_end(&server, "daily_sales", None).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    assert_eq!(run["queries"].as_array().unwrap().len(), 4, "{run}");

    // A user's own version of a built-in report survives a restart.
    let (status, body) = send(
        &server,
        reqwest::Method::PUT,
        ADMIN,
        "/v1/reports/daily_sales",
        Some(json!({"format": "csv", "queries": [{"sql": BY_WAREHOUSE}]})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["owner"], "admin");
    server.restart().await;
    let daily = server.get_json("/v1/reports/daily_sales").await;
    assert_eq!(daily["format"], "csv", "{daily}");
    assert_eq!(daily["created_at"], body["created_at"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_report_and_drop_report_in_sql() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), &["--report-dir", "none"]).await;
    assert_eq!(
        server
            .post("orders", "application/x-ndjson", orders(20))
            .await
            .status(),
        200
    );
    let sql = |token: &'static str, text: &'static str| {
        let server = &server;
        async move {
            let resp = server.sql_as(token, text, json!([]), "json").await;
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap())
        }
    };
    let create = "CREATE REPORT weekly TITLE 'Weekly sales' FORMAT csv \
                  SCHEDULE 'CRON_TZ=Europe/Paris 0 7 * * MON' \
                  EMAIL 'a@example.com', 'b@example.com' \
                  AS SELECT warehouse_id, COUNT(*) AS n FROM orders WHERE sku <> 'x' GROUP BY 1 ORDER BY 1;";
    let (status, body) = sql(ADMIN, create).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["created"], true);
    let report = server.get_json("/v1/reports/weekly").await;
    assert_eq!(report["title"], "Weekly sales", "{report}");
    assert_eq!(report["schedule"], "CRON_TZ=Europe/Paris 0 7 * * MON");
    assert_eq!(report["email"], json!(["a@example.com", "b@example.com"]));
    let query = report["queries"][0]["sql"].as_str().unwrap();
    assert!(
        query.starts_with("SELECT warehouse_id") && query.contains("'x'"),
        "{query}"
    );
    let run = run_to_end(&server, "weekly", None).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    assert_eq!(run["rows"], 4, "{run}");

    let (status, body) = sql(ADMIN, create).await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = sql(
        ADMIN,
        "CREATE REPORT IF NOT EXISTS weekly FORMAT pdf AS SELECT 1",
    )
    .await;
    assert_eq!((status, &body["created"]), (200, &json!(false)), "{body}");
    for (text, want) in [
        (
            "CREATE REPORT r FORMAT docx AS SELECT 1",
            "unknown format 'docx'",
        ),
        (
            "CREATE REPORT r FORMAT csv AS DROP MATERIALIZED VIEW low_stock",
            "a report runs queries only",
        ),
        (
            "CREATE REPORT r FORMAT csv SCHEDULE 'soon' AS SELECT 1",
            "schedule: 'soon'",
        ),
        ("CREATE REPORT r AS SELECT 1", "FORMAT is required"),
        (
            "CREATE REPORT r FORMAT csv TITLE AS SELECT 1",
            "TITLE takes a quoted string",
        ),
        (
            "CREATE REPORT r FORMAT csv COLOUR 'red' AS SELECT 1",
            "found 'COLOUR'",
        ),
    ] {
        let (status, body) = sql(ADMIN, text).await;
        assert_eq!(status, 400, "{text}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(want), "{text}: {message}");
    }
    let reader: &'static str = Box::leak(read_token(&server).await.into_boxed_str());
    let (status, body) = sql(reader, "DROP REPORT weekly").await;
    assert_eq!(status, 403, "{body}");

    // Over the Postgres wire too.
    let out = crate::bi::psql_ok(&server, "DROP REPORT weekly");
    assert!(out.contains("DROP REPORT"), "{out}");
    let (status, _) = send(
        &server,
        reqwest::Method::GET,
        ADMIN,
        "/v1/reports/weekly",
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, body) = sql(ADMIN, "DROP REPORT IF EXISTS weekly").await;
    assert_eq!((status, &body["dropped"]), (200, &json!(false)), "{body}");
    let (status, body) = sql(ADMIN, "DROP REPORT weekly").await;
    assert_eq!(status, 404, "{body}");
}

/// A new token with only the `read` scope.
async fn read_token(server: &TestServer) -> String {
    let (_, token) = send(
        server,
        reqwest::Method::POST,
        ADMIN,
        "/v1/tokens",
        Some(json!({"name": "viewer", "scopes": ["read"]})),
    )
    .await;
    token["token"].as_str().unwrap().to_owned()
}

/// Waits until the email of run `id` is in `state`; the run.
async fn delivered(server: &TestServer, id: &str, state: &str) -> Value {
    let path = format!("/v1/reports/mailed/runs/{id}");
    eventually(30, || async {
        server.get_json(&path).await["delivery"]["state"] == state
    })
    .await;
    server.get_json(&path).await
}

/// The attachment of a MIME message, decoded.
fn attachment(message: &str) -> Vec<u8> {
    let start = message
        .find("Content-Disposition: attachment")
        .expect("an attachment");
    let rest = &message[start..];
    let body_at = rest
        .find("\r\n\r\n")
        .map(|i| i + 4)
        .or_else(|| rest.find("\n\n").map(|i| i + 2))
        .unwrap();
    let body = &rest[body_at..];
    let end = body.find("\n--").unwrap_or(body.len());
    let b64: String = body[..end].chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64 attachment")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_emails_carry_the_file_and_a_dead_relay_is_retried_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = start_smtp(dir.path()).await;
    let relay = format!("smtp://127.0.0.1:{}", smtp.port);
    let mut server = TestServer::start(
        dir.path(),
        &["--smtp-url", &relay, "--report-email-retry", "200ms"],
    )
    .await;
    assert_eq!(
        server
            .post("orders", "application/x-ndjson", orders(60))
            .await
            .status(),
        200
    );
    create(
        &server,
        json!({"name": "mailed", "title": "Sales by warehouse", "format": "xlsx",
               "email": ["manager@example.com"],
               "queries": [{"title": "Revenue", "sql": BY_WAREHOUSE}]}),
    )
    .await;
    let run = run_to_end(&server, "mailed", None).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    let run = delivered(&server, run["id"].as_str().unwrap(), "sent").await;
    assert_eq!(run["delivery"]["attempts"], 1, "{run}");
    assert_eq!(run["delivery"]["attached"], true);
    let (file, _, _) = download(&server, &run).await;
    let messages = mails(&smtp);
    assert_eq!(messages.len(), 1);
    let message = &messages[0];
    assert!(message.contains("Subject: Sales by warehouse"), "{message}");
    assert!(message.contains("manager@example.com"));
    assert!(message.contains("text/html"));
    assert_eq!(
        attachment(message),
        file,
        "the attachment is the stored file"
    );

    // A relay that is not there: four attempts, then the delivery is failed; the run
    // itself succeeded and the next one still happens.
    assert_eq!(server.terminate(), Some(0));
    let dead = crate::common::free_port();
    server.set_flag("--smtp-url", &format!("smtp://127.0.0.1:{dead}"));
    server.restart().await;
    let run = run_to_end(&server, "mailed", None).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    let run = delivered(&server, run["id"].as_str().unwrap(), "failed").await;
    assert_eq!(run["delivery"]["attempts"], 4, "{run}");
    assert!(
        run["delivery"]["error"].as_str().unwrap().contains("SMTP"),
        "{run}"
    );
    let next = run_to_end(&server, "mailed", None).await;
    assert_eq!(next["state"], "succeeded", "{next}");
    let metrics = server.metrics_text().await;
    assert!(
        crate::common::metric(
            &metrics,
            "quiver_report_deliveries_total{outcome=\"failed\"}"
        ) >= 1.0,
        "{metrics}"
    );
}
