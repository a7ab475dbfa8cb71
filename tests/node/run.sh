#!/usr/bin/env bash
# The official openai SDK for Node.js through keyrelay (openai_sdk.test.mjs
# says what it proves). Called by .ci/run; installs the pinned SDK with
# `npm ci` and builds keyrelay (debug) unless KEYRELAY_BIN names one. Not
# part of `cargo test`, which runs the Python SDK's tests.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

echo "== npm ci (openai, pinned in package-lock.json)"
(cd "$here" && npm ci --no-audit --no-fund --loglevel=error)

if [ -n "${KEYRELAY_BIN:-}" ]; then
  KEYRELAY_BIN="$(realpath "$KEYRELAY_BIN")"
  export KEYRELAY_BIN
else
  echo "== cargo build (debug)"
  (cd "$repo" && cargo build --quiet)
fi

echo "== openai SDK for Node.js cases"
(cd "$here" && timeout --kill-after=10s 120s node --test-reporter=spec openai_sdk.test.mjs)
