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
