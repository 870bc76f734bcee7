#!/usr/bin/env bash
# Durable ingest throughput over HTTP: starts a release `quiver serve` on a scratch store,
# drives it with 1,000-event requests (NDJSON, then Arrow IPC) from the load driver on
# the same machine, and prints events/s, request latency and server RSS.
#
#   benches/ingest.sh [duration] [concurrency]
#
# QUIVER_BENCH_SERVE_ARGS adds flags to `quiver serve`, e.g. "--kpi-dir none" to
# measure ingest without the KPI views maintained beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
duration="${1:-20s}"
concurrency="${2:-16}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/quiver-target}"
cargo build --release -p quiver-api -p quiver-benches --bins
bin="$CARGO_TARGET_DIR/release"

scratch="$(mktemp -d)"
port=18080
token="bench-admin-token"
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$scratch"' EXIT

for format in ndjson arrow; do
  start_scratch_server "$port" "$format"
  "$bin/ingest-load" --url "http://127.0.0.1:$port" --token "$token" --format "$format" \
    --batch 1000 --concurrency "$concurrency" --duration "$duration" --server-pid "$pid"
  curl -s "http://127.0.0.1:$port/metrics" | grep -E '^quiver_(flush_events_total|flush_seconds_(sum|count)|wal_fsync_seconds_(sum|count))' | sed 's/^/  /'
  kill -TERM "$pid"; wait "$pid" || true
done
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r)"
