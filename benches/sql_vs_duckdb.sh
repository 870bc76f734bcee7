#!/usr/bin/env bash
# Ad-hoc KPI SQL over Delta: Quiver vs DuckDB on the same Parquet files, same run.
# Generates N events (default 10M) with `quiver generate`, loads them over HTTP into a
# release server on a scratch store, stops it cleanly (everything flushed to Delta),
# starts it again and runs benches/sql_vs_duckdb.py. The server maintains no views
# (`--kpi-dir none`), so the queries have the CPU to themselves, as DuckDB does.
#
# The default shape is the generator's (200 SKUs, 4 warehouses); pass more for the
# high-cardinality shape, e.g. `benches/sql_vs_duckdb.sh 10000000 5 2000 10`.
#
#   benches/sql_vs_duckdb.sh [events] [runs] [skus] [warehouses]
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
events="${1:-10000000}"
runs="${2:-5}"
skus="${3:-200}"
warehouses="${4:-4}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/quiver-target}"
python3 -c 'import duckdb, pyarrow' 2>/dev/null || pip install --quiet --break-system-packages duckdb pyarrow
# Built with the benches package, as the other scripts are, so features unify the same
# way and the release build is shared.
# QUIVER_BENCH_BIN runs another build of quiver (e.g. an older one, for a before/after).
if [ -z "${QUIVER_BENCH_BIN:-}" ]; then
  cargo build --release -p quiver-api -p quiver-benches --bin quiver
fi
bin="${QUIVER_BENCH_BIN:-$CARGO_TARGET_DIR/release/quiver}"

scratch="$(mktemp -d)"
port=18090
token="bench-admin-token"
pid=""
# QUIVER_BENCH_KEEP=1 keeps the scratch store for more runs of the .py by hand.
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; [ -n "${QUIVER_BENCH_KEEP:-}" ] && echo "kept $scratch" || rm -rf "$scratch"' EXIT

serve() {
  QUIVER_ADMIN_TOKEN="$token" QUIVER_LOG=warn "$bin" serve \
    --store "file://$scratch/store" --http-addr "127.0.0.1:$port" \
    --upkeep-interval 0s --query-timeout 10m --kpi-dir none >>"$scratch/server.log" 2>&1 &
  pid=$!
  wait_ready "$port"
}

"$bin" generate --events "$events" --format arrow --out "$scratch/gen" --seed 7 \
  --skus "$skus" --warehouses "$warehouses"
echo "shape: $skus SKUs, $warehouses warehouses"
serve
for stream in orders inventory; do
  "$bin" load "$scratch/gen/$stream.arrow" --stream "$stream" \
    --url "http://127.0.0.1:$port" --token "$token"
done
kill -TERM "$pid"; wait "$pid" || true
rm -rf "$scratch/gen"
serve
echo "store: $(du -sh "$scratch/store/tables" | cut -f1), files: $(find "$scratch/store/tables" -name '*.parquet' | wc -l)"
python3 -u benches/sql_vs_duckdb.py "http://127.0.0.1:$port" "$token" "$scratch/store" "$runs"
echo "peak server RSS: $(grep VmHWM /proc/$pid/status | awk '{print $2/1024 " MiB"}')"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r)"
