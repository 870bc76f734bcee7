#!/usr/bin/env bash
# WebSocket push under load: starts a release `quiver serve` on a scratch store (the KPI
# views of sql/kpis), connects N subscribers spread over the views (every third with a
# warehouse filter) while ingesting events over HTTP at a fixed rate, and prints the
# latency from ingest acknowledgement to the delta's arrival at the client, per window
# and overall, with the server's RSS.
#
#   benches/push.sh [duration] [rate] [subscriber counts...]
#   benches/push.sh 5m 20000 1000 10000
# Extra server flags: QUIVER_BENCH_SERVER_FLAGS="--view-checkpoint-interval 10m" benches/push.sh …
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
duration="${1:-5m}"
rate="${2:-20000}"
shift 2 || true
counts=("${@:-1000}")
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/quiver-target}"
cargo build --release -p quiver-api -p quiver-benches --bin quiver --bin push-bench
bin="$CARGO_TARGET_DIR/release"
# Two sockets per subscriber on this machine (client and server side).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

scratch="$(mktemp -d)"
port=18090
token="bench-admin-token"
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$scratch"' EXIT

for n in "${counts[@]}"; do
  rm -rf "$scratch/store"
  QUIVER_ADMIN_TOKEN="$token" QUIVER_LOG="warn,quiver_engine::views=info" "$bin/quiver" serve \
    --store "file://$scratch/store" --http-addr "127.0.0.1:$port" --upkeep-interval 0s \
    --ws-max-connections-per-token 20000 --ws-max-subscriptions-per-token 20000 \
    ${QUIVER_BENCH_SERVER_FLAGS:-} >"$scratch/server-$n.log" 2>&1 &
  pid=$!
  wait_ready "$port"
  echo "== $n subscribers, $rate events/s, $duration"
  "$bin/push-bench" --url "http://127.0.0.1:$port" --token "$token" --subscribers "$n" \
    --rate "$rate" --duration "$duration" --server-pid "$pid"
  curl -s "http://127.0.0.1:$port/metrics" \
    | grep -E '^quiver_(ws_(deltas_sent|coalesced|resnapshots|snapshots_sent)_total|ws_delivery_seconds_(sum|count)|ws_snapshot_bytes|view_changes_queued|view_freshness_seconds_(sum|count)|view_batch_seconds_(sum|count)|view_apply_seconds_sum)[ {]' \
    | sed 's/^/  /'
  kill -TERM "$pid"; wait "$pid" || true
  # How long each view checkpoint held the views (encode) and took to store (write), and
  # the chains compacted off the maintainer.
  grep -hoE '(views checkpointed|view checkpoint chain compacted).*' "$scratch/server-$n.log" | sed 's/^/  /' || true
done
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r)"
