#!/usr/bin/env bash
# keyrelay's request spans, exported to a real OTLP receiver and queried
# back. Jaeger and the OpenTelemetry Collector are Go programs this machine
# cannot build (no Go module proxy), so the receiver is tests/traces/
# receiver.py, built on the official protobuf definitions from PyPI
# (opentelemetry-proto) and grpcio: OTLP/HTTP and OTLP/gRPC in, a
# Jaeger-style query API out. Called by .ci/run.
#
#   tests/traces/run.sh                  # builds keyrelay (debug) unless KEYRELAY_BIN is set
#   tests/traces/run.sh --write-example  # also saves the trace it prints to
#                                        # tests/traces/example-trace.txt (the README's)
#
# For each protocol (http/protobuf via --otlp-endpoint, then grpc via
# OTEL_EXPORTER_OTLP_ENDPOINT and OTEL_EXPORTER_OTLP_PROTOCOL), curl sends a
# streamed chat request with a traceparent through keyrelay to a mock model
# (upstream.py), and check.py queries the trace back: one SERVER span, the
# caller's span its parent, keyrelay's span id in the upstream's
# traceparent, the usage tokens, time to first token, service.name, the
# collector header, and the key in no byte of any export. A retried
# request (a retry event) and one that failed (an error status) follow,
# so every part of a span passes the official decoder. Then the drain:
# with a 10-minute batch delay, keyrelay gets SIGTERM while a stream is
# open; the stream finishes and the span must be at the receiver when the
# process has exited. The retried request's trace is printed as text.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"

write_example=0
case "${1:-}" in
  "") ;;
  --write-example) write_example=1 ;;
  *) echo "usage: tests/traces/run.sh [--write-example]" >&2; exit 64 ;;
esac
fail() { echo "tests/traces/run.sh: FAILED: $*" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/keyrelay-traces.XXXXXX")
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  [ -n "${KEEP_WORK:-}" ] && echo "kept $work" >&2 || rm -rf "$work"
}
# forget PID: a process that has been waited for (its id may be reused).
forget() {
  local pid kept=()
  for pid in "${pids[@]}"; do
    [ "$pid" = "$1" ] || kept+=("$pid")
  done
  pids=("${kept[@]}")
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

key="keyrelay-traces-test-key-$(od -An -tx1 -N8 /dev/urandom | tr -d ' \n')"
collector_header="x-collector-token=ci-collector-token"
service="keyrelay-traces-ci"

echo "== Python environment (tests/traces/requirements.txt: opentelemetry-proto, protobuf, grpcio)"
python=$(python3 tests/clients/test_venv.py "${CARGO_TARGET_DIR:-target}/tmp/traces-venv" tests/traces/requirements.txt)
"$python" -c 'import importlib.metadata as m; print(" ".join(f"{p} {m.version(p)}" for p in ("opentelemetry-proto", "protobuf", "grpcio")))'

if [ -n "${KEYRELAY_BIN:-}" ]; then
  binary=$(realpath "$KEYRELAY_BIN")
else
  echo "== cargo build (debug)"
  cargo build --quiet
  binary="$repo/${CARGO_TARGET_DIR:-target}/debug/keyrelay"
fi

# wait_for_line FILE PATTERN PID WHAT: the first line of FILE matching
# PATTERN, within 15 s, while PID lives.
wait_for_line() {
  local file=$1 pattern=$2 pid=$3 what=$4 line=""
  for _ in $(seq 150); do
    line=$(grep -m1 -E "$pattern" "$file" 2>/dev/null || true)
    [ -n "$line" ] && { echo "$line"; return 0; }
    kill -0 "$pid" 2>/dev/null || { cat "$file" >&2; fail "$what exited before it was ready"; }
    sleep 0.1
  done
  cat "$file" >&2
  fail "$what not ready within 15 s"
}

echo "== the OTLP receiver and the mock model"
"$python" "$here/receiver.py" >"$work/receiver.out" 2>&1 &
pids+=($!)
line=$(wait_for_line "$work/receiver.out" '^listening ' "$!" "receiver.py")
receiver_http=$(sed -n 's/.*http=\([^ ]*\).*/\1/p' <<<"$line")
receiver_grpc=$(sed -n 's/.*grpc=\([^ ]*\).*/\1/p' <<<"$line")
query="http://$receiver_http"
UPSTREAM_KEY="$key" "$python" "$here/upstream.py" >"$work/upstream.out" 2>&1 &
pids+=($!)
line=$(wait_for_line "$work/upstream.out" '^listening ' "$!" "upstream.py")
upstream="http://${line#listening }"
echo "receiver: OTLP/HTTP and query API at $query, OTLP/gRPC at $receiver_grpc; model at $upstream"

relay_pid=""
relay_port=""
# start_relay LOG PROTOCOL BATCH_DELAY_MS: keyrelay exporting by PROTOCOL.
start_relay() {
  local log=$1 protocol=$2 delay=$3 endpoint=() line
  if [ "$protocol" = grpc ]; then
    # The standard variables, as a collector sidecar's environment sets them.
    endpoint=(env OTEL_EXPORTER_OTLP_ENDPOINT="http://$receiver_grpc" OTEL_EXPORTER_OTLP_PROTOCOL=grpc "$binary")
  else
    endpoint=("$binary" --otlp-endpoint "$query" --otlp-protocol http/protobuf)
  fi
  env -i PATH="$PATH" BASETEN_API_KEY="$key" RUST_LOG=info \
    OTEL_SERVICE_NAME="$service" \
    OTEL_RESOURCE_ATTRIBUTES="deployment.environment.name=ci,service.namespace=key%2Crelay,service.name=overridden" \
    OTEL_EXPORTER_OTLP_HEADERS="$collector_header" \
    OTEL_BSP_SCHEDULE_DELAY="$delay" \
    "${endpoint[@]}" --listen 127.0.0.1:0 --upstream "$upstream" \
    --warm-connections 0 --shutdown-grace 10s \
    --retry-on 503 --retry-methods POST --retry-max-wait 100ms >"$log" 2>&1 &
  relay_pid=$!
  pids+=("$relay_pid")
  line=$(wait_for_line "$log" 'keyrelay ready' "$relay_pid" "keyrelay ($protocol)")
  relay_port=$(sed -n 's/.*listen=127\.0\.0\.1:\([0-9]*\).*/\1/p' <<<"$line")
  [ -n "$relay_port" ] || { cat "$log" >&2; fail "no port in keyrelay's ready line"; }
}

new_id() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }

# chat OUT TRACE CALLER [HEADER...]: a streamed chat request through keyrelay.
chat() {
  local out=$1 trace=$2 caller=$3
  shift 3
  curl -sS -N --max-time 25 -o "$out" -w '%{http_code}' \
    -H 'content-type: application/json' \
    -H "traceparent: 00-$trace-$caller-01" -H 'tracestate: ci=1' "$@" \
    -d '{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}' \
    "http://127.0.0.1:$relay_port/v1/chat/completions"
}

check_streamed() {
  local out=$1 status=$2
  [ "$status" = 200 ] || { cat "$out" >&2; fail "the chat request got $status"; }
  grep -q 'data: \[DONE\]' "$out" && grep -q '"Hel"' "$out" \
    || { cat "$out" >&2; fail "the stream did not arrive whole"; }
}

# stop_relay LOG: SIGTERM, and keyrelay exits 0 within 15 s.
stop_relay() {
  kill -TERM "$relay_pid"
  await_exit "$1"
}

# await_exit LOG: keyrelay, signalled, exits 0 within 15 s.
await_exit() {
  local log=$1 status=0
  for _ in $(seq 150); do
    kill -0 "$relay_pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$relay_pid" 2>/dev/null && { cat "$log" >&2; fail "keyrelay still running 15 s after SIGTERM"; }
  wait "$relay_pid" || status=$?
  forget "$relay_pid"
  [ "$status" = 0 ] || { cat "$log" >&2; fail "keyrelay exited $status after SIGTERM"; }
}

# check LOG ARGS...: check.py; on failure, the end of keyrelay's and the receiver's output.
check() {
  local log=$1
  shift
  "$python" "$here/check.py" --query "$query" --upstream "$upstream" --service "$service" \
    --key "$key" --collector-header "$collector_header" "$@" || {
    echo "--- keyrelay's log" >&2; tail -n 20 "$log" >&2
    echo "--- the receiver's output" >&2; tail -n 20 "$work/receiver.out" >&2
    fail "the trace queried back is not what keyrelay should have exported"
  }
}

for protocol in http/protobuf grpc; do
  echo "== $protocol: a streamed chat request, its span queried back"
  trace=$(new_id 16)
  caller=$(new_id 8)
  start_relay "$work/relay.log" "$protocol" 100
  status=$(chat "$work/chat.out" "$trace" "$caller") || fail "curl: the chat request failed"
  check_streamed "$work/chat.out" "$status"
  check "$work/relay.log" --protocol "$protocol" --trace "$trace" --caller-span "$caller" --wait 10

  echo "== $protocol: a request retried after a 503, and one that got 503 on all 3 attempts"
  trace=$(new_id 16)
  status=$(chat "$work/chat.out" "$trace" "$caller" -H 'x-fail: 1') || fail "curl: the chat request failed"
  check_streamed "$work/chat.out" "$status"
  check "$work/relay.log" --protocol "$protocol" --trace "$trace" --caller-span "$caller" --case retried \
    --render "$work/trace.txt"
  trace=$(new_id 16)
  status=$(chat "$work/chat.out" "$trace" "$caller" -H 'x-fail: 9') || fail "curl: the chat request failed"
  [ "$status" = 503 ] || { cat "$work/chat.out" >&2; fail "a request the upstream always refused got $status"; }
  check "$work/relay.log" --protocol "$protocol" --trace "$trace" --caller-span "$caller" --case failed
  stop_relay "$work/relay.log"

  echo "== $protocol: drain: SIGTERM with a stream open, a 10-minute batch delay; the span leaves before exit"
  trace=$(new_id 16)
  caller=$(new_id 8)
  hold="drain-${protocol//\//-}"
  start_relay "$work/drain.log" "$protocol" 600000
  chat "$work/drain.out" "$trace" "$caller" -H "x-hold: $hold" >"$work/drain.status" &
  chat_pid=$!
  pids+=("$chat_pid")
  for _ in $(seq 150); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$upstream/held/$hold")" = 200 ] && break
    sleep 0.1
  done
  [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$upstream/held/$hold")" = 200 ] \
    || fail "the held stream did not reach the upstream within 15 s"
  kill -TERM "$relay_pid"
  sleep 0.5
  kill -0 "$relay_pid" 2>/dev/null || { cat "$work/drain.log" >&2; fail "keyrelay exited with a stream open"; }
  [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$query/api/traces/$trace")" = 404 ] \
    || fail "the span arrived before its stream ended"
  echo "ok: draining with the stream open (the span not exported yet)"
  curl -sS --max-time 5 -o /dev/null "$upstream/release/$hold"
  wait "$chat_pid" || fail "curl failed on the drained stream"
  forget "$chat_pid"
  check_streamed "$work/drain.out" "$(cat "$work/drain.status")"
  await_exit "$work/drain.log"
  echo "ok: the stream finished during the drain and keyrelay exited 0"
  check "$work/drain.log" --protocol "$protocol" --trace "$trace" --caller-span "$caller" --wait 0
done

echo "== the retried request's trace (grpc), as the receiver got it"
cat "$work/trace.txt"
if [ "$write_example" = 1 ]; then
  cp "$work/trace.txt" "$here/example-trace.txt"
  echo "saved to tests/traces/example-trace.txt"
fi
echo "tests/traces/run.sh: all passed"
