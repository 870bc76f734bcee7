#!/usr/bin/env bash
# Backup and recovery at scale, timed from outside: EVENTS generated events (orders and
# inventory) loaded over HTTP into a release server on a scratch store, the server
# stopped (everything flushed), then `quiver backup` to a second folder (the first,
# full backup), more events and a second backup (incremental), `quiver verify` of the
# backups, the store deleted, `quiver restore` into a new store, and a server started on
# it until /ready and its first query. RTO = restore + start to the first answer.
#
#   benches/backup.sh [events]
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
events="${1:-10000000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/quiver-target}"
if [ -z "${QUIVER_BENCH_BIN:-}" ]; then
  cargo build --release -p quiver-api --bin quiver
fi
bin="${QUIVER_BENCH_BIN:-$CARGO_TARGET_DIR/release/quiver}"
scratch="$(mktemp -d)"
port=18093
token="bench-admin-token"
pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; rm -rf "$scratch"' EXIT

serve() { # serve STORE
  QUIVER_ADMIN_TOKEN="$token" QUIVER_LOG=warn "$bin" serve \
    --store "file://$1" --wal-dir "$1-wal" --http-addr "127.0.0.1:$port" \
    --upkeep-interval 0s --report-dir none >>"$scratch/server.log" 2>&1 &
  pid=$!
}
stop() { kill -TERM "$pid"; wait "$pid" || true; pid=""; }
secs() { python3 -c "import time; print(f'{time.monotonic():.3f}')"; }
since() { python3 -c "import time; print(f'{time.monotonic() - $1:.1f}')"; }

"$bin" generate --events "$events" --format arrow --out "$scratch/gen" --seed 5
"$bin" generate --events "$((events / 100))" --format arrow --out "$scratch/more" --seed 6
serve "$scratch/store"; wait_ready "$port"
for s in orders inventory; do
  "$bin" load "$scratch/gen/$s.arrow" --stream "$s" --url "http://127.0.0.1:$port" --token "$token"
done
stop
echo "== store: $(du -sh "$scratch/store" | cut -f1) for $events events"

t=$(secs)
"$bin" backup --store "file://$scratch/store" --to "file://$scratch/backups"
echo "== full backup: $(since "$t") s"
serve "$scratch/store"; wait_ready "$port"
"$bin" load "$scratch/more/orders.arrow" --stream orders --url "http://127.0.0.1:$port" --token "$token"
stop
t=$(secs)
"$bin" backup --store "file://$scratch/store" --to "file://$scratch/backups"
echo "== incremental backup after $((events / 100)) more events: $(since "$t") s"
t=$(secs)
"$bin" verify --backups "file://$scratch/backups" >/dev/null
echo "== verify both backups (every file hashed): $(since "$t") s"
rm -rf "$scratch/store" "$scratch/store-wal"

t=$(secs)
"$bin" restore --from "file://$scratch/backups" --store "file://$scratch/restored"
restored=$(since "$t")
serve "$scratch/restored"; wait_ready "$port"
count=$(curl -sf "http://127.0.0.1:$port/v1/sql" -H "Authorization: Bearer $token" \
  -H 'content-type: application/json' -d '{"sql":"SELECT count(*) FROM orders"}')
echo "== restore: $restored s; RTO (restore, start, first answer): $(since "$t") s; orders: $count"
stop
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r)"
