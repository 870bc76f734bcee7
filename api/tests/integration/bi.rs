//! BI connectivity with real clients: `psql`, tokio-postgres (extended protocol,
//! parameters, binary results), and Python's psycopg, SQLAlchemy reflection and ADBC
//! Flight SQL (api/tests/python/test_bi.py). Each answer is checked against the same
//! query over HTTP.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{ADMIN, TestServer};
use crate::sql::fixture_server;

/// A token with the given scopes, made by the admin.
pub(crate) async fn token(server: &TestServer, scopes: &[&str]) -> String {
    let made: Value = server
        .client
        .post(format!("{}/v1/tokens", server.url))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "bi", "scopes": scopes}))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    made["token"].as_str().expect("token").to_owned()
}

pub(crate) async fn pg_connect(
    server: &TestServer,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let config = format!(
        "host=127.0.0.1 port={} user=analyst dbname=quiver password={password} connect_timeout=10",
        server.pg_port
    );
    let (client, connection) = tokio_postgres::connect(&config, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Runs `psql -c <command>` against the server, returning its output.
fn psql(server: &TestServer, password: &str, command: &str) -> std::process::Output {
    std::process::Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=analyst dbname=quiver sslmode=disable",
            server.pg_port
        ))
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-c", command])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("psql is installed (scripts/test.sh installs postgresql-client)")
}

pub(crate) fn psql_ok(server: &TestServer, command: &str) -> String {
    let out = psql(server, ADMIN, command);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "psql -c '{command}' failed:\n{stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    stdout
}

fn code_of(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.code().code().to_owned())
        .unwrap_or_else(|| format!("no server error: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_wire_with_psql_and_tokio_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let server = fixture_server(dir.path(), &[]).await;

    // psql's own catalog commands.
    let tables = psql_ok(&server, "\\dt");
    for stream in ["orders", "inventory"] {
        assert!(tables.contains(stream), "\\dt lists {stream}:\n{tables}");
    }
    assert!(
        !tables.contains("stock_on_hand"),
        "\\dt lists no views:\n{tables}"
    );
    let views = psql_ok(&server, "\\dv");
    assert!(
        views.contains("stock_on_hand") && views.contains("orders_current"),
        "\\dv:\n{views}"
    );
    let described = psql_ok(&server, "\\d orders");
    for column in [
        "event_id",
        "event_time",
        "order_id",
        "quantity",
        "unit_price",
        "status",
    ] {
        assert!(
            described.contains(column),
            "\\d orders shows {column}:\n{described}"
        );
    }
    assert!(
        described.contains("timestamp with time zone"),
        "{described}"
    );
    let counted = psql_ok(&server, "SELECT count(*) AS n FROM orders");
    let http = server.sql_rows("SELECT count(*) FROM orders").await;
    let n = http[0][0].as_i64().unwrap();
    assert!(
        counted.contains(&format!(" {n}\n")),
        "psql count {counted} vs HTTP {n}"
    );
    // psql refusals print the server's message.
    let refused = psql(&server, "not-a-token", "SELECT 1");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("password authentication failed"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // tokio-postgres: the extended protocol, parameters and binary results.
    let client = pg_connect(&server, ADMIN)
        .await
        .expect("connect with the admin token");
    let rows = client
        .query(
            "SELECT order_id, sku, quantity, unit_price, status, event_time \
             FROM orders WHERE quantity >= $1 AND status = $2 ORDER BY event_id",
            &[&2i64, &"paid"],
        )
        .await
        .expect("parameterised query");
    let expected = server
        .sql_as(
            ADMIN,
            "SELECT order_id, sku, quantity, CAST(unit_price AS VARCHAR), status, \
             CAST(event_time AS VARCHAR) FROM orders WHERE quantity >= $1 AND status = $2 \
             ORDER BY event_id",
            json!([2, "paid"]),
            "json",
        )
        .await
        .json::<Value>()
        .await
        .unwrap()["rows"]
        .clone();
    let expected = expected.as_array().unwrap();
    assert!(
        !expected.is_empty(),
        "the fixture has paid lines of 2+ units"
    );
    assert_eq!(rows.len(), expected.len());
    for (row, want) in rows.iter().zip(expected) {
        assert_eq!(row.get::<_, String>(0), want[0].as_str().unwrap());
        assert_eq!(row.get::<_, String>(1), want[1].as_str().unwrap());
        assert_eq!(row.get::<_, i64>(2), want[2].as_i64().unwrap());
        let price: rust_decimal::Decimal = row.get(3);
        let want_price: rust_decimal::Decimal = want[3].as_str().unwrap().parse().unwrap();
        assert_eq!(price, want_price);
        assert_eq!(row.get::<_, String>(4), "paid");
        let at: chrono::DateTime<chrono::Utc> = row.get(5);
        let want_at = want[5].as_str().unwrap();
        assert_eq!(
            at,
            chrono::DateTime::parse_from_rfc3339(&want_at.replace(' ', "T"))
                .or_else(|_| chrono::DateTime::parse_from_rfc3339(&format!(
                    "{}Z",
                    want_at.trim_end_matches('Z')
                )))
                .unwrap_or_else(|e| panic!("{want_at}: {e}"))
        );
    }

    // The common types, binary on the wire.
    let row = client
        .query_one(
            "SELECT CAST(7 AS INT) AS i, CAST(7 AS BIGINT) AS b, CAST(2.5 AS DOUBLE) AS f, \
             CAST(1.25 AS DECIMAL(10,2)) AS n, 'text' AS t, true AS ok, \
             CAST('2026-11-25T10:00:00Z' AS TIMESTAMP WITH TIME ZONE) AS at, \
             CAST('2026-11-25' AS DATE) AS d",
            &[],
        )
        .await
        .expect("typed row");
    assert_eq!(row.get::<_, i32>("i"), 7);
    assert_eq!(row.get::<_, i64>("b"), 7);
    assert_eq!(row.get::<_, f64>("f"), 2.5);
    assert_eq!(
        row.get::<_, rust_decimal::Decimal>("n"),
        "1.25".parse().unwrap()
    );
    assert_eq!(row.get::<_, &str>("t"), "text");
    assert!(row.get::<_, bool>("ok"));
    assert_eq!(
        row.get::<_, chrono::DateTime<chrono::Utc>>("at")
            .to_rfc3339(),
        "2026-11-25T10:00:00+00:00"
    );
    assert_eq!(
        row.get::<_, chrono::NaiveDate>("d").to_string(),
        "2026-11-25"
    );
    // The same over the simple protocol, as text.
    let simple = client
        .simple_query("SELECT CAST(1.25 AS DECIMAL(10,2)) AS n, true AS ok")
        .await
        .expect("simple query");
    let text_row = simple
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .expect("a row");
    assert_eq!(text_row.get("n"), Some("1.25"));
    assert_eq!(text_row.get("ok"), Some("t"));
    // A prepared statement runs again with other values.
    let stmt = client
        .prepare("SELECT count(*) FROM orders WHERE sku = $1")
        .await
        .expect("prepare");
    for sku in ["S1", "S2", "nope"] {
        let n: i64 = client.query_one(&stmt, &[&sku]).await.unwrap().get(0);
        let want = server
            .sql_as(
                ADMIN,
                "SELECT count(*) FROM orders WHERE sku = $1",
                json!([sku]),
                "json",
            )
            .await
            .json::<Value>()
            .await
            .unwrap()["rows"][0][0]
            .as_i64()
            .unwrap();
        assert_eq!(n, want, "sku {sku}");
    }
    // Session commands drivers send.
    client
        .batch_execute(
            "SET application_name = 'bi-test'; SET statement_timeout = '20s'; BEGIN; COMMIT",
        )
        .await
        .expect("session commands");
    let shown: String = client
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(shown, "20000");

    // What Grafana's PostgreSQL data source and Metabase's sync send (in their shape):
    // each runs, and lists Quiver's tables and columns.
    let grafana_tables = "SELECT CASE WHEN quote_ident(table_schema) IN (SELECT CASE WHEN \
        trim(s[i]) = '\"$user\"' THEN user ELSE trim(s[i]) END FROM generate_series(\
        array_lower(string_to_array(current_setting('search_path'),','),1), \
        array_upper(string_to_array(current_setting('search_path'),','),1)) as i, \
        string_to_array(current_setting('search_path'),',') s) THEN quote_ident(table_name) \
        ELSE quote_ident(table_schema) || '.' || quote_ident(table_name) END AS \"table\" \
        FROM information_schema.tables WHERE quote_ident(table_schema) NOT IN \
        ('information_schema', 'pg_catalog') ORDER BY 1";
    let grafana_columns = "SELECT quote_ident(column_name) AS \"column\", data_type AS \"type\" \
        FROM information_schema.columns WHERE quote_ident(table_name) = 'orders'";
    let metabase = [
        "SET extra_float_digits = 2",
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ UNCOMMITTED",
        "SHOW TRANSACTION ISOLATION LEVEL",
        "SELECT nspname AS \"TABLE_SCHEM\", current_database() AS \"TABLE_CATALOG\" FROM \
         pg_catalog.pg_namespace WHERE nspname <> 'pg_toast' AND (nspname !~ '^pg_temp_' OR \
         nspname = (pg_catalog.current_schemas(true))[1]) ORDER BY \"TABLE_SCHEM\"",
        "SELECT n.nspname AS schema, c.relname AS name, CASE c.relkind WHEN 'r' THEN 'TABLE' \
         WHEN 'v' THEN 'VIEW' ELSE NULL END AS type, d.description, stat.n_live_tup \
         FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n ON c.relnamespace = n.oid \
         LEFT JOIN pg_catalog.pg_description AS d ON c.oid = d.objoid AND d.objsubid = '0' \
         AND d.classoid = 'pg_class'::regclass LEFT JOIN pg_stat_user_tables AS stat \
         ON n.nspname = stat.schemaname AND c.relname = stat.relname WHERE n.nspname !~ '^pg_' \
         AND n.nspname <> 'information_schema' AND c.relkind IN ('r', 'p', 'v', 'f', 'm') \
         AND n.nspname IN ('public') ORDER BY type, schema, name",
        "SHOW timezone",
    ];
    let rows_of = |messages: Vec<tokio_postgres::SimpleQueryMessage>| -> Vec<Vec<String>> {
        messages
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                    (0..r.len())
                        .map(|i| r.get(i).unwrap_or_default().to_owned())
                        .collect(),
                ),
                _ => None,
            })
            .collect()
    };
    let listed = rows_of(
        client
            .simple_query(grafana_tables)
            .await
            .expect("Grafana's tables"),
    );
    for name in ["orders", "inventory", "stock_on_hand"] {
        assert!(
            listed.iter().any(|r| r[0].ends_with(name)),
            "Grafana's table list has {name}: {listed:?}"
        );
    }
    let columns = rows_of(
        client
            .simple_query(grafana_columns)
            .await
            .expect("Grafana's columns"),
    );
    assert!(columns.iter().any(|r| r[0] == "event_time"), "{columns:?}");
    let mut last = Vec::new();
    for query in metabase {
        last = rows_of(
            client
                .simple_query(query)
                .await
                .unwrap_or_else(|e| panic!("Metabase's {query}: {e}")),
        );
        if query.contains("relkind") {
            assert!(
                last.iter().any(|r| r[1] == "orders" && r[2] == "TABLE")
                    && last
                        .iter()
                        .any(|r| r[1] == "stock_on_hand" && r[2] == "VIEW"),
                "Metabase's table list: {last:?}"
            );
        }
    }
    assert_eq!(last, vec![vec!["UTC".to_owned()]]);

    // Refusals, each with a clear SQLSTATE and message.
    let Err(err) = pg_connect(&server, "qv_nope_nope").await else {
        panic!("a bad token is refused");
    };
    assert_eq!(code_of(&err), "28P01", "{err}");
    let reader = token(&server, &["read"]).await;
    let ingest_only = token(&server, &["ingest"]).await;
    let Err(err) = pg_connect(&server, &ingest_only).await else {
        panic!("an ingest token cannot query");
    };
    assert_eq!(code_of(&err), "28000", "{err}");
    let read_client = pg_connect(&server, &reader)
        .await
        .expect("read token connects");
    let n: i64 = read_client
        .query_one("SELECT count(*) FROM inventory", &[])
        .await
        .unwrap()
        .get(0);
    assert!(n > 0);
    let err = read_client
        .batch_execute(
            "CREATE MATERIALIZED VIEW mine AS SELECT sku, count(*) AS n FROM orders GROUP BY sku",
        )
        .await
        .expect_err("a read token cannot run DDL");
    assert_eq!(code_of(&err), "42501", "{err}");
    assert!(
        err.as_db_error().unwrap().message().contains("admin scope"),
        "{err}"
    );
    for hostile in [
        "COPY orders TO '/tmp/out.csv'",
        "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'",
        "INSERT INTO orders (event_id) VALUES ('x')",
        "DROP TABLE orders",
    ] {
        let err = read_client.simple_query(hostile).await.expect_err(hostile);
        let db = err
            .as_db_error()
            .unwrap_or_else(|| panic!("{hostile}: {err}"));
        assert!(
            ["25006", "42601", "42501"].contains(&db.code().code()),
            "{hostile}: {} {}",
            db.code().code(),
            db.message()
        );
    }
    let err = read_client
        .simple_query("SET datafusion.runtime.memory_limit = '100G'")
        .await
        .expect_err("engine settings are fixed");
    assert_eq!(code_of(&err), "42501", "{err}");
    let err = read_client
        .query("SELECT nosuchcolumn FROM orders", &[])
        .await
        .expect_err("bad column");
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("nosuchcolumn"),
        "{err}"
    );
    // After errors the connection still answers.
    let one: i64 = read_client
        .query_one("SELECT CAST(1 AS BIGINT)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(one, 1);

    // An admin runs DDL over the wire; the view is then listed and queryable.
    client
        .batch_execute(
            "CREATE MATERIALIZED VIEW pg_units AS SELECT sku, sum(quantity) AS units FROM orders GROUP BY sku",
        )
        .await
        .expect("admin DDL");
    let units: i64 = client
        .query_one("SELECT sum(units) FROM pg_units", &[])
        .await
        .unwrap()
        .get(0);
    let want = server.sql_rows("SELECT sum(quantity) FROM orders").await[0][0]
        .as_i64()
        .unwrap();
    assert_eq!(units, want);
    assert!(psql_ok(&server, "\\dv").contains("pg_units"));
}

#[tokio::test(flavor = "multi_thread")]
async fn python_psycopg_sqlalchemy_and_adbc_flight_sql() {
    let dir = tempfile::tempdir().unwrap();
    let server = fixture_server(dir.path(), &[]).await;
    let reader = token(&server, &["read"]).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/test_bi.py");
    let python = std::env::var("QUIVER_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let run = tokio::process::Command::new(python)
        .arg(&script)
        .env("QUIVER_URL", &server.url)
        .env("QUIVER_PG_PORT", server.pg_port.to_string())
        .env("QUIVER_FLIGHT_PORT", server.flight_port.to_string())
        .env("QUIVER_ADMIN_TOKEN", ADMIN)
        .env("QUIVER_READ_TOKEN", &reader)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("the Python tests finish in 5 minutes")
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "Python BI tests failed:\n{}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_wire_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, key) = crate::edge::certificate(dir.path(), "pg");
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let server = TestServer::start(
        dir.path(),
        &["--pg-tls-cert", cert.as_str(), "--pg-tls-key", key.as_str()],
    )
    .await;
    let connect = |sslmode: &str| {
        std::process::Command::new("psql")
            .arg(format!(
                "host=127.0.0.1 port={} user=analyst dbname=quiver sslmode={sslmode}",
                server.pg_port
            ))
            .args(["-X", "-At", "-c", "SELECT CAST(1 AS BIGINT)"])
            .env("PGPASSWORD", ADMIN)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .expect("psql runs")
    };
    // sslmode=require fails unless the server really negotiates TLS.
    let out = connect("require");
    assert!(
        out.status.success(),
        "psql over TLS: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    let out = std::process::Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=analyst dbname=quiver sslmode=require",
            server.pg_port
        ))
        .args(["-X", "-At", "-c", "\\conninfo"])
        .env("PGPASSWORD", ADMIN)
        .output()
        .expect("psql runs");
    let info = String::from_utf8_lossy(&out.stdout);
    assert!(info.contains("SSL connection"), "{info}");
}
