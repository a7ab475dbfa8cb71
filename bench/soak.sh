#!/usr/bin/env bash
# keyrelay soak: thousands of streams opened, read and cancelled at random
# through a release keyrelay, then proof that nothing leaked.
#
#   bench/soak.sh                 SOAK_SECONDS of load (default 120), about 2 minutes 10 s
#                                 in all after the build
#   bench/soak.sh --smoke         15 s of load, about 30 s in all
#   bench/soak.sh --out FILE      also write the figures as `key value` lines to FILE
#                                 (bench/reliability.sh reads them)
#
# It builds target/release/keyrelay and two examples (bench/upstream.rs, the
# benchmark's mock upstream; bench/soak.rs, the soak driver), starts the
# upstream and keyrelay (with --admin-listen) on 127.0.0.1 port 0, samples
# keyrelay's VmRSS and open descriptors (/proc/PID/status, /proc/PID/fd) every
# second while bench-soak runs SOAK_CONCURRENCY workers (default 8), each
# looping over: a short stream read to its end, a long stream closed after a
# few records, a stream closed at its response head, or a few keep-alive
# requests. Afterwards it checks, and exits 1 if any check fails:
#
#   accounting    sum of keyrelay_requests_total over every label set (read
#                 from /metrics) == requests the driver sent; no request active
#   cancellation  the upstream's own count of open streams drops to 0
#   descriptors   keyrelay's open descriptors return to the count before the
#                 load, once idle upstream connections expire (pool_idle_timeout
#                 is set to 2s here so that takes seconds, not 20)
#   memory        RSS stays flat: the highest sample of the last third of the
#                 run exceeds the highest of the middle third by at most
#                 max(2 MiB, 10%)
#
# Environment: SOAK_SECONDS, SOAK_CONCURRENCY, SOAK_SEED, SOAK_KEEP=1 (keep the
# work directory with logs and samples).
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

SMOKE=0
OUT=
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) OUT=${2:?--out needs a file}; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench/soak.sh: unknown argument $1 (try --help)" >&2; exit 64 ;;
  esac
  shift
done
if [ "$SMOKE" = 1 ]; then
  DURATION=${SOAK_SECONDS:-15}
else
  DURATION=${SOAK_SECONDS:-120}
fi
CONCURRENCY=${SOAK_CONCURRENCY:-8}
SEED=${SOAK_SEED:-$RANDOM}
KEY=bench-key

log() { printf '[soak %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

log "building keyrelay, bench-upstream and bench-soak (release)"
nice cargo build --release --quiet --bin keyrelay --example bench-upstream --example bench-soak
KEYRELAY=$ROOT/target/release/keyrelay
UPSTREAM_BIN=$ROOT/target/release/examples/bench-upstream
SOAK=$ROOT/target/release/examples/bench-soak

WORK=$(mktemp -d /tmp/keyrelay-soak.XXXXXX)
PIDS=()
SUCCESS=0
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [ "$SUCCESS" = 1 ] && [ "${SOAK_KEEP:-0}" != 1 ]; then
    rm -rf "$WORK"
  else
    log "logs and samples kept in $WORK"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits (bounded) for a line matching $2 in file $1 and prints it.
wait_line() {
  local file=$1 pattern=$2 line i
  for i in $(seq 1 200); do
    line=$(grep -m1 -E "$pattern" "$file" 2>/dev/null || true)
    if [ -n "$line" ]; then
      echo "$line"
      return 0
    fi
    sleep 0.05
  done
  return 1
}

"$UPSTREAM_BIN" --threads 1 --key "$KEY" >"$WORK/upstream.out" 2>"$WORK/upstream.err" &
UPSTREAM_PID=$!
PIDS+=("$UPSTREAM_PID")
UPSTREAM_ADDR=$(wait_line "$WORK/upstream.out" '^listening ' | awk '{ print $2 }') ||
  fail "the mock upstream did not start: $(cat "$WORK/upstream.err")"

# The ready line (target `keyrelay`, level info) names both bound addresses;
# the per-request access log (keyrelay::access) stays off.
BASETEN_API_KEY=$KEY RUST_LOG='warn,keyrelay=info,keyrelay::access=warn' \
  "$KEYRELAY" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
  --upstream "http://$UPSTREAM_ADDR" --pool-idle-timeout 2s \
  >"$WORK/keyrelay.out" 2>"$WORK/keyrelay.err" &
KEYRELAY_PID=$!
PIDS+=("$KEYRELAY_PID")
ready=$(wait_line "$WORK/keyrelay.err" 'keyrelay ready') ||
  fail "keyrelay did not start: $(tail -5 "$WORK/keyrelay.err")"
ADDR=$(sed -E 's/.*listen=([0-9.:]+).*/\1/' <<<"$ready")
ADMIN=$(sed -E 's/.*admin=([0-9.:]+).*/\1/' <<<"$ready")
log "upstream $UPSTREAM_ADDR, keyrelay $ADDR (pid $KEYRELAY_PID), admin $ADMIN"

fds() { find "/proc/$KEYRELAY_PID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
rss_kb() { awk '$1 == "VmRSS:" { print $2 }' "/proc/$KEYRELAY_PID/status"; }
sockets() {
  # keyrelay's TCP sockets by state, from its own network namespace view.
  find "/proc/$KEYRELAY_PID/fd" -mindepth 1 -maxdepth 1 -lname 'socket:*' 2>/dev/null | wc -l
}

FD_BEFORE=$(fds)
SOCKETS_BEFORE=$(sockets)
RSS_BEFORE=$(rss_kb)
log "before the load: $FD_BEFORE descriptors ($SOCKETS_BEFORE sockets), RSS $RSS_BEFORE kB"

# One sample a second: elapsed seconds, RSS kB, descriptors.
SAMPLES=$WORK/samples.txt
: >"$SAMPLES"
(
  start=$SECONDS
  while kill -0 "$KEYRELAY_PID" 2>/dev/null; do
    echo "$((SECONDS - start)) $(rss_kb) $(fds)" >>"$SAMPLES"
    sleep 1
  done
) &
SAMPLER_PID=$!
PIDS+=("$SAMPLER_PID")

log "soak: ${DURATION}s, $CONCURRENCY workers, seed $SEED"
"$SOAK" run --addr "$ADDR" --secs "$DURATION" --concurrency "$CONCURRENCY" --seed "$SEED" \
  >"$WORK/driver.out" 2>"$WORK/driver.err" ||
  fail "the driver reported errors: $(tail -5 "$WORK/driver.err")"
kill -0 "$KEYRELAY_PID" 2>/dev/null || fail "keyrelay died; see $WORK/keyrelay.err"
value() { awk -v k="$1" '$1 == k { print $2 }' "$2"; }
SENT=$(value requests "$WORK/driver.out")
log "driver: $(tr '\n' ' ' <"$WORK/driver.out")"

# Every stream has ended once keyrelay saw the last close.
"$SOAK" wait-idle --admin "$ADMIN" --timeout-ms 10000 2>"$WORK/idle.err" ||
  fail "requests still in flight after the load: $(cat "$WORK/idle.err")"
"$SOAK" metrics --admin "$ADMIN" >"$WORK/metrics.txt"
COUNTED=$(value requests_total "$WORK/metrics.txt")

# The upstream saw every cancellation: no stream still open there.
OPEN_UPSTREAM=
for _ in $(seq 1 100); do
  OPEN_UPSTREAM=$("$SOAK" get --addr "$UPSTREAM_ADDR" --path /stats --auth "Api-Key $KEY" 2>/dev/null |
    awk '$1 == "open_streams" { print $2 }' || true)
  [ "$OPEN_UPSTREAM" = 0 ] && break
  sleep 0.1
done

# Descriptors come back once idle upstream connections expire (2s here).
FD_AFTER=$(fds)
for _ in $(seq 1 150); do
  FD_AFTER=$(fds)
  [ "$FD_AFTER" -le "$FD_BEFORE" ] && break
  sleep 0.1
done
SOCKETS_AFTER=$(sockets)
RSS_AFTER=$(rss_kb)
kill "$SAMPLER_PID" 2>/dev/null || true
wait "$SAMPLER_PID" 2>/dev/null || true

# RSS over the run: middle third vs last third of the samples taken under load.
read -r RSS_MID RSS_LAST RSS_PEAK FD_PEAK NSAMPLES < <(awk -v d="$DURATION" '
  $1 <= d { n++; t[n] = $1; r[n] = $2; f[n] = $3 }
  END {
    for (i = 1; i <= n; i++) {
      if (r[i] > peak) peak = r[i]
      if (f[i] > fpeak) fpeak = f[i]
      if (t[i] >= d / 3 && t[i] < 2 * d / 3 && r[i] > mid) mid = r[i]
      if (t[i] >= 2 * d / 3 && r[i] > last) last = r[i]
    }
    print mid + 0, last + 0, peak + 0, fpeak + 0, n + 0
  }' "$SAMPLES")
GROWTH=$((RSS_LAST - RSS_MID))
ALLOWED=$((RSS_MID / 10 > 2048 ? RSS_MID / 10 : 2048))

checks=()
verdict=pass
check() {
  local name=$1 ok=$2 detail=$3
  if [ "$ok" = 1 ]; then
    checks+=("$name ok: $detail")
  else
    checks+=("$name FAILED: $detail")
    verdict=fail
  fi
}
check accounting "$([ "$SENT" = "$COUNTED" ] && echo 1 || echo 0)" \
  "keyrelay_requests_total $COUNTED, requests sent $SENT"
check cancellation "$([ "$OPEN_UPSTREAM" = 0 ] && echo 1 || echo 0)" \
  "streams still open at the upstream: ${OPEN_UPSTREAM:-unknown}"
check descriptors "$([ "$FD_AFTER" -le "$FD_BEFORE" ] && echo 1 || echo 0)" \
  "$FD_BEFORE before, peak $FD_PEAK, $FD_AFTER after ($SOCKETS_BEFORE sockets before, $SOCKETS_AFTER after)"
check memory "$([ "$GROWTH" -le "$ALLOWED" ] && echo 1 || echo 0)" \
  "VmRSS $RSS_BEFORE kB before, highest $RSS_MID kB in the middle third, $RSS_LAST kB in the last third (allowed +$ALLOWED kB), peak $RSS_PEAK kB, $RSS_AFTER kB after"

{
  echo "soak_mode $([ "$SMOKE" = 1 ] && echo smoke || echo full)"
  echo "soak_seconds $DURATION"
  echo "soak_concurrency $CONCURRENCY"
  echo "soak_seed $SEED"
  sed 's/^/driver_/' "$WORK/driver.out"
  echo "requests_total $COUNTED"
  grep '^outcome_' "$WORK/metrics.txt"
  echo "upstream_open_streams_after ${OPEN_UPSTREAM:-unknown}"
  echo "fd_before $FD_BEFORE"
  echo "fd_peak $FD_PEAK"
  echo "fd_after $FD_AFTER"
  echo "sockets_before $SOCKETS_BEFORE"
  echo "sockets_after $SOCKETS_AFTER"
  echo "rss_before_kb $RSS_BEFORE"
  echo "rss_mid_third_max_kb $RSS_MID"
  echo "rss_last_third_max_kb $RSS_LAST"
  echo "rss_peak_kb $RSS_PEAK"
  echo "rss_after_kb $RSS_AFTER"
  echo "rss_samples $NSAMPLES"
  echo "verdict $verdict"
} >"$WORK/figures.txt"
[ -n "$OUT" ] && cp "$WORK/figures.txt" "$OUT"

for line in "${checks[@]}"; do log "$line"; done
cat "$WORK/figures.txt"
[ "$verdict" = pass ] || fail "see above; samples in $WORK/samples.txt"
SUCCESS=1
log "soak passed"
