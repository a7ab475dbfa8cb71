#!/usr/bin/env bash
# Runs the README's marked snippets (`<!-- snippet: run -->` before the
# fence: shell, Python and JavaScript that talk to keyrelay) against a
# running `keyrelay demo`, so a snippet cannot rot (tests/readme/snippets.py
# says what each must do). Called by .ci/run.
#
#   tests/readme/run.sh                        # builds keyrelay (debug) unless KEYRELAY_BIN is set
#   python3 tests/readme/snippets.py README.md --list
#
# Python snippets run in the virtual environment `cargo test` builds from
# tests/requirements.txt (tests/clients/test_venv.py, reused when it is
# there); JavaScript under node (apt-get install nodejs when missing).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"

fail() { echo "tests/readme/run.sh: FAILED: $*" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/keyrelay-readme.XXXXXX")
demo_pid=""
cleanup() {
  [ -n "$demo_pid" ] && kill "$demo_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

if ! command -v node >/dev/null 2>&1; then
  echo "== installing nodejs"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs >/dev/null
fi
# fetch, TextDecoderStream and top-level await came with Node 18.
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 18 ? 0 : 1)' \
  || fail "node $(node --version) is older than 18"

echo "== Python environment (tests/requirements.txt)"
python=$(python3 tests/clients/test_venv.py "${CARGO_TARGET_DIR:-target}/tmp/python-venv" tests/requirements.txt)

if [ -n "${KEYRELAY_BIN:-}" ]; then
  binary=$(realpath "$KEYRELAY_BIN")
else
  echo "== cargo build (debug)"
  cargo build --quiet
  binary="$repo/${CARGO_TARGET_DIR:-target}/debug/keyrelay"
fi

echo "== keyrelay demo"
# A free port rather than 8080 (which may be taken here): the snippets'
# 127.0.0.1:8080 is rewritten to it.
"$binary" demo --listen 127.0.0.1:0 >"$work/demo.out" 2>"$work/demo.err" &
demo_pid=$!
for _ in $(seq 300); do
  grep -q "Press Ctrl-C" "$work/demo.out" && break
  kill -0 "$demo_pid" 2>/dev/null || { cat "$work/demo.out" "$work/demo.err" >&2; fail "keyrelay demo exited"; }
  sleep 0.1
done
grep -q "Press Ctrl-C" "$work/demo.out" || { cat "$work/demo.out" "$work/demo.err" >&2; fail "keyrelay demo not serving within 30 s"; }
address=$(sed -n 's|^  keyrelay  *http://\([^ ]*\) .*|\1|p' "$work/demo.out")
[ -n "$address" ] || { cat "$work/demo.out" >&2; fail "no keyrelay address in the demo's output"; }
# The answer the demo streamed, as it printed it: "N frames in M ms: ANSWER".
sed -n 's/^  [0-9]* frames in [0-9]* ms: //p' "$work/demo.out" | head -n 1 | tr -d '\n' >"$work/answer"
[ -s "$work/answer" ] || { cat "$work/demo.out" >&2; fail "no answer in the demo's output"; }
echo "keyrelay demo at $address, answering: $(cat "$work/answer")"

echo "== the README's snippets"
python3 tests/readme/snippets.py README.md "$address" "$work/answer" --python "$python" --node node
