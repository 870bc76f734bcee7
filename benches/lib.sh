# Shared by the bench scripts (sourced, not run).

# Waits up to 60 s for the Quiver on 127.0.0.1:$1 to answer /ready; exits otherwise.
wait_ready() {
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$1/ready" >/dev/null && return
    sleep 0.1
  done
  echo "the server on port $1 did not become ready" >&2
  exit 1
}

# Starts a release `quiver serve` on a fresh scratch store ($scratch/store), upkeep off,
# with $QUIVER_BENCH_SERVE_ARGS, logging to $scratch/server-$2.log; sets $pid and
# waits until it is ready. Needs $bin, $scratch and $token.
#   start_scratch_server PORT LOG_NAME
start_scratch_server() {
  rm -rf "$scratch/store"
  QUIVER_ADMIN_TOKEN="$token" QUIVER_LOG=warn "$bin/quiver" serve \
    --store "file://$scratch/store" --http-addr "127.0.0.1:$1" \
    --upkeep-interval 0s ${QUIVER_BENCH_SERVE_ARGS:-} >"$scratch/server-$2.log" 2>&1 &
  pid=$!
  wait_ready "$1"
}
