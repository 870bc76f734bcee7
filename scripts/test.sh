#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need (moto's S3
# server from PyPI, the `ws` and `playwright-core` packages from npm and Debian's
# Chromium for the JavaScript client's tests, psql and the Python BI clients), then
# runs fmt, clippy and every test with cargo-nextest.
set -euo pipefail
cd "$(dirname "$0")/.."

# Compiled dependencies may be cached outside the clone; a cold run works too.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/quiver-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== installing test services"
if ! python3 -c "import moto.server, flask, flask_cors" 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check 'moto[server]>=5.1'
fi
# The BI tests drive real clients: psql, and Python's psycopg, SQLAlchemy and ADBC
# Flight SQL driver (with pyarrow).
apt_install() {
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq "$@"
  else sudo apt-get update -qq && sudo apt-get install -y -qq "$@"; fi
}
if ! command -v psql >/dev/null 2>&1; then
  apt_install postgresql-client
fi
# The push client is also tested in a real browser: Debian's Chromium, headless.
if [ ! -x /usr/bin/chromium ]; then
  apt_install chromium
fi
if ! python3 -c "import psycopg, sqlalchemy, adbc_driver_flightsql.dbapi, pyarrow" 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check \
    'psycopg[binary]>=3.2' 'sqlalchemy>=2.0' 'adbc-driver-flightsql>=1.5' \
    'adbc-driver-manager>=1.5' 'pyarrow>=17'
fi
# The JavaScript push client's tests use the `ws` package under Node and
# `playwright-core` to drive Chromium.
if [ ! -d api/js/node_modules/ws ] || [ ! -d api/js/node_modules/playwright-core ]; then
  (cd api/js && npm ci --no-audit --no-fund --silent)
fi
if ! command -v cargo-nextest >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi

echo "== fmt"
cargo fmt --all -- --check

echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== tests"
cargo nextest run --workspace --locked --no-fail-fast --test-threads 2
