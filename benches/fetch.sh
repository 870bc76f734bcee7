#!/usr/bin/env bash
# Fetching a large result over each SQL surface, same run: loads N generated order
# events into a scratch release server, then fetches `SELECT * FROM orders` over Arrow
# Flight SQL, the Postgres wire protocol and HTTP `format=arrow`, printing rows/s.
#
#   benches/fetch.sh [rows] [rounds]
#   benches/fetch.sh 5000000 3
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
rows="${1:-5000000}"
rounds="${2:-3}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/quiver-target}"
[ -n "${QUIVER_BENCH_SKIP_BUILD:-}" ] || cargo build --release -p quiver-api -p quiver-benches --bin quiver --bin fetch-bench
bin="$CARGO_TARGET_DIR/release"

scratch="$(mktemp -d)"
port=18091; pg_port=15433; flight_port=15051
token="bench-admin-token"
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$scratch"' EXIT

QUIVER_ADMIN_TOKEN="$token" QUIVER_LOG=warn "$bin/quiver" serve \
  --store "file://$scratch/store" --http-addr "127.0.0.1:$port" \
  --pg-addr "127.0.0.1:$pg_port" --flight-addr "127.0.0.1:$flight_port" \
  --kpi-dir none --upkeep-interval 0s --query-timeout 10m \
  --max-result-bytes 17179869184 >"$scratch/server.log" 2>&1 &
pid=$!
wait_ready "$port"

echo "== loading $rows order events"
"$bin/quiver" generate --events "$((rows * 8 / 5))" --format arrow --out "$scratch/gen" --seed 7 \
  --start 2026-11-01T00:00:00Z >/dev/null
"$bin/quiver" load "$scratch/gen/orders.arrow" --stream orders \
  --url "http://127.0.0.1:$port" --token "$token" --batch 50000
loaded=$(curl -s "http://127.0.0.1:$port/v1/sql" -H "authorization: Bearer $token" \
  -H 'content-type: application/sql' --data 'SELECT count(*) FROM orders' \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["rows"][0][0])')
echo "orders: $loaded rows"

echo "== fetching"
"$bin/fetch-bench" --url "http://127.0.0.1:$port" --pg-port "$pg_port" \
  --flight-port "$flight_port" --token "$token" --rounds "$rounds" \
  --sql "SELECT * FROM orders LIMIT $rows"
echo "server RSS: $(ps -o rss= -p "$pid" | awk '{printf "%.0f MiB", $1/1024}')"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r)"
