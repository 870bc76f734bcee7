#!/usr/bin/env bash
# Ingest under a client that never backs off: `wrk` posts one 1,000-event `orders` body
# over N connections as fast as it can and ignores `Retry-After`. Starts a release
# `quiver serve` on a scratch local store for each format (NDJSON, then Arrow IPC) and
# prints accepted events/s, refusals by status, wrk's latency and the server's peak RSS.
#
#   benches/ingest_wrk.sh [duration] [connections]
#
# QUIVER_BENCH_SERVE_ARGS adds flags to `quiver serve` (e.g. "--kpi-dir none");
# QUIVER_BENCH_NO_BUILD=1 uses the release binaries as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
duration="${1:-15s}"
connections="${2:-16}"
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/quiver-target}"
[ -n "${QUIVER_BENCH_NO_BUILD:-}" ] || cargo build --release -p quiver-api -p quiver-benches --bins
bin="$CARGO_TARGET_DIR/release"

scratch="$(mktemp -d)"
port=18081
token="bench-admin-token"
pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$scratch"' EXIT

for format in ndjson arrow; do
  case "$format" in
    ndjson) ctype="application/x-ndjson" ;;
    arrow) ctype="application/vnd.apache.arrow.stream" ;;
  esac
  "$bin/ingest-load" --url "http://127.0.0.1:$port" --token "$token" --format "$format" \
    --batch 1000 --write-body "$scratch/body.$format"
  start_scratch_server "$port" "$format"
  ( while kill -0 "$pid" 2>/dev/null; do
      awk '/VmRSS/{print $2}' "/proc/$pid/status" 2>/dev/null
      sleep 0.5
    done ) >"$scratch/rss-$format" &
  sampler=$!
  BODY="$scratch/body.$format" CONTENT_TYPE="$ctype" TOKEN="$token" \
    wrk -t2 -c"$connections" -d"$duration" --latency -s benches/wrk/post.lua \
    "http://127.0.0.1:$port/v1/streams/orders/events" | tee "$scratch/wrk-$format"
  curl -s "http://127.0.0.1:$port/metrics" \
    | grep -E '^quiver_(ingest_events_total|ingest_waits_total|ingest_wait_seconds_(sum|count)|flush_events_total|flush_seconds_(sum|count))' \
    | sed 's/^/  /'
  kill -TERM "$pid"; wait "$pid" || true
  pid=""
  kill "$sampler" 2>/dev/null || true
  peak=$(sort -n "$scratch/rss-$format" | tail -1)
  ok=$(grep -o '200=[0-9]*' "$scratch/wrk-$format" | cut -d= -f2)
  all=$(awk '/requests in/{print $1}' "$scratch/wrk-$format")
  secs=$(awk '/requests in/{sub(/s,/,"",$4); print $4}' "$scratch/wrk-$format")
  awk -v ok="${ok:-0}" -v all="$all" -v secs="$secs" -v peak="$peak" -v f="$format" 'BEGIN {
    printf "%s: accepted %.0f events/s, refused %.2f%% of %d requests, server RSS peak %.0f MiB\n",
      f, ok * 1000 / secs, (all - ok) * 100 / all, all, peak / 1024 }'
done
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r)"
