"""Runs a report of ROWS rows in each format against a running Quiver, RUNS times each,
and prints wall time (request to run end, from outside), the server's RSS before and
at its peak during the run (sampled every 50 ms from /proc), and the file size.

    python3 benches/reports.py URL TOKEN PID ROWS RUNS
"""
import json
import sys
import threading
import time
import urllib.request

url, token, pid, rows, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
SQL = (
    "SELECT event_id, event_time, order_id, customer_id, warehouse_id, sku, quantity, "
    f"unit_price, status FROM orders LIMIT {rows}"
)


def call(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=600) as r:
        raw = r.read()
        return raw if path.endswith("/file") else json.loads(raw or b"null")


def rss_mib():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


for fmt in ["csv", "parquet", "xlsx", "pdf"]:
    name = f"bench_{fmt}"
    call("POST", "/v1/reports", {"name": name, "format": fmt, "title": f"{rows} rows",
                                 "queries": [{"title": "Orders", "sql": SQL}]})
    for i in range(runs):
        base = rss_mib()
        peak = [base]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mib())
                time.sleep(0.05)

        t = threading.Thread(target=sample)
        t.start()
        started = time.monotonic()
        run = call("POST", f"/v1/reports/{name}/run")
        while run["state"] not in ("succeeded", "failed"):
            time.sleep(0.05)
            run = call("GET", f"/v1/reports/{name}/runs/{run['id']}")
        wall = time.monotonic() - started
        stop.set()
        t.join()
        if run["state"] != "succeeded":
            print(f"{fmt}: run failed: {run['error']}")
            break
        size = len(call("GET", f"/v1/reports/{name}/runs/{run['id']}/file"))
        print(
            f"{fmt:8} run {i + 1}: rows {run['rows']:>9,}  wall {wall:6.2f} s  "
            f"RSS {base:6.0f} -> peak {peak[0]:6.0f} MiB (+{peak[0] - base:4.0f})  "
            f"file {size / 1048576:7.1f} MiB"
        )
