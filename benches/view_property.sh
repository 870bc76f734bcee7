#!/usr/bin/env bash
# The view property test (every view equals a recompute after every batch, a clean
# restart and a crash) at a nightly size: CI runs 10 cases, this runs many more.
#
#   benches/view_property.sh [cases] [seed]
#
# Each run prints its PROPTEST_RNG_SEED; pass it back as the second argument to replay
# a failure exactly.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/quiver-target}"
export PROPTEST_CASES="${1:-300}"
if [ -n "${2:-}" ]; then export PROPTEST_RNG_SEED="$2"; fi
cargo test --release -p quiver-engine --lib -- --nocapture \
  views::tests::views_equal_a_recompute_after_every_batch
