#!/usr/bin/env bash
# Memory per held stream and memory given back after the streams end, for
# keyrelay alone at its defaults (issue 29), in about a minute and a half.
#
#   bench/held_memory.sh [STREAMS] [WAIT_SECS]     defaults 2000 and 60
#
# Starts the benchmark's mock upstream and the release keyrelay in front of
# it (HTTP/1.1 upstream), reads keyrelay's RSS once idle, resets its peak
# (VmHWM), holds STREAMS simultaneous slow streams for 5 s (`bench-loadgen
# hold`: a 48-byte record every 500 ms), then reads the peak and the RSS
# WAIT_SECS after the streams ended. Idle upstream connections are pooled
# for `pool_idle_timeout` (20 s), so a wait under about 30 s still counts
# their buffers as held. Prints `key value` lines:
#
#   idle_kib, peak_kib, kib_per_stream = (peak - idle) / STREAMS,
#   after_kib (WAIT_SECS after), failed (streams that did not complete)
#
# HELD_MEMORY_BIN runs another build instead of target/release/keyrelay, and
# HELD_MEMORY_ENV adds environment to it (e.g. LD_PRELOAD=... to try an
# allocator; KEYRELAY_* would be read as keyrelay settings). bench/run.sh
# measures peak RSS against nginx and haproxy.
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
STREAMS=${1:-2000}
WAIT_SECS=${2:-60}

log() { printf '[held_memory %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

if [ -z "${HELD_MEMORY_BIN:-}" ]; then
  log "building keyrelay and the benchmark tools (release)"
  cargo build --release --quiet --bin keyrelay --example bench-upstream --example bench-loadgen
else
  cargo build --release --quiet --example bench-upstream --example bench-loadgen
fi
KEYRELAY=${HELD_MEMORY_BIN:-$ROOT/target/release/keyrelay}
EXAMPLES=$ROOT/target/release/examples

# Each held stream takes two descriptors in keyrelay.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

WORK=$(mktemp -d /tmp/keyrelay-held-memory.XXXXXX)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# Made before the upstream starts: on a busy machine the loop below may
# read it before the background shell has opened it (and awk then fails).
: >"$WORK/upstream.out"
"$EXAMPLES/bench-upstream" --threads 2 --key bench-key >"$WORK/upstream.out" 2>&1 &
PIDS+=($!)
UPSTREAM=
for _ in $(seq 1 100); do
  UPSTREAM=$(awk '$1 == "listening" { print $2 }' "$WORK/upstream.out")
  [ -n "$UPSTREAM" ] && break
  sleep 0.05
done
[ -n "$UPSTREAM" ] || fail "the mock upstream did not start: $(cat "$WORK/upstream.out")"

ADDR=127.0.0.1:$("$EXAMPLES/bench-loadgen" free-port)
# shellcheck disable=SC2086 # HELD_MEMORY_ENV is a list of NAME=value words
env BASETEN_API_KEY=bench-key ${HELD_MEMORY_ENV:-} "$KEYRELAY" --listen "$ADDR" \
  --upstream "http://$UPSTREAM" >"$WORK/keyrelay.log" 2>&1 &
PID=$!
PIDS+=("$PID")
"$EXAMPLES/bench-loadgen" wait-ready --addr "$ADDR" --timeout-ms 15000 >/dev/null ||
  fail "keyrelay did not answer: $(tail -5 "$WORK/keyrelay.log")"
sleep 0.5

status_kib() { awk -v f="$1:" '$1 == f { print $2 }' "/proc/$PID/status"; }
idle=$(status_kib VmRSS)
echo 5 >"/proc/$PID/clear_refs" # peak := current
log "holding $STREAMS streams for 5 s"
"$EXAMPLES/bench-loadgen" hold --addr "$ADDR" --streams "$STREAMS" --secs 5 >"$WORK/hold.txt" ||
  fail "the held streams failed: $(cat "$WORK/hold.txt")"
peak=$(status_kib VmHWM)
log "waiting $WAIT_SECS s after the streams ended"
sleep "$WAIT_SECS"
after=$(status_kib VmRSS)

echo "idle_kib $idle"
echo "peak_kib $peak"
awk -v p="$peak" -v i="$idle" -v n="$STREAMS" 'BEGIN { printf "kib_per_stream %.1f\n", (p - i) / n }'
echo "after_kib $after"
echo "failed $(awk '$1 == "failed" { print $2 }' "$WORK/hold.txt")"
