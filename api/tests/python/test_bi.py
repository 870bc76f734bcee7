"""Python BI clients against a running Quiver: psycopg 3, SQLAlchemy reflection and
ADBC Flight SQL. Run by the Rust test `python_psycopg_sqlalchemy_and_adbc_flight_sql`,
which starts the server and passes its ports and tokens in the environment. Every
answer is compared with the same query over HTTP.
"""

import json
import os
import sys
import unittest
import urllib.request
from decimal import Decimal

import adbc_driver_flightsql
import adbc_driver_flightsql.dbapi as flight_dbapi
import adbc_driver_manager
import psycopg
import sqlalchemy as sa

URL = os.environ["QUIVER_URL"]
PG_PORT = int(os.environ["QUIVER_PG_PORT"])
FLIGHT_PORT = int(os.environ["QUIVER_FLIGHT_PORT"])
ADMIN = os.environ["QUIVER_ADMIN_TOKEN"]
READ = os.environ["QUIVER_READ_TOKEN"]


def http_rows(sql, params=None):
    body = json.dumps({"sql": sql, "params": params or []}).encode()
    req = urllib.request.Request(
        f"{URL}/v1/sql",
        data=body,
        headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)["rows"]


def pg_dsn(token):
    return f"host=127.0.0.1 port={PG_PORT} user=analyst dbname=quiver password={token} sslmode=disable"


def flight_connect(token, basic=False):
    uri = f"grpc://127.0.0.1:{FLIGHT_PORT}"
    if basic:
        kwargs = {"db_kwargs": {"username": "analyst", "password": token}}
    else:
        kwargs = {
            "db_kwargs": {
                adbc_driver_flightsql.DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {token}"
            }
        }
    return flight_dbapi.connect(uri, **kwargs)


class Psycopg(unittest.TestCase):
    def test_queries_with_parameters_text_and_binary(self):
        want = http_rows(
            "SELECT order_id, quantity, CAST(unit_price AS VARCHAR) FROM orders "
            "WHERE quantity >= $1 ORDER BY event_id",
            [2],
        )
        self.assertTrue(want)
        with psycopg.connect(pg_dsn(READ)) as conn:
            for binary in (False, True):
                with conn.cursor(binary=binary) as cur:
                    cur.execute(
                        "SELECT order_id, quantity, unit_price FROM orders "
                        "WHERE quantity >= %s ORDER BY event_id",
                        (2,),
                    )
                    got = cur.fetchall()
                self.assertEqual(len(got), len(want))
                for (order_id, qty, price), w in zip(got, want):
                    self.assertEqual(order_id, w[0])
                    self.assertEqual(qty, w[1])
                    self.assertEqual(price, Decimal(w[2]))
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM stock_on_hand")
                (n,) = cur.fetchone()
                self.assertEqual(n, http_rows("SELECT count(*) FROM stock_on_hand")[0][0])

    def test_refusals(self):
        with self.assertRaises(psycopg.OperationalError) as ctx:
            psycopg.connect(pg_dsn("qv_wrong_token")).close()
        self.assertIn("password authentication failed", str(ctx.exception))
        with psycopg.connect(pg_dsn(READ), autocommit=True) as conn:
            with self.assertRaises(psycopg.errors.InsufficientPrivilege) as ctx:
                conn.execute("DROP MATERIALIZED VIEW stock_on_hand")
            self.assertIn("admin scope", str(ctx.exception))
            with self.assertRaises(psycopg.Error) as ctx:
                conn.execute("COPY orders TO '/tmp/x.csv'")
            self.assertIn("not allowed", str(ctx.exception))
            # The connection still works.
            self.assertEqual(conn.execute("SELECT 1 + 1").fetchone()[0], 2)


class SqlAlchemy(unittest.TestCase):
    def test_reflection(self):
        engine = sa.create_engine(
            f"postgresql+psycopg://analyst:{READ}@127.0.0.1:{PG_PORT}/quiver"
        )
        try:
            inspector = sa.inspect(engine)
            self.assertIn("public", inspector.get_schema_names())
            tables = inspector.get_table_names()
            self.assertIn("orders", tables)
            self.assertIn("inventory", tables)
            views = inspector.get_view_names()
            self.assertIn("stock_on_hand", views)
            columns = {c["name"]: c for c in inspector.get_columns("orders")}
            for name in ("event_id", "event_time", "quantity", "unit_price", "status"):
                self.assertIn(name, columns)
            self.assertIsInstance(columns["quantity"]["type"], sa.BigInteger)
            self.assertIsInstance(columns["event_time"]["type"], sa.TIMESTAMP)
            # Table(autoload_with=…) also reflects keys and indexes, whose catalog
            # queries (unnest over pg_constraint) DataFusion cannot plan yet; build the
            # table from the reflected columns instead.
            table = sa.Table(
                "orders",
                sa.MetaData(),
                *[sa.Column(c["name"], c["type"]) for c in inspector.get_columns("orders")],
            )
            with engine.connect() as conn:
                n = conn.execute(
                    sa.select(sa.func.count()).select_from(table).where(table.c.quantity >= 2)
                ).scalar_one()
            self.assertEqual(n, http_rows("SELECT count(*) FROM orders WHERE quantity >= 2")[0][0])
        finally:
            engine.dispose()


class AdbcFlightSql(unittest.TestCase):
    def test_query_prepared_and_metadata(self):
        want = http_rows("SELECT sku, sum(quantity) AS units FROM orders GROUP BY sku ORDER BY sku")
        for basic in (False, True):
            with flight_connect(READ, basic=basic) as conn, conn.cursor() as cur:
                cur.execute("SELECT sku, sum(quantity) AS units FROM orders GROUP BY sku ORDER BY sku")
                table = cur.fetch_arrow_table()
                self.assertEqual(
                    [[r["sku"], r["units"]] for r in table.to_pylist()],
                    want,
                )
        with flight_connect(READ) as conn, conn.cursor() as cur:
            # A prepared statement with a parameter, run with two values.
            for sku in ("S1", "S2"):
                cur.execute("SELECT count(*) AS n FROM orders WHERE sku = $1", parameters=(sku,))
                (n,) = cur.fetchone()
                self.assertEqual(
                    n, http_rows("SELECT count(*) FROM orders WHERE sku = $1", [sku])[0][0]
                )
            # Metadata: catalogs, schemas, tables (GetCatalogs/GetDbSchemas/GetTables).
            objects = conn.adbc_get_objects().read_all().to_pylist()
            self.assertEqual([c["catalog_name"] for c in objects], ["quiver"])
            schemas = objects[0]["catalog_db_schemas"]
            self.assertEqual([s["db_schema_name"] for s in schemas], ["public"])
            tables = {t["table_name"]: t["table_type"] for t in schemas[0]["db_schema_tables"]}
            self.assertEqual(tables.get("orders"), "TABLE")
            self.assertEqual(tables.get("stock_on_hand"), "VIEW")
            schema = conn.adbc_get_table_schema("orders", catalog_filter="quiver", db_schema_filter="public")
            self.assertIn("event_time", schema.names)
            self.assertEqual(
                set(conn.adbc_get_table_types()), {"TABLE", "VIEW"}
            )
            # GetSqlInfo.
            info = conn.adbc_get_info()
            self.assertEqual(info.get("vendor_name"), "Quiver")

    def test_ddl_as_update(self):
        with flight_connect(ADMIN) as conn, conn.cursor() as cur:
            cur.adbc_statement.set_sql_query(
                "CREATE MATERIALIZED VIEW flight_units AS "
                "SELECT sku, sum(quantity) AS units FROM orders GROUP BY sku"
            )
            cur.adbc_statement.execute_update()
            cur.execute("SELECT sum(units) FROM flight_units")
            self.assertEqual(cur.fetchone()[0], http_rows("SELECT sum(quantity) FROM orders")[0][0])
        with flight_connect(READ) as conn, conn.cursor() as cur:
            cur.adbc_statement.set_sql_query("DROP MATERIALIZED VIEW flight_units")
            with self.assertRaises(adbc_driver_manager.Error) as ctx:
                cur.adbc_statement.execute_update()
            self.assertIn("admin scope", str(ctx.exception))

    def test_refusals(self):
        with self.assertRaises(adbc_driver_manager.Error) as ctx:
            with flight_connect("qv_wrong_token") as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
                cur.fetchall()
        self.assertIn("token is not valid", str(ctx.exception))
        with flight_connect(READ) as conn, conn.cursor() as cur:
            with self.assertRaises(adbc_driver_manager.Error) as ctx:
                cur.execute("DROP MATERIALIZED VIEW stock_on_hand")
                cur.fetchall()
            self.assertIn("admin scope", str(ctx.exception))
            with self.assertRaises(adbc_driver_manager.Error) as ctx:
                cur.execute("CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'")
                cur.fetchall()
            self.assertIn("not allowed", str(ctx.exception))


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    sys.exit(0 if result.wasSuccessful() else 1)
