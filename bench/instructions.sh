#!/usr/bin/env bash
# CPU instructions keyrelay executes per proxied request, counted by callgrind.
#
#   bench/instructions.sh [REQUESTS]            default 4000
#   bench/instructions.sh --chunks [CHUNKS]     default 4000
#   bench/instructions.sh --traces [REQUESTS]   default 4000
#
# Wall-clock figures on a shared 2-core machine move by 5-10% from run to run;
# instruction counts do not (they repeat to within about 0.1%), so this is the
# measure to compare two builds of keyrelay by. It runs the release binary
# under `valgrind --tool=callgrind` in front of the benchmark's mock upstream
# twice: with 1,000 keep-alive `GET /small` requests (4 connections) and with
# 1,000 + REQUESTS. Start-up, the first connections and shutdown cost the same
# in both, so the difference divided by REQUESTS is the cost of one request.
# It counts user-space instructions only: kernel work (the socket calls) is
# not included, and it says nothing about time spent waiting.
#
# keyrelay runs at its default log level, as users run it: one access-log
# line per request, written by the log thread (counted too). For the quiet
# figure: RUST_LOG=warn bench/instructions.sh
#
# With --chunks it counts the cost of one relayed token chunk instead: one
# stream of 1,000 OpenAI-style SSE chunks (160 bytes each, ending in a usage
# event) against one of 1,000 + CHUNKS, with the usage tap on (the default)
# and with usage_tap = "off", and prints both and their ratio: what reading
# token usage off the stream costs per chunk.
#
# With --traces it counts the same requests with trace export on and every
# request sampled (OTEL_TRACES_SAMPLER=always_on, spans sent over OTLP/HTTP to
# the mock upstream's /v1/traces): what a span costs, encoding and export
# included. The plain run is the "tracing off" figure.
#
# INSTRUCTIONS_BIN counts another build instead of target/release/keyrelay
# (e.g. the static musl binary of the release archives and the image).
# INSTRUCTIONS_KEEP=DIR keeps callgrind's output files there, to read where
# the instructions go: build with symbols for that (the release profile
# strips them), e.g.
#   CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
#     cargo build --release --target-dir /tmp/prof --bin keyrelay
#   INSTRUCTIONS_BIN=/tmp/prof/release/keyrelay INSTRUCTIONS_KEEP=/tmp/cg bench/instructions.sh
#   callgrind_annotate --inclusive=yes /tmp/cg/callgrind.5000.0.out | head -60
#
# Needs valgrind and python3 (installed with apt-get when missing and root).
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
MODE=requests
case "${1:-}" in
  --chunks) MODE=chunks; shift ;;
  --traces) MODE=traces; shift ;;
esac
EXTRA=${1:-4000}
BASE=1000
CHUNK_SIZE=160

log() { printf '[instructions %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

need=()
command -v valgrind >/dev/null || need+=(valgrind)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || fail "missing ${need[*]}; install them (apt-get install ${need[*]})"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

log "building keyrelay and the mock upstream (release)"
cargo build --release --quiet --bin keyrelay --example bench-upstream
KEYRELAY=${INSTRUCTIONS_BIN:-$ROOT/target/release/keyrelay}

WORK=$(mktemp -d /tmp/keyrelay-instructions.XXXXXX)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

"$ROOT/target/release/examples/bench-upstream" >"$WORK/upstream.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
  grep -q '^listening' "$WORK/upstream.out" 2>/dev/null && break
  sleep 0.05
done
UPSTREAM=$(awk '/^listening/ { print $2 }' "$WORK/upstream.out")
[ -n "$UPSTREAM" ] || fail "the mock upstream did not start"

# Sends N keep-alive GET /small over 4 connections and checks every answer.
cat >"$WORK/drive.py" <<'EOF'
import http.client, sys, threading
port, total = int(sys.argv[1]), int(sys.argv[2])
failures = []
def run(count):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for _ in range(count):
        conn.request("GET", "/small")
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            failures.append(response.status)
threads = [threading.Thread(target=run, args=(total // 4,)) for _ in range(4)]
for thread in threads: thread.start()
for thread in threads: thread.join()
sys.exit(f"{len(failures)} requests failed: {failures[:3]}" if failures else 0)
EOF

# Reads one SSE stream of N chunks and checks it is whole.
cat >"$WORK/stream.py" <<'EOF'
import http.client, sys
port, chunks, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
conn.request("GET", f"/stream?n={chunks}&interval_us=0&size={size}&sse=1")
response = conn.getresponse()
body = response.read()
events = body.count(b'"delta"')
if response.status != 200 or events != chunks or not body.endswith(b"data: [DONE]\n\n"):
    sys.exit(f"stream: status {response.status}, {events} of {chunks} chunks")
EOF

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Instructions keyrelay executes while serving $1 requests (or, in chunks
# mode, one stream of $1 chunks); further arguments are keyrelay flags.
count() {
  local amount=$1 port out pid
  shift
  port=$(free_port)
  out=$WORK/callgrind.$amount.$#.out
  local -a trace_env=()
  if [ "$MODE" = traces ]; then
    trace_env=(OTEL_EXPORTER_OTLP_ENDPOINT="http://$UPSTREAM" OTEL_TRACES_SAMPLER=always_on)
  fi
  env "${trace_env[@]}" BASETEN_API_KEY=bench-key valgrind --tool=callgrind --callgrind-out-file="$out" \
    "$KEYRELAY" --listen "127.0.0.1:$port" --upstream "http://$UPSTREAM" "$@" \
    >"$WORK/keyrelay.$amount.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  for _ in $(seq 300); do
    curl -fsS -o /dev/null "http://127.0.0.1:$port/small" 2>/dev/null && break
    sleep 0.1
  done
  if [ "$MODE" = chunks ]; then
    python3 "$WORK/stream.py" "$port" "$amount" "$CHUNK_SIZE" || fail "the stream through keyrelay failed"
  else
    python3 "$WORK/drive.py" "$port" "$amount" || fail "requests through keyrelay failed"
  fi
  kill -TERM "$pid"
  wait "$pid" || true
  if [ -n "${INSTRUCTIONS_KEEP:-}" ]; then
    mkdir -p "$INSTRUCTIONS_KEEP"
    cp "$out" "$INSTRUCTIONS_KEEP/"
  fi
  awk '/^summary:/ { print $2 }' "$out"
}

if [ "$MODE" = chunks ]; then
  per_chunk() {
    local small large
    small=$(count "$BASE" "$@")
    large=$(count $((BASE + EXTRA)) "$@")
    [ -n "$small" ] && [ -n "$large" ] || fail "callgrind wrote no summary"
    echo $(((large - small) / EXTRA))
  }
  log "counting streams of $BASE and $((BASE + EXTRA)) chunks, usage tap on (the default)"
  on=$(per_chunk)
  log "the same with --usage-tap off"
  off=$(per_chunk --usage-tap off)
  echo "instructions_per_chunk_tap_on $on"
  echo "instructions_per_chunk_tap_off $off"
  log "per $CHUNK_SIZE-byte SSE chunk: $on instructions with the usage tap, $off without ($(python3 -c "print(f'{$on / $off:.3f}')")x)"
  exit 0
fi

log "counting $BASE requests"
small=$(count "$BASE")
log "counting $((BASE + EXTRA)) requests"
large=$(count $((BASE + EXTRA)))
[ -n "$small" ] && [ -n "$large" ] || fail "callgrind wrote no summary"
per_request=$(((large - small) / EXTRA))
if [ "$MODE" = traces ]; then
  grep -q "trace export failed" "$WORK"/keyrelay.*.log && fail "span export failed: $(grep -h "trace export failed" "$WORK"/keyrelay.*.log | head -1)"
  echo "instructions_per_request_traced $per_request"
  log "keyrelay with every request traced and exported: $per_request instructions per request"
  exit 0
fi
echo "instructions_per_request $per_request"
log "keyrelay (log level ${RUST_LOG:-default}): $per_request instructions per request ($small for $BASE, $large for $((BASE + EXTRA)))"
