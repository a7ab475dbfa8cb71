#!/usr/bin/env bash
# Browser tests: keyrelay in front of a mock Baseten, called by pages in
# headless Debian Chromium driven by playwright-core (browser.test.mjs says
# what each case proves). Called by .ci/run; runs on a fresh Debian machine:
# installs Chromium if missing, the pinned npm packages with `npm ci`, and
# builds keyrelay (debug, as `cargo test` does) unless KEYRELAY_BIN names one.
# Not part of `cargo test`, which must pass without a browser.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
start=$SECONDS

if [ ! -x /usr/bin/chromium ]; then
  echo "== installing Debian's chromium (and a font, so the screenshot shows text)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-liberation
fi
# Debian's launcher prints a harmless shell error from its /dev/shm size check
# (/etc/chromium.d/dev-shm) on stderr.
/usr/bin/chromium --version 2>/dev/null

echo "== npm ci (playwright-core and ws, pinned in package-lock.json)"
(cd "$here" && npm ci --no-audit --no-fund --loglevel=error)

if [ -n "${KEYRELAY_BIN:-}" ]; then
  KEYRELAY_BIN="$(realpath "$KEYRELAY_BIN")"
  export KEYRELAY_BIN
else
  echo "== cargo build (debug)"
  (cd "$repo" && cargo build)
fi

echo "== browser cases"
status=0
(cd "$here" && timeout --kill-after=10s 240s node --test-reporter=spec browser.test.mjs) || status=$?
echo "== browser tests: $((SECONDS - start)) s in all, exit status $status"
exit "$status"
