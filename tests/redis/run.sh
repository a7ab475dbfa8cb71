#!/usr/bin/env bash
# Shared token budgets against a real redis-server: two keyrelay processes
# count one budget between them, concurrent requests through both hold
# atomic reservations (EVAL), and the usage_store_unavailable policies
# hold when Redis goes away (shared_budget.py says what each step proves).
# Called by .ci/run; on a fresh Debian machine it installs redis-server
# itself. Not part of `cargo test`, which keeps in-process tests of the
# local store and the window arithmetic.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

if ! command -v redis-server >/dev/null 2>&1; then
  echo "== installing Debian's redis-server"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi
redis-server --version

if [ -n "${KEYRELAY_BIN:-}" ]; then
  binary="$(realpath "$KEYRELAY_BIN")"
else
  echo "== cargo build (debug)"
  (cd "$repo" && cargo build --quiet)
  binary="$repo/target/debug/keyrelay"
fi

echo "== shared budget cases"
timeout --kill-after=10s 180s python3 "$here/shared_budget.py" "$binary" "$(command -v redis-server)"
