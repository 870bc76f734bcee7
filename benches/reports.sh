#!/usr/bin/env bash
# A 1,000,000-row report in each format, timed from outside: generates events with
# `quiver generate`, loads them over HTTP into a release server on a scratch store,
# restarts it (everything flushed to Delta), creates one report per format over
# `SELECT … FROM orders LIMIT 1000000` and runs each through POST /v1/reports/{name}/run,
# timing from the request to the run's end, sampling the server's RSS every 50 ms, and
# downloading the file. benches/reports.py does the runs. Then, on a fresh server with the
# KPI views, 1,000 push subscribers and ingest at 20,000 events/s (push-bench), a
# ROWS-row Excel report of what was ingested runs PUSH_AFTER into the run: push latency
# while it runs against while it does not.
#
#   benches/reports.sh [rows] [runs] [push duration] [push after]
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
rows="${1:-1000000}"
runs="${2:-3}"
push_duration="${3:-3m}"
push_after="${4:-70s}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/quiver-target}"
if [ -z "${QUIVER_BENCH_BIN:-}" ]; then
  cargo build --release -p quiver-api -p quiver-benches --bin quiver --bin push-bench
fi
bin="${QUIVER_BENCH_BIN:-$CARGO_TARGET_DIR/release/quiver}"
push_bench="$(dirname "$bin")/push-bench"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

scratch="$(mktemp -d)"
port=18091
token="bench-admin-token"
pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; rm -rf "$scratch"' EXIT

serve() {
  QUIVER_ADMIN_TOKEN="$token" QUIVER_LOG=warn "$bin" serve \
    --store "file://$scratch/store" --http-addr "127.0.0.1:$port" \
    --upkeep-interval 0s --kpi-dir none --report-dir none >>"$scratch/server.log" 2>&1 &
  pid=$!
  wait_ready "$port"
}

# About 0.8 order lines per event: enough events for the rows asked for.
"$bin" generate --events "$((rows * 3 / 2))" --format arrow --out "$scratch/gen" --seed 11
serve
"$bin" load "$scratch/gen/orders.arrow" --stream orders --url "http://127.0.0.1:$port" --token "$token"
kill -TERM "$pid"; wait "$pid" || true
rm -rf "$scratch/gen"
serve
python3 -u benches/reports.py "http://127.0.0.1:$port" "$token" "$pid" "$rows" "$runs"
kill -TERM "$pid"; wait "$pid" || true

echo "== push latency while a $rows-row Excel report runs (1,000 subscribers, 20,000 events/s)"
rm -rf "$scratch/store"
QUIVER_ADMIN_TOKEN="$token" QUIVER_LOG=warn "$bin" serve \
  --store "file://$scratch/store" --http-addr "127.0.0.1:$port" --upkeep-interval 0s \
  --report-dir none --ws-max-connections-per-token 20000 \
  --ws-max-subscriptions-per-token 20000 >>"$scratch/server.log" 2>&1 &
pid=$!
wait_ready "$port"
curl -sf "http://127.0.0.1:$port/v1/reports" -H "Authorization: Bearer $token" -d "{
  \"name\": \"push_xlsx\", \"format\": \"xlsx\", \"queries\": [{\"sql\":
  \"SELECT event_id, event_time, order_id, customer_id, warehouse_id, sku, quantity, unit_price, status FROM orders LIMIT $rows\"}]}" >/dev/null
"$push_bench" --url "http://127.0.0.1:$port" --token "$token" --subscribers 1000 \
  --rate 20000 --duration "$push_duration" --server-pid "$pid" \
  --job report:push_xlsx --job-after "$push_after"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r)"
