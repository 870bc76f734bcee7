#!/usr/bin/env bash
# Alert rules under load: two runs of a release `quiver serve` on a scratch store, the
# same ingest rate and push subscribers in each, first without alert rules and then
# with N rules over stock_on_hand and low_stock (each on its own SKU, notifying a
# webhook receiver the driver runs). Prints, per run, ingest throughput, push latency
# (ack -> delta at the client) and, with rules, ack -> webhook arrival as a probe
# crosses one rule's line after another.
#
#   benches/alerts.sh [duration] [rate] [rules] [subscribers]
#   benches/alerts.sh 3m 20000 1000 100
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
duration="${1:-3m}"
rate="${2:-20000}"
rules="${3:-1000}"
subscribers="${4:-100}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/quiver-target}"
cargo build --release -p quiver-api -p quiver-benches --bin quiver --bin push-bench
bin="$CARGO_TARGET_DIR/release"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

scratch="$(mktemp -d)"
port=18091
token="bench-admin-token"
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$scratch"' EXIT

for n in 0 "$rules"; do
  rm -rf "$scratch/store" "$scratch/wal"
  QUIVER_ADMIN_TOKEN="$token" QUIVER_LOG="warn" "$bin/quiver" serve \
    --store "file://$scratch/store" --wal-dir "$scratch/wal" --http-addr "127.0.0.1:$port" \
    --upkeep-interval 0s >"$scratch/server-$n.log" 2>&1 &
  pid=$!
  wait_ready "$port"
  echo "== $n alert rules, $rate events/s, $subscribers subscribers, $duration"
  "$bin/push-bench" --url "http://127.0.0.1:$port" --token "$token" --subscribers "$subscribers" \
    --rate "$rate" --duration "$duration" --window 30s --server-pid "$pid" --alert-rules "$n"
  curl -s "http://127.0.0.1:$port/metrics" \
    | grep -E '^quiver_alert_(eval_seconds_(sum|count)|deliveries_total|transitions_total|outbox)[ {]' \
    | sed 's/^/  /' || true
  kill -TERM "$pid"; wait "$pid" || true
done
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r)"
