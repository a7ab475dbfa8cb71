#!/usr/bin/env bash
# keyrelay's HTTP/2 upstream against real HTTP/2 servers from Debian packages.
#
#   bash tests/interop/run.sh [nginx haproxy h2o]   (default: all three)
#
# For each server: a CA and a certificate for localhost made at run time
# (openssl), the server as a TLS HTTP/2 front (ALPN h2) before the benchmark's
# mock upstream (bench/upstream.rs), and keyrelay at its defaults plus
# `--upstream-http2` and the CA. Then through keyrelay: 20,000 sequential
# requests and 2,000 streams held at once, every body checked
# (tests/interop/load.py). Passes only with 0 failures, 0 RST_STREAM-caused
# connection teardowns in keyrelay's log, and more than one upstream
# connection when the server caps streams per connection.
#
# The servers' own limits are left at their defaults where those are what
# users meet (nginx: 128 streams per connection, GOAWAY after
# keepalive_requests; haproxy and h2o: 100 streams), so the pool and the
# GOAWAY handling are exercised by the real implementations.
#
# Installs nginx, haproxy, h2o and openssl with apt-get when missing (CI);
# run by hand, it uses what is installed and skips nothing it was asked for.
set -euo pipefail
cd "$(dirname "$0")/../.."

servers=("$@")
[ ${#servers[@]} -gt 0 ] || servers=(nginx haproxy h2o)

need=()
for server in "${servers[@]}"; do
  command -v "$server" >/dev/null 2>&1 || [ -x "/usr/sbin/$server" ] || need+=("$server")
done
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]}"
  # Debian starts services on install; nothing here wants them running.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin"

echo "== building keyrelay and the mock upstream (debug: correctness, not speed)"
cargo build -q --bin keyrelay --example bench-upstream
KEYRELAY=target/debug/keyrelay
UPSTREAM=target/debug/examples/bench-upstream

work=$(mktemp -d /tmp/keyrelay-interop.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP_INTEROP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || ulimit -n 16384 2>/dev/null || true

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() { # port, what
  for _ in $(seq 1 200); do
    if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null; then
      return 0
    fi
    sleep 0.05
  done
  echo "FAIL: $2 did not listen on port $1" >&2
  return 1
}

echo "== test CA and a certificate for localhost"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=keyrelay interop CA" \
  -keyout "$work/ca.key" -out "$work/ca.pem" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
  -keyout "$work/server.key" -out "$work/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' > "$work/leaf.ext"
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
  -CAcreateserial -days 2 -extfile "$work/leaf.ext" -out "$work/server.pem" 2>/dev/null
cat "$work/server.pem" "$work/server.key" > "$work/server-with-key.pem"

mock_port=$(free_port)
"$UPSTREAM" --listen "127.0.0.1:$mock_port" --key interop-key > "$work/mock.log" 2>&1 &
pids+=($!)
wait_port "$mock_port" "the mock upstream"

start_nginx() { # port
  mkdir -p "$work/nginx"
  cat > "$work/nginx/nginx.conf" <<CONF
user root;
worker_processes 1;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 16384; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  upstream mock { server 127.0.0.1:$mock_port; keepalive 256; }
  server {
    listen 127.0.0.1:$1 ssl http2;
    ssl_certificate $work/server.pem;
    ssl_certificate_key $work/server.key;
    # GOAWAY after this many requests per connection: 20,000 requests
    # meet it 40 times.
    keepalive_requests 500;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      # The protocol keyrelay used, so the auto run can show what ALPN chose.
      add_header X-Upstream-Protocol \$server_protocol always;
    }
  }
}
CONF
  nginx -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log" &
  pids+=($!)
}

start_haproxy() { # port
  cat > "$work/haproxy.cfg" <<CONF
global
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend interop
  bind 127.0.0.1:$1 ssl crt $work/server-with-key.pem alpn h2
  default_backend mock
backend mock
  server mock 127.0.0.1:$mock_port
CONF
  haproxy -db -f "$work/haproxy.cfg" > "$work/haproxy.log" 2>&1 &
  pids+=($!)
}

start_h2o() { # port
  cat > "$work/h2o.conf" <<CONF
listen:
  host: 127.0.0.1
  port: $1
  ssl:
    certificate-file: $work/server.pem
    key-file: $work/server.key
num-threads: 1
max-connections: 8000
error-log: $work/h2o-error.log
hosts:
  default:
    paths:
      /:
        proxy.reverse.url: http://127.0.0.1:$mock_port/
CONF
  h2o -c "$work/h2o.conf" > "$work/h2o.log" 2>&1 &
  pids+=($!)
}

# keyrelay's peak RSS (VmHWM) and what it adds per held stream over its
# resident size at start (VmRSS read right after it listened).
declare -A start_rss
memory_line() { # pid, label
  local hwm
  hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$1/status")
  echo "peak_rss_kib=$hwm per_held_stream_kib=$(( (hwm - ${start_rss[$1]:-0}) / 2000 )) ($2)"
}

# keyrelay at its defaults in front of the server on $port, the CA trusted,
# plus any flags; sets relay_port and relay_pid. $1 names its log.
start_relay() { # log name, extra flags...
  local name=$1
  shift
  relay_port=$(free_port)
  BASETEN_API_KEY=interop-key "$KEYRELAY" \
    --listen "127.0.0.1:$relay_port" \
    --upstream "https://localhost:$port" --ca-file "$work/ca.pem" "$@" \
    --admin-listen "127.0.0.1:$(free_port)" \
    > "$work/keyrelay-$name.log" 2>&1 &
  relay_pid=$!
  pids+=($relay_pid)
  wait_port "$relay_port" "keyrelay ($name)"
  start_rss[$relay_pid]=$(awk '/^VmRSS/ {print $2}' "/proc/$relay_pid/status")
}

# The protocol nginx saw keyrelay use for one request (nginx's
# X-Upstream-Protocol header).
protocol_seen() {
  python3 -c 'import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=10)
c.request("GET", "/small")
r = c.getresponse()
r.read()
print(r.getheader("x-upstream-protocol"))' "$relay_port"
}

# Fails the run unless keyrelay reached nginx with protocol $1.
expect_protocol() { # protocol, label
  local seen
  seen=$(protocol_seen)
  if [ "$seen" != "$1" ]; then
    echo "FAIL: $2 reached nginx over $seen, expected $1"
    failed=1
  fi
}

failed=0
summary=()
for server in "${servers[@]}"; do
  echo "== $server"
  port=$(free_port)
  "start_$server" "$port"
  wait_port "$port" "$server"

  start_relay "$server" --upstream-http2
  results=()
  if ! results+=("$(python3 tests/interop/load.py sequential --port "$relay_port" --count "${INTEROP_SEQUENTIAL:-20000}")"); then
    failed=1
  fi
  if ! results+=("$(python3 tests/interop/load.py held --port "$relay_port" --streams 2000 --records 20 --interval-us 100000)"); then
    failed=1
  fi
  results+=("$(memory_line "$relay_pid" "HTTP/2 upstream")")
  printf '%s\n' "${results[@]}"
  if grep -q "too_many_internal_resets\|locally-reset streams reached limit" "$work/keyrelay-$server.log"; then
    echo "FAIL: keyrelay tore an HTTP/2 connection down for its own resets ($server)"
    failed=1
  fi
  if grep -q " ERROR \|level=ERROR" "$work/keyrelay-$server.log"; then
    echo "keyrelay logged errors ($server):"
    grep " ERROR \|level=ERROR" "$work/keyrelay-$server.log" | head -5
  fi
  if [ "$failed" -ne 0 ]; then
    echo "keyrelay's warnings ($server), for the failures above:"
    grep "WARN" "$work/keyrelay-$server.log" | tail -10 || true
  fi
  summary+=("$server: ${results[*]}")
  kill "$relay_pid" 2>/dev/null || true

  # The same held streams over HTTP/1.1 to the same server, for the memory
  # comparison in the README, and with upstream_http = "auto", which must
  # follow nginx's ALPN choice (h2; nginx offers both).
  if [ "$server" = nginx ]; then
    start_relay "$server-http1"
    expect_protocol HTTP/1.1 "the default"
    if ! h1=$(python3 tests/interop/load.py held --port "$relay_port" --streams 2000 --records 20 --interval-us 100000); then
      failed=1
    fi
    summary+=("$server over HTTP/1.1: $h1 $(memory_line "$relay_pid" "HTTP/1.1 upstream")")
    kill "$relay_pid" 2>/dev/null || true

    start_relay "$server-auto" --upstream-http auto
    expect_protocol HTTP/2.0 "upstream_http = auto"
    if ! auto=$(python3 tests/interop/load.py held --port "$relay_port" --streams 2000 --records 20 --interval-us 100000); then
      failed=1
    fi
    summary+=("$server with upstream_http = auto: $auto $(memory_line "$relay_pid" "ALPN chose h2")")
    kill "$relay_pid" 2>/dev/null || true
  fi
done

echo "== summary"
printf '  %s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
  echo "interop: FAILED"
  exit 1
fi
echo "interop: every server passed"
