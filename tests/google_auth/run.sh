#!/usr/bin/env bash
# keyrelay's Google credentials against Google's own auth library
# (google-auth, from PyPI): check.py says what each step proves. Called by
# .ci/run; builds its virtual environment from tests/google_auth/requirements.txt
# (tests/clients/test_venv.py, reused while the file is unchanged) and
# keyrelay (debug) unless KEYRELAY_BIN names one. Not part of `cargo test`,
# whose token endpoint verifies the assertion with ring.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"

echo "== Python environment (tests/google_auth/requirements.txt)"
python=$(python3 tests/clients/test_venv.py "${CARGO_TARGET_DIR:-target}/tmp/google-auth-venv" "$here/requirements.txt")

if [ -n "${KEYRELAY_BIN:-}" ]; then
  binary="$(realpath "$KEYRELAY_BIN")"
else
  echo "== cargo build (debug)"
  cargo build --quiet
  binary="$repo/${CARGO_TARGET_DIR:-target}/debug/keyrelay"
fi

echo "== google-auth cases"
timeout --kill-after=10s 120s "$python" "$here/check.py" "$binary"
