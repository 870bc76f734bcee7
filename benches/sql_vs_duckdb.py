"""Times each KPI query of DESIGN.md as an ad-hoc SELECT through Quiver's HTTP SQL
endpoint (Arrow results) and through DuckDB over the same Parquet files, same machine,
same run. Usage: sql_vs_duckdb.py URL TOKEN STORE_DIR [RUNS]"""

import json
import statistics
import sys
import time
import urllib.error
import urllib.request

import duckdb
import pyarrow.ipc as ipc

url, token, store = sys.argv[1], sys.argv[2], sys.argv[3]
runs = int(sys.argv[4]) if len(sys.argv) > 4 else 5

# (name, Quiver SQL, DuckDB SQL). DuckDB spells date_bin as time_bucket; both bucket
# from the same origin for minutes and hours.
QUERIES = [
    ("revenue_per_minute",
     "SELECT date_bin(INTERVAL '1 minute', event_time) AS minute, warehouse_id, SUM(quantity * unit_price) AS revenue, COUNT(*) AS paid_lines, COUNT(DISTINCT order_id) AS orders FROM orders WHERE status = 'paid' GROUP BY 1, 2",
     "SELECT time_bucket(INTERVAL '1 minute', event_time) AS minute, warehouse_id, SUM(quantity * unit_price) AS revenue, COUNT(*) AS paid_lines, COUNT(DISTINCT order_id) AS orders FROM orders WHERE status = 'paid' GROUP BY 1, 2"),
    ("hourly_sales_by_sku",
     "SELECT date_bin(INTERVAL '1 hour', event_time) AS hour, sku, SUM(quantity) AS units, AVG(unit_price) AS avg_price, MIN(unit_price) AS min_price, MAX(unit_price) AS max_price, COUNT(DISTINCT customer_id) AS customers FROM orders WHERE status = 'paid' GROUP BY 1, 2",
     "SELECT time_bucket(INTERVAL '1 hour', event_time) AS hour, sku, SUM(quantity) AS units, AVG(unit_price) AS avg_price, MIN(unit_price) AS min_price, MAX(unit_price) AS max_price, COUNT(DISTINCT customer_id) AS customers FROM orders WHERE status = 'paid' GROUP BY 1, 2"),
    ("stock_on_hand",
     "SELECT sku, warehouse_id, SUM(quantity) AS on_hand, MAX(event_time) AS last_movement, COUNT(*) AS movements FROM inventory GROUP BY sku, warehouse_id",
     None),
    ("low_stock",
     "SELECT sku, warehouse_id, on_hand FROM (SELECT sku, warehouse_id, SUM(quantity) AS on_hand FROM inventory GROUP BY sku, warehouse_id) WHERE on_hand < 20",
     None),
    ("orders_current",
     "SELECT DISTINCT ON (order_id, sku) order_id, sku, customer_id, warehouse_id, status, quantity, unit_price, event_time FROM orders ORDER BY order_id, sku, event_time DESC",
     None),
    ("orders_by_status",
     "WITH c AS (SELECT DISTINCT ON (order_id, sku) status, quantity, unit_price FROM orders ORDER BY order_id, sku, event_time DESC) SELECT status, COUNT(*) AS lines, SUM(quantity * unit_price) AS value, MAX(quantity * unit_price) AS largest_line FROM c GROUP BY status",
     None),
    ("units_sold",
     "SELECT sku, warehouse_id, SUM(quantity) AS units_sold FROM orders WHERE status = 'paid' GROUP BY sku, warehouse_id",
     None),
    ("sell_through",
     "WITH s AS (SELECT sku, warehouse_id, SUM(quantity) AS on_hand FROM inventory GROUP BY 1, 2), u AS (SELECT sku, warehouse_id, SUM(quantity) AS units_sold FROM orders WHERE status = 'paid' GROUP BY 1, 2) SELECT s.sku, s.warehouse_id, s.on_hand, COALESCE(u.units_sold, 0) AS units_sold FROM s LEFT JOIN u ON s.sku = u.sku AND s.warehouse_id = u.warehouse_id",
     None),
]


def quiver(sql):
    req = urllib.request.Request(
        f"{url}/v1/sql?format=arrow",
        data=json.dumps({"sql": sql}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:
        raise SystemExit(f"quiver refused {sql!r}: {e.code} {e.read().decode()}") from e
    return ipc.open_stream(body).read_all().num_rows


def timed(fn, sql):
    fn(sql)  # warm-up: caches, page cache
    times, rows = [], None
    for _ in range(runs):
        t = time.perf_counter()
        rows = fn(sql)
        times.append(time.perf_counter() - t)
    return statistics.median(times), rows


con = duckdb.connect()
con.execute("SET threads = 2")
con.execute("SET TimeZone = 'UTC'")
for stream in ("orders", "inventory"):
    con.execute(
        f"CREATE VIEW {stream} AS SELECT * FROM read_parquet('{store}/tables/{stream}/**/*.parquet', hive_partitioning = true)"
    )


def duck(sql):
    return con.sql(sql).to_arrow_table().num_rows


counts_q = "SELECT (SELECT COUNT(*) FROM orders) + (SELECT COUNT(*) FROM inventory)"
req = urllib.request.Request(f"{url}/v1/sql", data=json.dumps({"sql": counts_q}).encode(),
                             headers={"Authorization": f"Bearer {token}"})
q_events = json.load(urllib.request.urlopen(req))["rows"][0][0]
d_events = con.sql(counts_q).fetchall()[0][0]
print(f"events: quiver {q_events}, duckdb {d_events}")
assert q_events == d_events, "both must read the same events"

print(f"{'query':<22}{'rows':>9}{'quiver ms':>11}{'duckdb ms':>11}{'ratio':>8}")
worst, ratios = 0.0, []
for name, qsql, dsql in QUERIES:
    q_t, q_rows = timed(quiver, qsql)
    d_t, d_rows = timed(duck, dsql or qsql)
    assert q_rows == d_rows, f"{name}: quiver {q_rows} rows, duckdb {d_rows}"
    ratio = q_t / d_t
    worst = max(worst, ratio)
    ratios.append(ratio)
    print(f"{name:<22}{q_rows:>9}{q_t * 1000:>11.1f}{d_t * 1000:>11.1f}{ratio:>7.2f}x")
geomean = statistics.geometric_mean(ratios)
print(f"worst ratio {worst:.2f}x, geometric mean {geomean:.2f}x (target <= 1.0x each); duckdb {duckdb.__version__}, median of {runs} runs after a warm-up")
