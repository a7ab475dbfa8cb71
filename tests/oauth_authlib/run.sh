#!/usr/bin/env bash
# OAuth2 client credentials against a real authorization server: Authlib's
# (from PyPI), issuing 3-second tokens, and a model upstream that checks
# every token with Authlib's own Bearer token validator (oauth_authlib.py
# says what each step proves). Called by .ci/run; `cargo test` keeps its
# in-process token endpoint (tests/it/oauth.rs).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"
target="${CARGO_TARGET_DIR:-target}"

echo "== Authlib environment (tests/oauth_authlib/requirements.txt)"
python=$(python3 tests/clients/test_venv.py "$target/tmp/oauth-authlib-venv" tests/oauth_authlib/requirements.txt)
"$python" -c 'import authlib; print("authlib", authlib.__version__)'

if [ -n "${KEYRELAY_BIN:-}" ]; then
  binary="$(realpath "$KEYRELAY_BIN")"
else
  echo "== cargo build (debug)"
  cargo build --quiet
  binary="$repo/$target/debug/keyrelay"
fi

echo "== OAuth2 client credentials cases"
# The script stops its servers and keyrelay on exit, failure included (and
# on the SIGTERM this trap or timeout sends it).
pid=""
cleanup() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi; }
trap cleanup EXIT INT TERM
timeout --kill-after=10s 120s "$python" "$here/oauth_authlib.py" "$binary" &
pid=$!
wait "$pid"
pid=""
