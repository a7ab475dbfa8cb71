#!/usr/bin/env bash
# keyrelay benchmark: direct vs nginx vs haproxy vs keyrelay, in one run, same load.
#
#   bench/run.sh            full run (about 9 minutes after the builds); writes BENCHMARKS.md
#   bench/run.sh --smoke    every phase, very briefly (< 2 minutes after the builds);
#                           writes to a temp file (printed at the end)
#   bench/run.sh [--smoke] --out FILE    write the report to FILE instead
#
# It builds keyrelay and its own tools (bench/upstream.rs: the mock upstream;
# bench/loadgen.rs: load generator and report writer), installs nginx, haproxy
# and wrk with apt-get when missing, starts the mock upstream and, in turn,
# each target in front of it on 127.0.0.1 ports picked free at run time:
#
#   direct    the mock upstream itself (the client sends the key)
#   nginx     proxy_pass with the key in proxy_set_header, buffering off
#   haproxy   http-request set-header with the key, option http-no-delay
#   keyrelay  target/release/keyrelay with BASETEN_API_KEY, default settings
#             (its access log included, as users run it)
#   keyrelay-warn  the same with RUST_LOG=warn (no access log), beside it in
#             the small-request, token-chunk and burst phases only
#
# The mock upstream answers 401 to any request without `Authorization:
# Api-Key bench-key`, so every proxy is proven to inject the key; the run fails
# if one did not. It also fails (non-zero exit) when a target does not start,
# dies, or serves nothing in a phase; slow numbers never fail it.
#
# Durations and counts are environment variables (defaults: full / smoke):
#   BENCH_SMALL_SECS        wrk duration per round                  10 / 1
#   BENCH_ROUNDS            wrk rounds per connection count, targets interleaved   3 / 1
#   BENCH_WARMUP_SECS       wrk warm-up before each measurement     2 / 0
#   BENCH_CONNS             wrk connection counts (the report has rows for 32 and 256)  "32 256"
#   BENCH_STREAMS           concurrent fidelity streams             8 / 4
#   BENCH_STREAM_CHUNKS     records per fidelity stream             300 / 50
#   BENCH_STREAM_INTERVAL_MS  gap between records                  5 / 2
#   BENCH_BULK_BYTES        bulk response size                      1073741824 / 67108864
#   BENCH_HOLD_COUNTS       simultaneous slow streams (one or two)  "2000 8000" / "200"
#   BENCH_HOLD_SECS         how long each slow stream lasts         5 / 1
#   BENCH_CHUNK_STREAMS     token-chunk streams (a 32-byte chunk every 50 ms)  2000 / 100
#   BENCH_CHUNK_SECS        how long each token-chunk stream lasts  10 / 2
#   BENCH_TLS_HOLD          held streams in the TLS-upstream phase   2000 / 200
#   BENCH_GIVEN_HOLD        held streams in a fresh process (memory given back)  2000 / 200
#   BENCH_GIVEN_WAIT        seconds after they end that its RSS is read  60 / 3
#   BENCH_BURST_STREAMS     connections opened at once in the burst 1500 / 200
#   BENCH_CANCEL_TRIALS     disconnects measured                    20 / 3
#   BENCH_CANCEL_INTERVAL_MS  gap between records of those streams 50 / 20
#   BENCH_TARGETS           targets to run                          "direct nginx haproxy keyrelay keyrelay-warn"
#   BENCH_OUT               report file (same as --out)
#   BENCH_KEEP=1            keep the work directory (logs, configs) after a successful run
#   BENCH_WAIT_QUIET=SECS   wait up to SECS for the machine to be idle before measuring (default 0)
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

SMOKE=0
OUT=${BENCH_OUT:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) OUT=${2:?--out needs a file}; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench/run.sh: unknown argument $1 (try --help)" >&2; exit 64 ;;
  esac
  shift
done

if [ "$SMOKE" = 1 ]; then
  SMALL_SECS=${BENCH_SMALL_SECS:-1}
  ROUNDS=${BENCH_ROUNDS:-1}
  WARMUP_SECS=${BENCH_WARMUP_SECS:-0}
  STREAMS=${BENCH_STREAMS:-4}
  STREAM_CHUNKS=${BENCH_STREAM_CHUNKS:-50}
  STREAM_INTERVAL_MS=${BENCH_STREAM_INTERVAL_MS:-2}
  BULK_BYTES=${BENCH_BULK_BYTES:-67108864}
  HOLD_COUNTS=${BENCH_HOLD_COUNTS:-200}
  HOLD_SECS=${BENCH_HOLD_SECS:-1}
  BURST_STREAMS=${BENCH_BURST_STREAMS:-200}
  CHUNK_STREAMS=${BENCH_CHUNK_STREAMS:-100}
  CHUNK_SECS=${BENCH_CHUNK_SECS:-2}
  TLS_HOLD=${BENCH_TLS_HOLD:-200}
  GIVEN_HOLD=${BENCH_GIVEN_HOLD:-200}
  GIVEN_WAIT=${BENCH_GIVEN_WAIT:-3}
  CANCEL_TRIALS=${BENCH_CANCEL_TRIALS:-3}
  CANCEL_INTERVAL_MS=${BENCH_CANCEL_INTERVAL_MS:-20}
else
  SMALL_SECS=${BENCH_SMALL_SECS:-10}
  ROUNDS=${BENCH_ROUNDS:-3}
  WARMUP_SECS=${BENCH_WARMUP_SECS:-2}
  STREAMS=${BENCH_STREAMS:-8}
  STREAM_CHUNKS=${BENCH_STREAM_CHUNKS:-300}
  STREAM_INTERVAL_MS=${BENCH_STREAM_INTERVAL_MS:-5}
  BULK_BYTES=${BENCH_BULK_BYTES:-1073741824}
  HOLD_COUNTS=${BENCH_HOLD_COUNTS:-2000 8000}
  HOLD_SECS=${BENCH_HOLD_SECS:-5}
  BURST_STREAMS=${BENCH_BURST_STREAMS:-1500}
  CHUNK_STREAMS=${BENCH_CHUNK_STREAMS:-2000}
  CHUNK_SECS=${BENCH_CHUNK_SECS:-10}
  TLS_HOLD=${BENCH_TLS_HOLD:-2000}
  GIVEN_HOLD=${BENCH_GIVEN_HOLD:-2000}
  GIVEN_WAIT=${BENCH_GIVEN_WAIT:-60}
  CANCEL_TRIALS=${BENCH_CANCEL_TRIALS:-20}
  CANCEL_INTERVAL_MS=${BENCH_CANCEL_INTERVAL_MS:-50}
fi
CONNS=${BENCH_CONNS:-32 256}
TARGETS=${BENCH_TARGETS:-direct nginx haproxy keyrelay keyrelay-warn}
KEY=bench-key
AUTH="Api-Key $KEY"
TRIED_HEADING="## What was tried"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

# ---------------------------------------------------------------- tools

need=()
for tool in nginx haproxy wrk openssl; do
  PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || fail "missing ${need[*]}; install them (apt-get install ${need[*]}) or run as root"
  log "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin:/sbin"
NGINX=$(command -v nginx)
HAPROXY=$(command -v haproxy)
WRK=$(command -v wrk)

log "building keyrelay and the benchmark tools (release)"
cargo build --release --quiet --bin keyrelay --example bench-upstream --example bench-loadgen
KEYRELAY=$ROOT/target/release/keyrelay
UPSTREAM_BIN=$ROOT/target/release/examples/bench-upstream
LOADGEN=$ROOT/target/release/examples/bench-loadgen

# ---------------------------------------------------------------- work area, limits, cleanup

WORK=$(mktemp -d /tmp/keyrelay-bench.XXXXXX)
chmod 755 "$WORK"
RESULTS=$WORK/results.txt
: >"$RESULTS"
PIDS=()
SUCCESS=0

stop_pid() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  if [ "$SUCCESS" = 1 ] && [ "${BENCH_KEEP:-0}" != 1 ]; then
    rm -rf "$WORK"
  else
    log "logs and configs kept in $WORK"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Thousands of streams need two descriptors each in a proxy.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
[ "$NOFILE" = unlimited ] && NOFILE=1048576
max_hold=0
for n in $HOLD_COUNTS; do [ "$n" -gt "$max_hold" ] && max_hold=$n; done
if [ $((max_hold * 2 + 500)) -gt "$NOFILE" ]; then
  log "warning: open-file limit $NOFILE is low for $max_hold streams through a proxy"
fi
NPROC=$(nproc)
CLK_TCK=$(getconf CLK_TCK)
HAPROXY_MAXCONN=$(((NOFILE - 500) / 2))
NGINX_WORKER_CONNECTIONS=$((NOFILE - 100))

# Servers run as nobody when the script runs as root (and nobody can reach the binaries).
RUNAS=()
RUN_USER=$(id -un)
if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null && id nobody >/dev/null 2>&1; then
  candidate=(setpriv "--reuid=$(id -u nobody)" "--regid=$(id -g nobody)" --clear-groups --)
  chmod 777 "$WORK"
  if "${candidate[@]}" test -x "$KEYRELAY" -a -x "$UPSTREAM_BIN" -a -w "$WORK"; then
    RUNAS=("${candidate[@]}")
    RUN_USER=nobody
  fi
fi
log "servers run as $RUN_USER; open-file limit $NOFILE; work area $WORK"

# ---------------------------------------------------------------- process measurements

# All processes of a target: nginx's master and its workers, else the one process.
target_pids() {
  local pid=$1
  echo "$pid"
  ps -o pid= --ppid "$pid" 2>/dev/null | tr -d ' ' || true
}

# user+system CPU ticks of the given processes (all their threads).
cpu_ticks() {
  local total=0 pid ticks
  for pid in "$@"; do
    ticks=$(awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$pid/stat" 2>/dev/null || echo 0)
    total=$((total + ticks))
  done
  echo "$total"
}

# Sum of a /proc/PID/status field (kB) over the processes.
status_kb() {
  local field=$1 total=0 pid kb
  shift
  for pid in "$@"; do
    kb=$(awk -v f="$field:" '$1 == f { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)
    total=$((total + ${kb:-0}))
  done
  echo "$total"
}

# Resets the peak RSS (VmHWM) of the processes to their current RSS.
reset_peak() {
  local pid
  for pid in "$@"; do echo 5 >"/proc/$pid/clear_refs" 2>/dev/null || true; done
}

mib() { awk -v kb="$1" 'BEGIN { printf "%.1f", kb / 1024 }'; }

# KiB per held stream: peak KiB $1 over the KiB before $2, divided by the
# streams open at once at the busiest moment (loadgen hold output $3). A
# target whose streams ramp up slower than they last (the smoke run holds
# each for 1 s) never holds them all at once.
kib_per_stream() {
  awk -v p="$1" -v i="$2" '$1 == "peak_open" && $2 > 0 { printf "%.1f", (p - i) / $2 }' "$3"
}

# Busy CPU ticks of the whole machine (all CPUs, idle and iowait excluded).
machine_busy_ticks() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }

# CPU ticks of this script and every child it has reaped (wrk, loadgen, stopped targets).
own_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 + $14 + $15 }' "/proc/$$/stat"; }

record() { echo "$TARGET $1 $2" >>"$RESULTS"; }

# Records every `key value` line of a loadgen output with a prefix.
record_all() {
  local prefix=$1 file=$2 key value
  while read -r key value; do
    [ -n "$key" ] && record "${prefix}_$key" "$value"
  done <"$file"
}

value_of() { awk -v k="$1" '$1 == k { print $2 }' "$2"; }

alive() {
  local pid
  for pid in "${TARGET_PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || fail "$TARGET (pid $pid) died; see $WORK/$TARGET.err"
  done
}

# How busy the machine is before anything starts: other work skews every number.
# BENCH_WAIT_QUIET=SECONDS waits up to that long for it to be (nearly) idle.
busy_pct_1s() {
  local b0
  b0=$(machine_busy_ticks)
  sleep 1
  awk -v b=$(($(machine_busy_ticks) - b0)) -v hz="$CLK_TCK" -v n="$NPROC" \
    'BEGIN { printf "%.0f", 100 * b / hz / n }'
}
IDLE_BUSY_PCT=$(busy_pct_1s)
quiet_deadline=$((SECONDS + ${BENCH_WAIT_QUIET:-0}))
while [ "$IDLE_BUSY_PCT" -gt 10 ] && [ "$SECONDS" -lt "$quiet_deadline" ]; do
  log "machine ${IDLE_BUSY_PCT}% busy; waiting for it to be idle (BENCH_WAIT_QUIET)"
  sleep 9
  IDLE_BUSY_PCT=$(busy_pct_1s)
done
[ "$IDLE_BUSY_PCT" -le 10 ] ||
  log "warning: the machine is already ${IDLE_BUSY_PCT}% busy before the benchmark; numbers will be skewed"
RUN_START_BUSY=$(machine_busy_ticks)
RUN_START_OWN=$(own_ticks)
RUN_START_S=$SECONDS

# ---------------------------------------------------------------- upstream

log "starting the mock upstream"
# Made before the upstream starts: on a busy machine the loop below may
# read it before the background shell has opened it (and awk then fails).
: >"$WORK/upstream.out"
"${RUNAS[@]}" "$UPSTREAM_BIN" --threads "$NPROC" --key "$KEY" >"$WORK/upstream.out" 2>"$WORK/upstream.err" &
UPSTREAM_PID=$!
PIDS+=("$UPSTREAM_PID")
UPSTREAM_ADDR=
for _ in $(seq 1 100); do
  UPSTREAM_ADDR=$(awk '$1 == "listening" { print $2 }' "$WORK/upstream.out")
  [ -n "$UPSTREAM_ADDR" ] && break
  sleep 0.05
done
[ -n "$UPSTREAM_ADDR" ] || fail "the mock upstream did not start: $(cat "$WORK/upstream.err")"
"$LOADGEN" check --addr "$UPSTREAM_ADDR" --expect 401 >/dev/null ||
  fail "the mock upstream accepted a request without the key"
"$LOADGEN" check --addr "$UPSTREAM_ADDR" --auth "$AUTH" >/dev/null ||
  fail "the mock upstream refused its own key"

upstream_stat() {
  "$LOADGEN" get --addr "$UPSTREAM_ADDR" --auth "$AUTH" --path /stats | awk -v k="$1" '$1 == k { print $2 }'
}
unauthorized() { upstream_stat unauthorized; }
UNAUTHORIZED_BASE=$(unauthorized)

# ---------------------------------------------------------------- TLS upstream

# The part of an nginx configuration every instance here shares: $1 its
# directory (pid and temp files), $2 its worker processes. Ends inside http {.
nginx_preamble() {
  cat <<EOF
daemon off;
master_process on;
worker_processes $2;
worker_rlimit_nofile $NOFILE;
pid $1/nginx.pid;
error_log stderr warn;
events {
    worker_connections $NGINX_WORKER_CONNECTIONS;
}
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $1/client_body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
EOF
}


# Real deployments reach the model over HTTPS. For the TLS phase a second
# nginx terminates TLS (certificate from a CA made for this run) in front of
# the mock upstream, passing requests on unchanged over kept-alive HTTP/1.1.
TLS_DIR=$WORK/tls
mkdir -p "$TLS_DIR"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=keyrelay bench CA" \
  -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.pem" >/dev/null 2>&1 || fail "openssl could not make the test CA"
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout "$TLS_DIR/server.key" \
  -out "$TLS_DIR/server.csr" >/dev/null 2>&1 || fail "openssl could not make the server key"
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$TLS_DIR/san.ext"
openssl x509 -req -in "$TLS_DIR/server.csr" -CA "$TLS_DIR/ca.pem" -CAkey "$TLS_DIR/ca.key" \
  -CAcreateserial -days 2 -extfile "$TLS_DIR/san.ext" -out "$TLS_DIR/server.pem" >/dev/null 2>&1 ||
  fail "openssl could not sign the server certificate"
chmod 644 "$TLS_DIR"/*
chmod 777 "$TLS_DIR"
TLS_PORT=$("$LOADGEN" free-port)
TLS_ADDR=127.0.0.1:$TLS_PORT
# The same terminator speaks HTTP/2 (ALPN h2) on a second port, for the
# HTTP/2-upstream phase (haproxy and keyrelay; nginx cannot proxy to HTTP/2).
H2_PORT=$("$LOADGEN" free-port)
H2_ADDR=127.0.0.1:$H2_PORT
{
  nginx_preamble "$TLS_DIR" 1
  cat <<EOF
    upstream model {
        server $UPSTREAM_ADDR;
        keepalive 256;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$TLS_PORT ssl backlog=4096;
        listen 127.0.0.1:$H2_PORT ssl http2 backlog=4096;
        ssl_certificate $TLS_DIR/server.pem;
        ssl_certificate_key $TLS_DIR/server.key;
        location / {
            proxy_pass http://model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }
    }
}
EOF
} >"$TLS_DIR/nginx.conf"
"${RUNAS[@]}" "$NGINX" -p "$TLS_DIR" -e stderr -c "$TLS_DIR/nginx.conf" >"$WORK/tls-terminator.out" 2>"$WORK/tls-terminator.err" &
TLS_PID=$!
PIDS+=("$TLS_PID")

# ---------------------------------------------------------------- targets

# $3 = tls: talk HTTPS to the TLS terminator in front of the mock upstream.
write_nginx_conf() {
  local dir=$1 port=$2 server=$UPSTREAM_ADDR scheme=http ssl=''
  if [ "${3:-}" = tls ]; then
    server=$TLS_ADDR scheme=https
    ssl="proxy_ssl_trusted_certificate $TLS_DIR/ca.pem; proxy_ssl_verify on; proxy_ssl_name localhost; proxy_ssl_server_name on; proxy_ssl_session_reuse on;"
  fi
  mkdir -p "$dir"
  chmod 777 "$dir"
  {
    nginx_preamble "$dir" "$NPROC"
    cat <<EOF
    upstream model {
        server $server;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$port backlog=4096;
        location / {
            proxy_pass $scheme://model;
            $ssl
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "$AUTH";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }
    }
}
EOF
  } >"$dir/nginx.conf"
}

# $3 = tls: as for write_nginx_conf.
write_haproxy_conf() {
  local dir=$1 port=$2 server=$UPSTREAM_ADDR
  [ "${3:-}" = tls ] && server="$TLS_ADDR ssl verify required ca-file $TLS_DIR/ca.pem sni str(localhost) verifyhost localhost"
  [ "${3:-}" = h2 ] && server="$H2_ADDR ssl verify required ca-file $TLS_DIR/ca.pem sni str(localhost) verifyhost localhost alpn h2"
  mkdir -p "$dir"
  cat >"$dir/haproxy.cfg" <<EOF
global
    maxconn $HAPROXY_MAXCONN
    nbthread $NPROC

defaults
    mode http
    maxconn $HAPROXY_MAXCONN
    timeout connect 10s
    timeout client 300s
    timeout server 300s
    option http-no-delay

frontend bench
    bind 127.0.0.1:$port
    http-request set-header Authorization "$AUTH"
    default_backend model

backend model
    server up $server
EOF
}

# Starts the current target on $PORT and measures the time to its first served request.
start_target() {
  local dir=$WORK/$TARGET ready t0_us ready_ns
  mkdir -p "$dir"
  chmod 777 "$dir"
  "$LOADGEN" wait-ready --addr "127.0.0.1:$PORT" --timeout-ms 15000 >"$dir/ready.out" 2>"$dir/ready.err" &
  ready=$!
  sleep 0.2 # the poller is up and knocking before the target starts
  case "$TARGET" in
    nginx)
      write_nginx_conf "$dir" "$PORT"
      t0_us=${EPOCHREALTIME/./}
      "${RUNAS[@]}" "$NGINX" -p "$dir" -e stderr -c "$dir/nginx.conf" >"$WORK/$TARGET.out" 2>"$WORK/$TARGET.err" &
      ;;
    haproxy)
      write_haproxy_conf "$dir" "$PORT"
      t0_us=${EPOCHREALTIME/./}
      "${RUNAS[@]}" "$HAPROXY" -db -f "$dir/haproxy.cfg" >"$WORK/$TARGET.out" 2>"$WORK/$TARGET.err" &
      ;;
    keyrelay | keyrelay-warn)
      # Users run the defaults, access log included; -warn is the quiet twin.
      local log_env=()
      [ "$TARGET" = keyrelay-warn ] && log_env=(RUST_LOG=warn)
      t0_us=${EPOCHREALTIME/./}
      env BASETEN_API_KEY=$KEY "${log_env[@]}" "${RUNAS[@]}" "$KEYRELAY" --listen "127.0.0.1:$PORT" \
        --upstream "http://$UPSTREAM_ADDR" >"$WORK/$TARGET.out" 2>"$WORK/$TARGET.err" &
      ;;
  esac
  TARGET_PID=$!
  PIDS+=("$TARGET_PID")
  local finished='' status=0
  wait -n -p finished "$ready" "$TARGET_PID" || status=$?
  if [ "$finished" != "$ready" ]; then
    kill "$ready" 2>/dev/null || true
    fail "$TARGET exited during start-up (status $status); its stderr: $(tail -5 "$WORK/$TARGET.err")"
  fi
  if [ "$status" != 0 ]; then
    fail "$TARGET never answered 200: $(cat "$dir/ready.err"); its stderr: $(tail -5 "$WORK/$TARGET.err")"
  fi
  ready_ns=$(value_of ready_ns "$dir/ready.out")
  record startup_ms "$(awk -v r="$ready_ns" -v t="$t0_us" 'BEGIN { printf "%.2f", (r / 1000 - t) / 1000 }')"
  mapfile -t TARGET_PIDS < <(target_pids "$TARGET_PID")
}

# wrk against /small with $1 connections.
# wrk against /small with $1 connections, round $2 (warm-up before the first).
phase_small() {
  local conns=$1 round=$2
  local out=$WORK/$TARGET.wrk$conns.r$round.txt before after header=()
  [ "$TARGET" = direct ] && header=(-H "Authorization: $AUTH")
  local url="http://$ADDR/small" threads=$NPROC
  [ "$conns" -lt "$threads" ] && threads=$conns
  if [ "$WARMUP_SECS" != 0 ] && [ "$round" = 1 ]; then
    "$WRK" -t"$threads" -c"$conns" -d"${WARMUP_SECS}s" "${header[@]}" "$url" >/dev/null
  fi
  local accepted_before accepted_after
  accepted_before=$(upstream_stat connections)
  [ "$TARGET" = direct ] || before=$(cpu_ticks "${TARGET_PIDS[@]}")
  "$WRK" -t"$threads" -c"$conns" -d"${SMALL_SECS}s" --latency "${header[@]}" "$url" >"$out"
  [ "$TARGET" = direct ] || after=$(cpu_ticks "${TARGET_PIDS[@]}")
  accepted_after=$(upstream_stat connections)
  local parsed requests
  parsed=$(awk '
    function ms(v) {
      if (v ~ /us$/) return v * 0.001
      if (v ~ /ms$/) return v + 0
      if (v ~ /s$/) return v * 1000
      if (v ~ /m$/) return v * 60000
      return v + 0
    }
    $2 == "requests" && $3 == "in" { requests = $1 }
    $1 == "Requests/sec:" { rps = $2 }
    $1 == "50%" { p50 = ms($2) }
    $1 == "99%" { p99 = ms($2) }
    $1 == "Socket" && $2 == "errors:" { gsub(/,/, ""); errors += $4 + $6 + $8 + $10 }
    /Non-2xx or 3xx responses:/ { errors += $NF }
    END { printf "%d %.0f %.3f %.3f %d\n", requests, rps, p50, p99, errors }
  ' "$out")
  read -r requests rps p50 p99 errors <<<"$parsed"
  [ "${requests:-0}" -gt 0 ] || fail "$TARGET served no request with wrk -c$conns: $(cat "$out")"
  # One line per round; summarize_small turns them into the reported figures.
  record "c${conns}_rps_round" "$rps"
  record "c${conns}_p50_ms_round" "$p50"
  record "c${conns}_p99_ms_round" "$p99"
  record "c${conns}_errors_round" "$errors"
  record "c${conns}_requests_round" "$requests"
  record "c${conns}_upstream_conns_round" "$((accepted_after - accepted_before - 1))"
  if [ "$TARGET" != direct ]; then
    record "c${conns}_cpu_us_round" "$(awk -v t=$((after - before)) -v hz="$CLK_TCK" -v n="$requests" \
      'BEGIN { printf "%.2f", t / hz * 1e6 / n }')"
  fi
  log "$TARGET c=$conns round $round: $rps req/s, p50 $p50 ms, p99 $p99 ms, $errors errors," \
    "$((accepted_after - accepted_before - 1)) upstream connections"
}

# Per target: the median over the rounds of req/s, latencies and CPU per request
# (a round disturbed by something else on the machine does not move it), and
# the sums of errors, requests and upstream connections.
summarize_small() {
  local conns=$1 key value
  for TARGET in $TARGETS; do
    for key in rps p50_ms p99_ms cpu_us; do
      value=$(awk -v t="$TARGET" -v k="c${conns}_${key}_round" '$1 == t && $2 == k { print $3 }' "$RESULTS" |
        sort -g | awk '{ v[NR] = $1 } END { if (NR) print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
      [ -z "$value" ] || record "c${conns}_$key" "$value"
    done
    for key in errors requests upstream_conns; do
      value=$(awk -v t="$TARGET" -v k="c${conns}_${key}_round" '$1 == t && $2 == k { s += $3; n++ } END { if (n) print s }' "$RESULTS")
      [ -z "$value" ] || record "c${conns}_$key" "$value"
    done
  done
}

loadgen_auth() { [ "$TARGET" = direct ] && echo "$AUTH" || echo ""; }

phase_stream() {
  local out=$WORK/$TARGET.stream.txt
  "$LOADGEN" stream --addr "$ADDR" --auth "$(loadgen_auth)" --streams "$STREAMS" \
    --chunks "$STREAM_CHUNKS" --interval-ms "$STREAM_INTERVAL_MS" --size 64 >"$out" 2>"$out.err" ||
    fail "$TARGET streaming phase: $(cat "$out.err")"
  record_all stream "$out"
  log "$TARGET streams: $(tr '\n' ' ' <"$out")"
}

phase_bulk() {
  local out=$WORK/$TARGET.bulk.txt before after
  if [ "$TARGET" != direct ]; then
    reset_peak "${TARGET_PIDS[@]}"
    before=$(cpu_ticks "${TARGET_PIDS[@]}")
  fi
  "$LOADGEN" bulk --addr "$ADDR" --auth "$(loadgen_auth)" --bytes "$BULK_BYTES" >"$out" 2>"$out.err" ||
    fail "$TARGET bulk phase: $(cat "$out.err")"
  record bulk_mbps "$(value_of mbps "$out")"
  if [ "$TARGET" != direct ]; then
    after=$(cpu_ticks "${TARGET_PIDS[@]}")
    record bulk_cpu_s_per_gib "$(awk -v t=$((after - before)) -v hz="$CLK_TCK" -v b="$BULK_BYTES" \
      'BEGIN { printf "%.3f", t / hz / (b / 1073741824) }')"
    record bulk_peak_rss_mib "$(mib "$(status_kb VmHWM "${TARGET_PIDS[@]}")")"
  fi
  log "$TARGET bulk: $(value_of mbps "$out") MB/s"
}

phase_cancel() {
  local out=$WORK/$TARGET.cancel.txt
  "$LOADGEN" cancel --addr "$ADDR" --auth "$(loadgen_auth)" --upstream "$UPSTREAM_ADDR" \
    --upstream-auth "$AUTH" --trials "$CANCEL_TRIALS" --interval-ms "$CANCEL_INTERVAL_MS" \
    >"$out" 2>"$out.err" || {
    # A proxy that never propagates a disconnect is a result, not a broken run.
    log "$TARGET cancellation: $(cat "$out.err")"
  }
  record cancel_p50_ms "$(value_of p50_ms "$out")"
  record cancel_mean_ms "$(value_of mean_ms "$out")"
  record cancel_max_ms "$(value_of max_ms "$out")"
  record cancel_missed "$(value_of missed "$out")"
  log "$TARGET cancel: $(tr '\n' ' ' <"$out")"
}

# Many long streams of tiny frames: what relaying LLM tokens costs per token.
phase_chunks() {
  local out=$WORK/$TARGET.chunks.txt before after
  [ "$TARGET" = direct ] || before=$(cpu_ticks "${TARGET_PIDS[@]}")
  "$LOADGEN" hold --addr "$ADDR" --auth "$(loadgen_auth)" --streams "$CHUNK_STREAMS" \
    --secs "$CHUNK_SECS" --interval-ms 50 --size 32 >"$out" 2>"$out.err" ||
    fail "$TARGET token chunks: $(cat "$out.err")"
  local received
  received=$(value_of records "$out")
  [ "${received:-0}" -gt 0 ] || fail "$TARGET relayed no token chunk"
  record chunks_received "$received"
  record chunks_expected "$(value_of records_expected "$out")"
  record chunks_failed "$(value_of failed "$out")"
  if [ "$TARGET" != direct ]; then
    after=$(cpu_ticks "${TARGET_PIDS[@]}")
    record chunks_cpu_us "$(awk -v t=$((after - before)) -v hz="$CLK_TCK" -v n="$received" \
      'BEGIN { printf "%.3f", t / hz * 1e6 / n }')"
  fi
  log "$TARGET token chunks: $(tr '\n' ' ' <"$out") $(head -c 300 "$out.err")"
}

# Starts a fresh process of the current target for one phase on 127.0.0.1:$2,
# its files in $1, talking to the upstream of kind $3: plain (the mock
# itself), tls (HTTPS to the TLS terminator) or h2 (HTTP/2 over TLS; haproxy
# and keyrelay only). Sets FRESH_PID and FRESH_PIDS once it answers 200.
start_fresh() {
  local dir=$1 port=$2 kind=$3 addr=127.0.0.1:$2 upstream=()
  mkdir -p "$dir"
  chmod 777 "$dir"
  case "$kind" in
    plain) upstream=(--upstream "http://$UPSTREAM_ADDR") ;;
    tls) upstream=(--upstream "https://127.0.0.1:$TLS_PORT" --ca-file "$TLS_DIR/ca.pem") ;;
    h2) upstream=(--upstream-http2 --upstream "https://127.0.0.1:$H2_PORT" --ca-file "$TLS_DIR/ca.pem") ;;
  esac
  case "$TARGET" in
    nginx)
      write_nginx_conf "$dir" "$port" "$kind"
      "${RUNAS[@]}" "$NGINX" -p "$dir" -e stderr -c "$dir/nginx.conf" >"$dir/out" 2>"$dir/err" &
      ;;
    haproxy)
      write_haproxy_conf "$dir" "$port" "$kind"
      "${RUNAS[@]}" "$HAPROXY" -db -f "$dir/haproxy.cfg" >"$dir/out" 2>"$dir/err" &
      ;;
    keyrelay)
      env BASETEN_API_KEY=$KEY "${RUNAS[@]}" "$KEYRELAY" --listen "$addr" "${upstream[@]}" \
        >"$dir/out" 2>"$dir/err" &
      ;;
  esac
  FRESH_PID=$!
  PIDS+=("$FRESH_PID")
  "$LOADGEN" wait-ready --addr "$addr" --timeout-ms 15000 >/dev/null 2>"$dir/ready.err" ||
    fail "$TARGET ($kind upstream) never answered 200: $(cat "$dir/ready.err"); $(tail -5 "$dir/err")"
  mapfile -t FRESH_PIDS < <(target_pids "$FRESH_PID")
}

# The same proxy configured for the HTTPS upstream (the TLS terminator),
# started for this phase only: CPU per request, memory per held stream, burst.
phase_tls() {
  local dir=$WORK/$TARGET-tls port addr pid out before after requests tls_pids=()
  port=$("$LOADGEN" free-port)
  addr=127.0.0.1:$port
  start_fresh "$dir" "$port" tls
  pid=$FRESH_PID
  tls_pids=("${FRESH_PIDS[@]}")
  sleep 0.5
  local idle_kb
  idle_kb=$(status_kb VmRSS "${tls_pids[@]}")

  out=$dir/wrk.txt
  before=$(cpu_ticks "${tls_pids[@]}")
  "$WRK" -t"$NPROC" -c32 -d"${SMALL_SECS}s" "http://$addr/small" >"$out"
  after=$(cpu_ticks "${tls_pids[@]}")
  requests=$(awk '$2 == "requests" && $3 == "in" { print $1 }' "$out")
  [ "${requests:-0}" -gt 0 ] || fail "$TARGET served no request over the TLS upstream: $(cat "$out")"
  if grep -q 'Non-2xx' "$out"; then fail "$TARGET over the TLS upstream: $(grep Non-2xx "$out")"; fi
  record tls_c32_rps "$(awk '$1 == "Requests/sec:" { printf "%.0f", $2 }' "$out")"
  record tls_c32_cpu_us "$(awk -v t=$((after - before)) -v hz="$CLK_TCK" -v n="$requests" \
    'BEGIN { printf "%.2f", t / hz * 1e6 / n }')"

  out=$dir/hold.txt
  reset_peak "${tls_pids[@]}"
  "$LOADGEN" hold --addr "$addr" --streams "$TLS_HOLD" --secs "$HOLD_SECS" >"$out" 2>"$out.err" ||
    fail "$TARGET with $TLS_HOLD streams over the TLS upstream: $(cat "$out.err")"
  local peak_kb
  peak_kb=$(status_kb VmHWM "${tls_pids[@]}")
  record tls_hold_failed "$(value_of failed "$out")"
  record tls_hold_peak_rss_mib "$(mib "$peak_kb")"
  record tls_hold_kib_per_stream "$(kib_per_stream "$peak_kb" "$idle_kb" "$out")"

  out=$dir/burst.txt
  "$LOADGEN" burst --addr "$addr" --streams "$BURST_STREAMS" >"$out" 2>"$out.err" ||
    fail "$TARGET burst over the TLS upstream: $(cat "$out.err")"
  record tls_burst_all_first_ms "$(value_of all_first_ms "$out")"
  record tls_burst_failed "$(value_of failed "$out")"
  log "$TARGET over the TLS upstream: $(awk '/Requests\/sec/ { print $2 " req/s" }' "$dir/wrk.txt")," \
    "$(tr '\n' ' ' <"$dir/hold.txt") $(tr '\n' ' ' <"$out")"
  stop_pid "$pid"
}

# haproxy and keyrelay configured for HTTP/2 to the TLS terminator, started
# for this phase only: memory per held stream (streams share connections).
phase_h2() {
  local dir=$WORK/$TARGET-h2 port addr pid out idle_kb peak_kb h2_pids=()
  port=$("$LOADGEN" free-port)
  addr=127.0.0.1:$port
  start_fresh "$dir" "$port" h2
  pid=$FRESH_PID
  h2_pids=("${FRESH_PIDS[@]}")
  sleep 0.5
  idle_kb=$(status_kb VmRSS "${h2_pids[@]}")
  out=$dir/hold.txt
  reset_peak "${h2_pids[@]}"
  "$LOADGEN" hold --addr "$addr" --streams "$TLS_HOLD" --secs "$HOLD_SECS" >"$out" 2>"$out.err" ||
    fail "$TARGET with $TLS_HOLD streams over the HTTP/2 upstream: $(cat "$out.err")"
  peak_kb=$(status_kb VmHWM "${h2_pids[@]}")
  record h2_hold_failed "$(value_of failed "$out")"
  record h2_hold_peak_rss_mib "$(mib "$peak_kb")"
  record h2_hold_kib_per_stream "$(kib_per_stream "$peak_kb" "$idle_kb" "$out")"
  log "$TARGET over the HTTP/2 upstream: $(tr '\n' ' ' <"$out")"
  stop_pid "$pid"
}

# A fresh process of each proxy in front of the plain upstream, as a new pod
# starts: idle RSS, peak RSS with $GIVEN_HOLD held streams, and (in
# given_back_finish, once every target has held its streams) RSS $GIVEN_WAIT s
# after its streams ended: what a burst leaves behind.
declare -A GIVEN_PID GIVEN_PIDS GIVEN_IDLE GIVEN_ENDED
phase_given_back() {
  local dir=$WORK/$TARGET-given-back port out peak_kb
  port=$("$LOADGEN" free-port)
  start_fresh "$dir" "$port" plain
  sleep 0.5
  GIVEN_PID[$TARGET]=$FRESH_PID
  GIVEN_PIDS[$TARGET]="${FRESH_PIDS[*]}"
  GIVEN_IDLE[$TARGET]=$(status_kb VmRSS "${FRESH_PIDS[@]}")
  record given_idle_rss_mib "$(mib "${GIVEN_IDLE[$TARGET]}")"
  out=$dir/hold.txt
  reset_peak "${FRESH_PIDS[@]}"
  "$LOADGEN" hold --addr "127.0.0.1:$port" --streams "$GIVEN_HOLD" --secs "$HOLD_SECS" >"$out" 2>"$out.err" ||
    fail "$TARGET (fresh) with $GIVEN_HOLD streams: $(cat "$out.err")"
  GIVEN_ENDED[$TARGET]=$SECONDS
  peak_kb=$(status_kb VmHWM "${FRESH_PIDS[@]}")
  record given_failed "$(value_of failed "$out")"
  record given_peak_rss_mib "$(mib "$peak_kb")"
  record given_kib_per_stream "$(kib_per_stream "$peak_kb" "${GIVEN_IDLE[$TARGET]}" "$out")"
  log "$TARGET fresh, $GIVEN_HOLD streams: $(tr '\n' ' ' <"$out")"
}

# RSS of each fresh process $GIVEN_WAIT s after its own streams ended (the
# targets' waits overlap, so the phase costs one wait, not three).
given_back_finish() {
  local pids=() after_kb
  for TARGET in nginx haproxy keyrelay; do
    [ -n "${GIVEN_PID[$TARGET]:-}" ] || continue
    while [ $((SECONDS - GIVEN_ENDED[$TARGET])) -lt "$GIVEN_WAIT" ]; do sleep 1; done
    read -ra pids <<<"${GIVEN_PIDS[$TARGET]}"
    after_kb=$(status_kb VmRSS "${pids[@]}")
    record given_after_rss_mib "$(mib "$after_kb")"
    record given_after_ratio "$(awk -v a="$after_kb" -v i="${GIVEN_IDLE[$TARGET]}" 'BEGIN { printf "%.2f", a / i }')"
    log "$TARGET fresh: $(mib "$after_kb") MiB ${GIVEN_WAIT} s after its streams ended (idle $(mib "${GIVEN_IDLE[$TARGET]}"))"
    stop_pid "${GIVEN_PID[$TARGET]}"
  done
}

phase_burst() {
  local out=$WORK/$TARGET.burst.txt
  "$LOADGEN" burst --addr "$ADDR" --auth "$(loadgen_auth)" --streams "$BURST_STREAMS" \
    >"$out" 2>"$out.err" || fail "$TARGET burst of $BURST_STREAMS connections: $(cat "$out.err")"
  record burst_all_first_ms "$(value_of all_first_ms "$out")"
  record burst_first_p50_ms "$(value_of first_p50_ms "$out")"
  record burst_failed "$(value_of failed "$out")"
  record burst_listen_overflows "$(value_of listen_overflows "$out")"
  log "$TARGET burst: $(tr '\n' ' ' <"$out") $(head -c 300 "$out.err")"
}

phase_hold() {
  local count=$1 slot=$2 out=$WORK/$TARGET.hold$1.txt idle_kb peak_kb
  echo "label hold_$slot $count" >>"$RESULTS"
  if [ "$TARGET" != direct ]; then
    idle_kb=$(status_kb VmRSS "${TARGET_PIDS[@]}")
    reset_peak "${TARGET_PIDS[@]}"
  fi
  "$LOADGEN" hold --addr "$ADDR" --auth "$(loadgen_auth)" --streams "$count" --secs "$HOLD_SECS" \
    >"$out" 2>"$out.err" || fail "$TARGET with $count streams: $(cat "$out.err")"
  record "hold_${slot}_completed" "$(value_of completed "$out")"
  record "hold_${slot}_failed" "$(value_of failed "$out")"
  record "hold_${slot}_peak_open" "$(value_of peak_open "$out")"
  if [ "$TARGET" != direct ]; then
    peak_kb=$(status_kb VmHWM "${TARGET_PIDS[@]}")
    record "hold_${slot}_peak_rss_mib" "$(mib "$peak_kb")"
    record "hold_${slot}_kib_per_stream" "$(kib_per_stream "$peak_kb" "$idle_kb" "$out")"
  fi
  log "$TARGET $count streams: $(tr '\n' ' ' <"$out") $(head -c 300 "$out.err")"
}

# Start every target in turn (measuring start-up and idle memory), then run
# each phase against every target in turn, so that the targets compared in a
# phase are measured minutes apart at most, under the same conditions.
declare -A T_ADDR T_PIDS T_MAIN
for TARGET in $TARGETS; do
  case "$TARGET" in
    direct)
      T_ADDR[$TARGET]=$UPSTREAM_ADDR
      T_PIDS[$TARGET]=$UPSTREAM_PID
      ;;
    nginx | haproxy | keyrelay | keyrelay-warn)
      log "starting $TARGET"
      PORT=$("$LOADGEN" free-port)
      ADDR=127.0.0.1:$PORT
      start_target
      sleep 0.5
      record idle_rss_mib "$(mib "$(status_kb VmRSS "${TARGET_PIDS[@]}")")"
      # A client credential must be replaced, never passed on.
      "$LOADGEN" check --addr "$ADDR" --auth "Api-Key client-placeholder" >/dev/null ||
        fail "$TARGET did not replace the client's Authorization with the key"
      T_ADDR[$TARGET]=$ADDR
      T_PIDS[$TARGET]="${TARGET_PIDS[*]}"
      T_MAIN[$TARGET]=$TARGET_PID
      ;;
    *) fail "unknown target $TARGET" ;;
  esac
done

# Runs one phase (a function and its arguments) against every target in turn;
# the quiet keyrelay-warn only where the access log's cost shows.
each_target() {
  local now
  for TARGET in $TARGETS; do
    if [ "$TARGET" = keyrelay-warn ]; then
      case "$1" in phase_small | phase_burst | phase_chunks) ;; *) continue ;; esac
    fi
    if [ "$1" = phase_tls ] || [ "$1" = phase_given_back ]; then
      case "$TARGET" in direct | keyrelay-warn) continue ;; esac
    fi
    if [ "$1" = phase_h2 ]; then
      case "$TARGET" in haproxy | keyrelay) ;; *) continue ;; esac
    fi
    ADDR=${T_ADDR[$TARGET]}
    read -ra TARGET_PIDS <<<"${T_PIDS[$TARGET]}"
    "$@"
    alive
    now=$(unauthorized)
    [ "$now" = "$UNAUTHORIZED_BASE" ] ||
      fail "$TARGET let $((now - UNAUTHORIZED_BASE)) requests reach the upstream without the key"
  done
}

for conns in $CONNS; do
  for round in $(seq 1 "$ROUNDS"); do
    log "=== small requests, $conns connections, round $round of $ROUNDS"
    each_target phase_small "$conns" "$round"
  done
  summarize_small "$conns"
done
log "=== streaming fidelity"
each_target phase_stream
log "=== bulk"
each_target phase_bulk
log "=== token chunks: $CHUNK_STREAMS streams, a chunk every 50 ms for $CHUNK_SECS s"
each_target phase_chunks
log "=== burst of $BURST_STREAMS connections"
each_target phase_burst
log "=== TLS upstream: $TLS_HOLD held streams, wrk -c32, burst of $BURST_STREAMS"
each_target phase_tls
log "=== HTTP/2 upstream (TLS): $TLS_HOLD held streams"
each_target phase_h2
echo "label given_wait $GIVEN_WAIT" >>"$RESULTS"
log "=== memory given back: fresh processes, $GIVEN_HOLD held streams, RSS $GIVEN_WAIT s after"
each_target phase_given_back
given_back_finish
log "=== cancellation"
each_target phase_cancel
slot=a
for count in $HOLD_COUNTS; do
  log "=== $count simultaneous streams"
  each_target phase_hold "$count" "$slot"
  slot=b
done

# Stop the proxies now, so that their CPU time is counted as ours below.
for TARGET in $TARGETS; do
  [ -n "${T_MAIN[$TARGET]:-}" ] || continue
  stop_pid "${T_MAIN[$TARGET]}"
  for i in "${!PIDS[@]}"; do [ "${PIDS[$i]}" = "${T_MAIN[$TARGET]}" ] && unset "PIDS[$i]"; done
done

for TARGET in keyrelay nginx haproxy; do
  case "$TARGET" in
    keyrelay) bin=$KEYRELAY ;;
    nginx) bin=$(readlink -f "$NGINX") ;;
    haproxy) bin=$(readlink -f "$HAPROXY") ;;
  esac
  record binary_mib "$(awk -v b="$(stat -c %s "$bin")" 'BEGIN { printf "%.2f", b / 1048576 }')"
done

# CPU that other processes on the machine used while the benchmark ran.
upstream_ticks=$(cpu_ticks "$UPSTREAM_PID")
FOREIGN_PCT=$(awk -v busy=$(($(machine_busy_ticks) - RUN_START_BUSY)) \
  -v own=$(($(own_ticks) - RUN_START_OWN + upstream_ticks)) -v secs=$((SECONDS - RUN_START_S)) \
  -v hz="$CLK_TCK" -v n="$NPROC" \
  'BEGIN { f = 100 * (busy - own) / hz / n / (secs > 0 ? secs : 1); printf "%.0f", f < 0 ? 0 : f }')
[ "$FOREIGN_PCT" -le 5 ] ||
  log "warning: other processes used ${FOREIGN_PCT}% of the machine during the benchmark"

# ---------------------------------------------------------------- report

if [ -z "$OUT" ]; then
  if [ "$SMOKE" = 1 ]; then
    OUT=$(mktemp /tmp/keyrelay-bench-smoke.XXXXXX.md)
  else
    OUT=$ROOT/BENCHMARKS.md
  fi
fi

commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$ROOT" diff --quiet HEAD -- src Cargo.lock 2>/dev/null || commit="$commit (with uncommitted changes)"
{
  cat <<EOF
# keyrelay benchmarks

Generated by \`bench/run.sh$([ "$SMOKE" = 1 ] && echo " --smoke")\` on $(date -u '+%Y-%m-%d %H:%M UTC'). All
targets run side by side in one run on one machine, and each phase measures
them in turn with the same load, so the figures in a row were taken minutes
apart at most. They still move by several percent from run to run on a
2-core machine (more when something else runs on it), so read ratios, not
digits. Regenerate with \`bench/run.sh\` (about 9 minutes after the builds).

$([ "$FOREIGN_PCT" -le 5 ] || printf '> **Warning:** other processes used %s%% of the machine during this run, so\n> these numbers are skewed (more so the phases that ran while they did).\n' "$FOREIGN_PCT")

## Machine and versions

| | |
|---|---|
| CPUs (nproc) | $NPROC |
| CPU model | $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo) |
| memory | $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) |
| kernel | $(uname -sr) |
| open-file limit | $NOFILE |
| other load | ${IDLE_BUSY_PCT}% of the CPUs busy just before the run; ${FOREIGN_PCT}% used by other processes during it |
| keyrelay | commit $commit, $(rustc --version) |
| nginx | $("$NGINX" -v 2>&1 | sed 's/^nginx version: //') |
| haproxy | $("$HAPROXY" -v 2>/dev/null | head -1 | awk '{ print $3 }') |
| wrk | $("$WRK" -v 2>&1 | head -1 | awk '{ print $2 }') |

## Setup

- **direct**: the mock upstream (\`bench/upstream.rs\`, hyper, $NPROC threads)
  with no proxy; the client sends the key itself. Every other target sits in
  front of the same upstream instance, which answers 401 to any request
  without \`Authorization: $AUTH\`, so injection is checked on every request
  (the run fails if any request reached it without the key).
- **nginx**: $NPROC workers, \`proxy_buffering off\`, \`proxy_request_buffering off\`,
  HTTP/1.1 to the upstream with \`keepalive 64\`, \`proxy_set_header Authorization\`,
  \`keepalive_requests 1000000\` (client and upstream), \`worker_connections $NGINX_WORKER_CONNECTIONS\`,
  access log off.
- **haproxy**: $NPROC threads, \`http-request set-header Authorization\`,
  \`option http-no-delay\`, \`maxconn $HAPROXY_MAXCONN\`, default connection reuse, no logging.
- **keyrelay**: \`target/release/keyrelay --listen 127.0.0.1:PORT --upstream http://UPSTREAM\`
  with \`BASETEN_API_KEY\`, default settings (\`workers\` auto: one serving thread per
  CPU, each a single-threaded runtime with its own \`SO_REUSEPORT\` socket and upstream
  pool of up to 1024 idle connections; \`listen_backlog\` 4096), **its
  access log on** (one line per request to stderr, which goes to a file), as users run it.
- **keyrelay-warn**: the same with \`RUST_LOG=warn\` (no access-log line), in the
  small-request, token-chunk and burst phases only, to show what the access log costs.
- Everything listens on 127.0.0.1 on ports picked free at run time; servers
  run as \`$RUN_USER\`. The load tools (wrk with $NPROC threads,
  \`bench/loadgen.rs\` on one thread) share the $NPROC CPUs with the proxy and the upstream.

## Method

- **Small requests**: \`wrk -t$NPROC -cN -d${SMALL_SECS}s --latency\` on \`GET /small\` (a
  ~70-byte JSON body) at N = ${CONNS// / and }, in $ROUNDS rounds that take the targets in turn
  (a ${WARMUP_SECS}s warm-up before each target's first round); the table shows the median
  round. Proxy CPU per request = user+system time of all the proxy's processes and
  threads (\`/proc/PID/stat\`) over the round, divided by the requests wrk counted.
  Upstream connections opened = connections the mock upstream accepted during the
  rounds (wrk itself opens N + 1 when direct): a proxy that reuses its upstream
  connections opens few.
- **Streaming fidelity**: $STREAMS concurrent streams of $STREAM_CHUNKS 64-byte records,
  each sent ${STREAM_INTERVAL_MS} ms after the previous one; each record carries the
  upstream's wall clock (\`CLOCK_REALTIME\`) when it was handed to its connection. Delay =
  receive time of the \`read()\` that completed the record − that timestamp; *added* = the
  target's figure − direct's. Time to first record is from writing the request. A
  record is *merged* when it completed in the same \`read()\` as the one before it.
- **Bulk**: one chunked response of $BULK_BYTES bytes in 64 KiB frames, read in
  256 KiB reads; MB/s = 10⁶ bytes per second; proxy CPU seconds scaled to 1 GiB; peak
  RSS = \`VmHWM\` (reset through \`/proc/PID/clear_refs\` before the phase).
- **Concurrency**: ${HOLD_COUNTS// / and } simultaneous streams, each
  lasting ${HOLD_SECS} s (a 48-byte record every 500 ms), opened with at most 128
  connections in progress at once; *completed* = every record and the final chunk
  arrived; *peak open* = streams whose headers had arrived and body had not ended,
  at the busiest moment. Peak RSS as for bulk; KiB per held stream = (peak RSS −
  RSS just before the phase) / peak open, over the plain HTTP/1.1 upstream
  (the TLS and HTTP/2 phases below divide the same way).
- **Token chunks**: $CHUNK_STREAMS streams at once (opened 128 at a time), each a
  32-byte record every 50 ms for ${CHUNK_SECS} s, as an LLM's tokens arrive; proxy CPU
  (user + system, all its processes) over the phase divided by the chunks the
  clients received.
- **TLS upstream**: a second nginx terminates TLS (a CA and certificate made for
  the run) in front of the mock upstream; each proxy is started again for this
  phase with HTTPS to it and the CA trusted (nginx \`proxy_pass https://\` with
  \`keepalive 64\`, \`proxy_ssl_verify on\`, session reuse; haproxy \`ssl verify
  required ca-file\`; keyrelay \`--upstream https://... --ca-file\`, HTTP/1.1):
  CPU per request at wrk -c32 for ${SMALL_SECS}s (the terminator's CPU not counted),
  peak RSS with $TLS_HOLD held streams and KiB per stream above idle, and the burst.
- **HTTP/2 upstream**: the same terminator also serves HTTP/2 (ALPN h2) on a
  second port; haproxy (\`alpn h2\` on its server line) and keyrelay
  (\`--upstream-http2\`) are started again with it: peak RSS with $TLS_HOLD held
  streams and KiB per stream above idle. nginx cannot proxy to an HTTP/2 upstream.
- **Memory given back**: a fresh process of each proxy in front of the plain
  upstream (as a new pod starts): idle RSS half a second after it first
  answered, peak RSS with $GIVEN_HOLD streams held ${HOLD_SECS} s, KiB per held stream
  above that idle figure, and RSS ${GIVEN_WAIT} s after its streams ended, also as a
  ratio of idle (keyrelay's upstream pool closes idle connections after 20 s).
- **Burst**: $BURST_STREAMS connections opened at once with no pacing (one
  thread, every connect issued before any completes), each asking for a stream whose
  one record comes at once; the time until every stream had its record, and the
  kernel's \`TcpExt ListenOverflows\` over the phase (a dropped SYN costs its client
  a 1 s retry). Listen backlogs: nginx 4096, haproxy its \`maxconn\`, keyrelay
  4096, each capped by \`net.core.somaxconn\` ($(cat /proc/sys/net/core/somaxconn) here).
- **Cancellation**: $CANCEL_TRIALS times, a stream with a record every ${CANCEL_INTERVAL_MS} ms is
  opened, the client closes the connection right after its third record, and the
  upstream timestamps the moment its response body is dropped. The next record is
  due ${CANCEL_INTERVAL_MS} ms later, so a proxy that only notices the disconnect when a
  write to the client fails shows one or two such intervals.
- **Footprint**: start-up = from launching the proxy to its first 200 on \`/small\`
  (a poller knocks every 0.2 ms); idle RSS = \`VmRSS\` half a second after that;
  binary size of the executable (nginx and haproxy also load shared libraries).
  nginx's RSS figures add up its master and worker processes.

## Results

EOF
  "$LOADGEN" report --results "$RESULTS"
  cat <<EOF

<details><summary>nginx and haproxy configurations used (ports vary per run)</summary>

\`\`\`nginx
$(sed "s|$WORK|WORKDIR|g" "$WORK/nginx/nginx.conf" 2>/dev/null || echo "(nginx not run)")
\`\`\`

\`\`\`haproxy
$(sed "s|$WORK|WORKDIR|g" "$WORK/haproxy/haproxy.cfg" 2>/dev/null || echo "(haproxy not run)")
\`\`\`

</details>
EOF
} >"$OUT.tmp"
# The hand-written record of optimisations tried lives at the end of the
# report; a new run keeps it.
if [ -f "$OUT" ] && grep -q "^$TRIED_HEADING" "$OUT"; then
  { echo; sed -n "/^$TRIED_HEADING/,\$p" "$OUT"; } >>"$OUT.tmp"
fi
mv "$OUT.tmp" "$OUT"
cp "$RESULTS" "$WORK/results.final.txt"
SUCCESS=1
log "report written to $OUT"
