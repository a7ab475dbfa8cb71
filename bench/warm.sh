#!/usr/bin/env bash
# The first request after startup and after an idle spell, with and without
# warm_connections, against an upstream whose connection setup costs DELAY_MS
# (a TLS server behind a relay that delays each new connection), and direct.
#
#   bench/warm.sh [DELAY_MS]      # default 300, a far-away model endpoint
#
# Needs openssl, curl and python3; builds keyrelay (debug: latency here is
# the upstream's, not keyrelay's CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
delay=${1:-300}
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cargo build -q --bin keyrelay
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$work/ca.key" -out "$work/ca.pem" -days 2 -subj "/CN=warm test ca" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout "$work/key.pem" -out "$work/leaf.csr" -subj "/CN=localhost" 2>/dev/null
printf "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n" > "$work/ext.cnf"
openssl x509 -req -in "$work/leaf.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial \
  -out "$work/cert.pem" -days 2 -extfile "$work/ext.cnf" 2>/dev/null

tls_port=$(free_port)
relay_port=$(free_port)
(cd "$work" && exec python3 "$OLDPWD/bench/delayed_tls_upstream.py" "$tls_port" "$relay_port" "$delay") &
pids+=($!)
sleep 1
t() { curl -s -o /dev/null -w '%{time_total}' "$@"; }

declare -A port
for warm in 1 0; do
  port[$warm]=$(free_port)
  BASETEN_API_KEY=k target/debug/keyrelay --listen "127.0.0.1:${port[$warm]}" \
    --upstream "https://localhost:$relay_port" --ca-file "$work/ca.pem" \
    --warm-connections "$warm" > "$work/keyrelay-$warm.log" 2>&1 &
  pids+=($!)
done
sleep 3
echo "upstream connection setup delayed by ${delay} ms; seconds per request (curl time_total)"
echo "direct, new connection:            $(t --cacert "$work/ca.pem" "https://localhost:$relay_port/x")"
echo "keyrelay warm_connections=1 first: $(t "http://127.0.0.1:${port[1]}/x")"
echo "keyrelay warm_connections=0 first: $(t "http://127.0.0.1:${port[0]}/x")"
idle=26  # past pool_idle_timeout (20 s), when the pool has closed its connection
sleep "$idle"
echo "after ${idle} s idle, warm=1:        $(t "http://127.0.0.1:${port[1]}/x")"
echo "after ${idle} s idle, warm=0:        $(t "http://127.0.0.1:${port[0]}/x")"
