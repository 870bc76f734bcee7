#!/usr/bin/env python3
"""Checks the expected results in sql/tests/*.slt against DuckDB.

The .slt files run against a real Quiver (the `sql` integration test). Their expected
rows are meant to be what SQL says, not what Quiver happens to print; this script keeps
that true. It loads the same fixture CSVs (sql/tests/data) into DuckDB with the
streams' types, creates the KPI views of sql/kpis as plain views, runs every `query`
record of every .slt file whose SQL DuckDB can run, and compares the rows value by
value: numbers as exact decimals (DuckDB averages in floating point, so those compare
to 9 significant places), instants as UTC instants, text as text, row order ignored.

A record DuckDB cannot check is skipped for a stated reason (Quiver's own catalog,
EXPLAIN output, refusals); the run ends with a count of both, and fails if any record
differs or if fewer records were checked than MIN_CHECKED.

usage: python3 sql/tests/check_duckdb.py   (needs `pip install duckdb`)
"""

import datetime as dt
import decimal
import pathlib
import re
import sys

import duckdb

ROOT = pathlib.Path(__file__).resolve().parent
DATA = ROOT / "data"
KPIS = ROOT.parent / "kpis"
# Raised as records are added; a drop means records stopped being checked.
MIN_CHECKED = 40
# The views' now() in the test servers (`--view-clock-start` in
# api/tests/integration/common.rs): the KPIs' retention is judged at that time.
VIEW_CLOCK = "TIMESTAMPTZ '2026-11-25 12:00:00+00'"

COLUMNS = {
    "orders": {
        "event_id": "VARCHAR", "event_time": "TIMESTAMPTZ", "order_id": "VARCHAR",
        "customer_id": "VARCHAR", "warehouse_id": "VARCHAR", "sku": "VARCHAR",
        "quantity": "BIGINT", "unit_price": "DECIMAL(18,2)", "status": "VARCHAR",
        "channel": "VARCHAR",
    },
    "inventory": {
        "event_id": "VARCHAR", "event_time": "TIMESTAMPTZ", "sku": "VARCHAR",
        "warehouse_id": "VARCHAR", "kind": "VARCHAR", "quantity": "BIGINT",
        "unit_cost": "DECIMAL(18,2)",
    },
}

# Records DuckDB cannot stand in for, by a pattern of their SQL, with the reason.
SKIP = [
    (re.compile(r"information_schema", re.I), "Quiver's catalog and type names"),
    (re.compile(r"^\s*EXPLAIN", re.I), "Quiver's own plan output"),
]


def load(con):
    con.execute("SET TimeZone = 'UTC'")
    for stream, cols in COLUMNS.items():
        types = ", ".join(f"'{c}': '{t}'" for c, t in cols.items())
        for part in (1, 2):
            path = DATA / f"{stream}_{part}.csv"
            con.execute(
                f"CREATE TABLE {stream}_{part} AS SELECT *, "
                f"CAST(timezone('UTC', event_time) AS DATE) AS event_date "
                f"FROM read_csv('{path}', header = true, columns = {{{types}}})"
            )
        # Version 1 of each table is the first flush (the *_1.csv files); version 0
        # is the empty table.
        con.execute(f"CREATE TABLE {stream} AS SELECT * FROM {stream}_1 UNION ALL SELECT * FROM {stream}_2")
        con.execute(f"CREATE VIEW {stream}_v1 AS SELECT * FROM {stream}_1")
        con.execute(f"CREATE VIEW {stream}_v0 AS SELECT * FROM {stream}_1 WHERE false")
    for kpi in sorted(KPIS.glob("*.sql")):
        con.execute(translate(kpi.read_text()))


def translate(sql):
    """Quiver SQL to DuckDB SQL, for the few spellings that differ."""
    sql = re.sub(r"--[^\n]*", "", sql)
    sql = re.sub(r"CREATE\s+MATERIALIZED\s+VIEW", "CREATE VIEW", sql, flags=re.I)
    sql = re.sub(r"DROP\s+MATERIALIZED\s+VIEW", "DROP VIEW", sql, flags=re.I)
    sql = re.sub(r"\bdate_bin\s*\(", "time_bucket(", sql, flags=re.I)
    sql = re.sub(r"table_at_version\('(\w+)',\s*(\d+)\)", r"\1_v\2", sql)
    sql = re.sub(r"\b(\w+)\s+VERSION\s+AS\s+OF\s+(\d+)", r"\1_v\2", sql, flags=re.I)
    sql = re.sub(r"\bquiver\.public\.", "", sql)
    sql = re.sub(r"\bpublic\.", "", sql)
    sql = re.sub(r"\bnow\(\)", VIEW_CLOCK, sql, flags=re.I)
    return sql.strip().rstrip(";")


def records(path):
    """(line, kind, header, sql, expected rows) for each record of an .slt file."""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("query") or line.startswith("statement"):
            start = i + 1
            header = line.split()
            body = []
            i += 1
            while i < len(lines) and lines[i].strip() and lines[i] != "----":
                body.append(lines[i])
                i += 1
            expected = []
            if i < len(lines) and lines[i] == "----":
                i += 1
                while i < len(lines) and lines[i].strip():
                    expected.append(lines[i].split())
                    i += 1
            yield start, header[0], header, "\n".join(body), expected
        i += 1


INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def norm_expected(token):
    if token == "NULL":
        return None
    if INSTANT.match(token):
        return dt.datetime.fromisoformat(token.replace("Z", "+00:00"))
    if NUMBER.match(token):
        return decimal.Decimal(token)
    return token


def norm_actual(value):
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc)
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, float):
        return decimal.Decimal(repr(value))
    if isinstance(value, (int, decimal.Decimal)):
        return decimal.Decimal(value)
    return str(value)


def same(a, b):
    if isinstance(a, decimal.Decimal) and isinstance(b, decimal.Decimal):
        if a == b:
            return True
        # A floating-point average against Quiver's exact decimal one.
        scale = max(abs(a), abs(b), decimal.Decimal(1))
        return abs(a - b) <= scale * decimal.Decimal("1e-9")
    return a == b


def rows_match(want, got):
    if len(want) != len(got):
        return False
    key = lambda row: [str(v) for v in row]
    want, got = sorted(want, key=key), sorted(got, key=key)
    return all(
        len(w) == len(g) and all(same(x, y) for x, y in zip(w, g))
        for w, g in zip(want, got)
    )


def main():
    con = duckdb.connect()
    load(con)
    checked = skipped = 0
    failures = []
    for path in sorted(ROOT.glob("*.slt")):
        for line, kind, header, sql, expected in records(path):
            where = f"{path.name}:{line}"
            reason = next((r for p, r in SKIP if p.search(sql)), None)
            if kind == "statement":
                if header[1] == "error":
                    skipped += 1  # a refusal is Quiver's, not SQL's
                    continue
                con.execute(translate(sql))
                continue
            if reason:
                skipped += 1
                print(f"skip  {where}: {reason}")
                continue
            try:
                got = [[norm_actual(v) for v in row] for row in con.execute(translate(sql)).fetchall()]
            except duckdb.Error as e:
                failures.append(f"{where}: DuckDB cannot run it: {e}\n  {sql}")
                continue
            want = [[norm_expected(t) for t in row] for row in expected]
            if rows_match(want, got):
                checked += 1
            else:
                failures.append(f"{where}: differs from DuckDB\n  {sql}\n  slt:    {want}\n  duckdb: {got}")
    for f in failures:
        print(f"FAIL  {f}")
    print(f"{checked} passed, {len(failures)} failed, {skipped} skipped")
    if failures:
        sys.exit(1)
    if checked < MIN_CHECKED:
        print(f"only {checked} records were checked; expected at least {MIN_CHECKED}")
        sys.exit(1)


if __name__ == "__main__":
    main()
