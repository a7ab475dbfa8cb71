"""Shared token budgets across keyrelay replicas, against a real redis-server.

Usage: shared_budget.py KEYRELAY_BINARY REDIS_SERVER

Starts redis-server on a free loopback port, a mock model upstream that
demands the key and answers every chat completion with 30 prompt + 20
completion tokens (as the last SSE event), and keyrelay processes with
`--usage-store redis://127.0.0.1:PORT/3 --token-budget 100/day`. Each step
prints what it proves; the first failure exits non-zero. Standard library
only, every wait bounded.
"""

import http.client
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

KEY = "shared-budget-test-key-" + os.urandom(6).hex()
BUDGET = "100/day"
EVENT_TOKENS = 50  # 30 prompt + 20 completion per response
STEP = 10.0  # seconds any one wait may take

SSE = (
    'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
    'data: {"choices":[],"usage":{"prompt_tokens":30,"completion_tokens":20}}\n\n'
    "data: [DONE]\n\n"
).encode()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Upstream(http.server.BaseHTTPRequestHandler):
    """The model: requires the key keyrelay injects, counts what arrives."""

    protocol_version = "HTTP/1.1"
    received = 0
    lock = threading.Lock()
    # When set, answers wait for it: requests in flight at once.
    gate = None

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.headers.get("authorization") != f"Api-Key {KEY}":
            self.send_response(401)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        with Upstream.lock:
            Upstream.received += 1
        if Upstream.gate is not None:
            Upstream.gate.wait(STEP)
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("content-length", str(len(SSE)))
        self.end_headers()
        self.wfile.write(SSE)

    def log_message(self, *args):
        pass


def wait_for(what, probe):
    deadline = time.monotonic() + STEP
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.05)
    sys.exit(f"FAIL: timed out waiting for {what}")


class Relay:
    """A keyrelay process with its admin listener."""

    def __init__(self, binary, upstream_port, redis_port, policy="allow", db=3, budget=BUDGET):
        self.log_path = f"/tmp/keyrelay-redis-test-{os.getpid()}-{id(self)}.log"
        self.log = open(self.log_path, "w+")
        env = {"PATH": os.environ.get("PATH", ""), "BASETEN_API_KEY": KEY}
        self.process = subprocess.Popen(
            [
                binary,
                "--listen", "127.0.0.1:0",
                "--admin-listen", "127.0.0.1:0",
                "--upstream", f"http://127.0.0.1:{upstream_port}",
                "--warm-connections", "0",
                "--usage-store", f"redis://127.0.0.1:{redis_port}/{db}",
                "--usage-store-unavailable", policy,
                "--token-budget", budget,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        line = wait_for("keyrelay ready", lambda: self.find(r"keyrelay ready.*"))
        self.port = int(re.search(r"listen=127\.0\.0\.1:(\d+)", line).group(1))
        self.admin = int(re.search(r"admin=127\.0\.0\.1:(\d+)", line).group(1))

    def find(self, pattern):
        self.log.flush()
        with open(self.log_path) as log:
            match = re.search(pattern, log.read())
        return match and match.group(0)

    def chat(self, max_tokens=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=STEP)
        request = {"model": "m", "stream": True, "messages": []}
        if max_tokens is not None:
            request["max_tokens"] = max_tokens
        body = json.dumps(request)
        conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response.status, response.getheader("retry-after"), data

    def admin_get(self, path):
        conn = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=STEP)
        conn.request("GET", path)
        data = conn.getresponse().read().decode()
        conn.close()
        return data

    def metric(self, name):
        for line in self.admin_get("/metrics").splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return None

    def spent(self):
        return json.loads(self.admin_get("/usage"))["budgets"][0]["spent"]

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=STEP)
        self.log.close()
        os.unlink(self.log_path)


def ok(message):
    print(f"ok: {message}", flush=True)


def main():
    binary, redis_binary = sys.argv[1], sys.argv[2]
    redis_port = free_port()
    redis = subprocess.Popen(
        # --timeout 1: Redis closes idle connections, as a server or a NAT
        # may; keyrelay must notice rather than fail the next request.
        [redis_binary, "--port", str(redis_port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--timeout", "1"],
        stdout=subprocess.DEVNULL,
    )
    relays = []
    try:
        wait_for("redis-server", lambda: _connects(redis_port))
        upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
        threading.Thread(target=upstream.serve_forever, daemon=True).start()
        up = upstream.server_address[1]

        a, b = Relay(binary, up, redis_port), Relay(binary, up, redis_port)
        relays += [a, b]

        # 1. Each replica spends half of the one budget.
        for relay in (a, b):
            status, _, _ = relay.chat()
            assert status == 200, f"a chat within the budget got {status}"
        wait_for("both charges in Redis", lambda: a.spent() == 2 * EVENT_TOKENS)
        assert b.spent() == 2 * EVENT_TOKENS, b.admin_get("/usage")
        ok(f"two replicas charged one budget: both report {a.spent()} of {BUDGET}")

        # 2. Either replica now refuses, before anything goes upstream, even
        # after Redis has closed their idle connections.
        time.sleep(2.5)
        before = Upstream.received
        for name, relay in (("A", a), ("B", b)):
            status, retry_after, body = relay.chat()
            assert status == 429, f"replica {name}: {status} {body!r}"
            assert json.loads(body)["type"] == "token_budget_exhausted", body
            assert retry_after and int(retry_after) > 0, retry_after
        assert Upstream.received == before, "a refused request reached the upstream"
        assert a.metric("keyrelay_usage_store_errors_total") == 0, "a closed idle connection is not an outage"
        ok("a request over the shared budget is refused by either replica (429, Retry-After), nothing forwarded, "
           "also after Redis closed the idle connections")

        # 2b. Concurrent requests through both replicas hold reservations in
        # the shared store: together they cannot spend past the budget.
        # Each reserves 40 (max_tokens) + its body's bytes / 4 and spends 50.
        c, d = Relay(binary, up, redis_port, db=4, budget="300/day"), Relay(binary, up, redis_port, db=4, budget="300/day")
        relays += [c, d]
        before = Upstream.received
        Upstream.gate = threading.Event()
        statuses = []
        def one(relay):
            status, _, _ = relay.chat(max_tokens=40)
            with Upstream.lock:
                statuses.append(status)
        threads = [threading.Thread(target=one, args=(relay,)) for relay in (c, d) * 5]
        for thread in threads:
            thread.start()
        wait_for("every request admitted or refused",
                 lambda: (Upstream.received - before) + statuses.count(429) == len(threads))
        admitted = Upstream.received - before
        Upstream.gate.set()
        for thread in threads:
            thread.join(STEP)
        Upstream.gate = None
        assert statuses.count(200) == admitted, statuses
        wait_for("the settlements in Redis", lambda: c.spent() == admitted * EVENT_TOKENS)
        total = c.spent()
        reservation = 40 + len(json.dumps({"model": "m", "stream": True, "messages": [], "max_tokens": 40})) // 4
        assert admitted < len(threads), f"all {admitted} admitted: no reservation held"
        assert total <= 300 + reservation, f"{total} spent of 300/day"
        ok(f"10 concurrent requests through two replicas, 300/day shared: {admitted} admitted, "
           f"{total} spent (at most one reservation, {reservation}, over)")

        # 3. Redis goes away: "allow" serves unmetered, logs once, counts it.
        redis.terminate()
        redis.wait(timeout=STEP)
        deny = Relay(binary, up, redis_port, policy="deny")
        relays.append(deny)
        before = Upstream.received
        for _ in range(2):
            status, _, body = a.chat()
            assert status == 200, f"allow policy with Redis down: {status} {body!r}"
        assert Upstream.received == before + 2
        wait_for("the unavailable line", lambda: a.find("usage_store: Redis is unavailable"))
        lines = a.find(r"(?s)usage_store: Redis is unavailable.*usage_store: Redis is unavailable")
        assert not lines, "the outage is logged once, not per request"
        errors = a.metric("keyrelay_usage_store_errors_total")
        assert errors and errors >= 2, f"usage_store_errors_total = {errors}"
        ok(f"with Redis down, usage_store_unavailable=allow serves (logged once, {errors:.0f} errors counted)")

        # 4. ...and "deny" refuses with 503, forwarding nothing.
        before = Upstream.received
        status, _, body = deny.chat()
        assert status == 503, f"deny policy with Redis down: {status} {body!r}"
        assert json.loads(body)["type"] == "usage_store_unavailable", body
        assert Upstream.received == before
        ok("with Redis down, usage_store_unavailable=deny answers 503 usage_store_unavailable, nothing forwarded")
    finally:
        for relay in relays:
            relay.stop()
        if redis.poll() is None:
            redis.terminate()
            redis.wait(timeout=STEP)


def _connects(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
    print("shared budget: all cases passed")
