#!/usr/bin/env bash
# The whole forecast job at scale (issue 19's benchmark), all from outside the process:
#  1. `forecast-bench write-store`: SERIES generated series x DAYS days of paid order
#     lines (ending yesterday) and opening stock, into a scratch local store;
#  2. `quiver forecast --threads 2` on that store under /usr/bin/time: wall time and
#     peak RSS of the whole job (read, forecast, write three tables, model_runs);
#  3. `forecast-bench score`: the `forecasts` table against the held-out days;
#  4. a release `quiver serve` on the same store with the KPI views, `push-bench`
#     subscribers and ingest at RATE events/s, the forecast job started over HTTP a
#     minute in: push latency while the job runs against while it does not.
#
#   benches/forecast.sh [series] [days] [rate] [push duration]
#   benches/forecast.sh 10000 730 2000 4m
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
series="${1:-10000}"
days="${2:-730}"
rate="${3:-2000}"
duration="${4:-4m}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/quiver-target}"
cargo build --release -p quiver-api -p quiver-benches --bin quiver --bin forecast-bench --bin push-bench
bin="$CARGO_TARGET_DIR/release"
scratch="$(mktemp -d)"
port=18091
token="bench-admin-token"
pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$scratch"' EXIT

echo "== write the store: $series series x $days days"
"$bin/forecast-bench" write-store --store "$scratch/store" --series "$series" --days "$days"
du -sh "$scratch/store/streams" 2>/dev/null || du -sh "$scratch/store"

echo "== quiver forecast --threads 2 (whole job, CLI)"
/usr/bin/time -f "job process: %e s wall, %U s user, %S s system, peak RSS %M KiB" \
  "$bin/quiver" forecast --store "file://$scratch/store" --threads 2 </dev/null
"$bin/forecast-bench" score --store "$scratch/store" --series "$series" --days "$days"

echo "== push latency with and without the job (server, --job-threads 1, $rate events/s)"
QUIVER_ADMIN_TOKEN="$token" QUIVER_LOG=warn "$bin/quiver" serve \
  --store "file://$scratch/store" --http-addr "127.0.0.1:$port" \
  --pg-addr off --flight-addr off >"$scratch/server.log" 2>&1 &
pid=$!
wait_ready "$port"
"$bin/push-bench" --url "http://127.0.0.1:$port" --token "$token" --subscribers 100 \
  --rate "$rate" --requests-per-sec 10 --duration "$duration" --window 20s \
  --server-pid "$pid" --job forecast --job-after 60s
kill -TERM "$pid"; wait "$pid" || true; pid=""
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r)"
