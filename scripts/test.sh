#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need, then runs
# fmt, clippy, the DuckDB cross-check of the SQL test expectations, and every test with
# cargo-nextest. Each step prints how long it took.
#
# Installed when missing: from Debian (one `apt-get update`, no recommended extras)
# psql, Chromium, poppler-utils and Prometheus; from PyPI moto's S3 server, checkov,
# yamllint and python-hcl2 (the deploy checks), the Python BI clients (psycopg,
# SQLAlchemy, the ADBC Flight SQL driver, pyarrow), DuckDB and aiosmtpd (the SMTP sink
# alert emails are delivered to); from npm the `ws` and
# `playwright-core` packages of the JavaScript client's tests; cargo-nextest (the
# machine image carries it; built from crates.io only where it does not) and cargo-deny.
set -euo pipefail
cd "$(dirname "$0")/.."

# Compiled dependencies may be cached outside the clone; a cold run works too.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/quiver-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# CI builds every crate once from cold: incremental compilation would only add work.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi

started=$SECONDS
step() {
  local name="$1" t=$SECONDS
  shift
  echo "== $name"
  "$@"
  echo "== $name: $((SECONDS - t)) s"
}

install() {
  local apt=()
  command -v psql >/dev/null 2>&1 || apt+=(postgresql-client)
  # The push client and the dashboard are tested in a real browser.
  [ -x /usr/bin/chromium ] || apt+=(chromium)
  # PDF reports are read back with pdftotext and pdfinfo and rendered with pdftoppm.
  command -v pdftotext >/dev/null 2>&1 || apt+=(poppler-utils)
  # Prometheus and promtool: the alert rules' unit tests and a live scrape.
  command -v promtool >/dev/null 2>&1 || apt+=(prometheus)
  if [ "${#apt[@]}" -gt 0 ]; then
    local sudo=()
    [ "$(id -u)" = 0 ] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${apt[@]}"
  fi
  if ! python3 -c "import moto.server, flask, flask_cors, psycopg, sqlalchemy, adbc_driver_flightsql.dbapi, pyarrow, duckdb, aiosmtpd, hcl2, yamllint, checkov.main" 2>/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check \
      'moto[server]>=5.1' 'psycopg[binary]>=3.2' 'sqlalchemy>=2.0' \
      'adbc-driver-flightsql>=1.5' 'adbc-driver-manager>=1.5' 'pyarrow>=17' 'duckdb>=1.1' \
      'aiosmtpd>=1.4' 'checkov>=3.2' 'yamllint>=1.35' 'python-hcl2>=7'
  fi
  if [ ! -d api/js/node_modules/ws ] || [ ! -d api/js/node_modules/playwright-core ]; then
    (cd api/js && npm ci --no-audit --no-fund --silent)
  fi
  command -v cargo-nextest >/dev/null 2>&1 || cargo install --locked cargo-nextest
  command -v cargo-deny >/dev/null 2>&1 || cargo install --locked cargo-deny@^0.20
}

step "installing test services" install
step "fmt" cargo fmt --all -- --check
step "clippy" cargo clippy --workspace --all-targets --locked -- -D warnings
# Licences, banned crates and sources (the advisory database cannot be fetched here).
step "cargo deny" cargo deny --locked check --hide-inclusion-graph licenses bans sources
step "sql expectations against DuckDB" python3 sql/tests/check_duckdb.py
# Dockerfile, compose, Terraform, Prometheus rules (promtool) and Grafana dashboards.
step "deploy checks" python3 deploy/check.py
# Timeouts and threads: .config/nextest.toml (a hung test is ended after 3 minutes).
step "tests" cargo nextest run --workspace --locked --no-fail-fast
echo "== all steps: $((SECONDS - started)) s"
