#!/usr/bin/env python3
"""The mock model behind keyrelay in tests/traces/run.sh.

    UPSTREAM_KEY=KEY upstream.py

Listens on a free loopback port and prints `listening 127.0.0.1:PORT`.
Standard library only.

- POST (any path): a streamed chat completion, as OpenAI-style SSE, with
  the usage event keyrelay's usage tap reads (11 prompt, 2 completion
  tokens). It answers 401 unless keyrelay sent `Authorization: Api-Key KEY`
  (the key from the environment, not the command line `ps` shows).
  The first token comes 40 ms after the headers, so time to first token is
  visible in the span. A request with an `x-hold: ID` header stops after
  its first token until `GET /release/ID` (at most 20 s). With `x-fail: N`
  the first N attempts of a trace (by its `traceparent`'s trace id) get a
  503 instead.
- GET /seen: what each POST carried, as JSON: its `traceparent`,
  `tracestate`, whether the key was right, its `x-hold` id.
- GET /held/ID: 200 while the request with that id is held, 404 before.
"""

import http.server
import json
import os
import threading
import time

HOLD_AT_MOST = 20.0

FRAMES_BEFORE_HOLD = [
    'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n',
    'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n',
]
FRAMES_AFTER_HOLD = [
    'data: {"choices":[{"index":0,"delta":{"content":"lo"}}]}\n\n',
    'data: {"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":2,"total_tokens":13}}\n\n',
    "data: [DONE]\n\n",
]


class State:
    lock = threading.Lock()
    seen = []
    held = set()
    releases = {}
    attempts = {}

    @classmethod
    def release_of(cls, hold_id):
        with cls.lock:
            return cls.releases.setdefault(hold_id, threading.Event())


class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    key = ""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0) or 0))
        authorized = self.headers.get("authorization") == f"Api-Key {Upstream.key}"
        hold_id = self.headers.get("x-hold")
        with State.lock:
            State.seen.append(
                {
                    "path": self.path,
                    "traceparent": self.headers.get_all("traceparent") or [],
                    "tracestate": self.headers.get("tracestate"),
                    "authorized": authorized,
                    "hold": hold_id,
                }
            )
        if not authorized:
            self.answer(401, b'{"error":"wrong or missing key"}')
            return
        trace = (self.headers.get("traceparent") or "").split("-")[1:2]
        with State.lock:
            attempt = State.attempts[tuple(trace)] = State.attempts.get(tuple(trace), 0) + 1
        if attempt <= int(self.headers.get("x-fail") or 0):
            self.answer(503, b'{"error":"overloaded"}')
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        time.sleep(0.04)
        for frame in FRAMES_BEFORE_HOLD:
            self.chunk(frame)
        if hold_id:
            release = State.release_of(hold_id)
            with State.lock:
                State.held.add(hold_id)
            release.wait(HOLD_AT_MOST)
            with State.lock:
                State.held.discard(hold_id)
        for frame in FRAMES_AFTER_HOLD:
            time.sleep(0.01)
            self.chunk(frame)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def chunk(self, text):
        data = text.encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_GET(self):
        if self.path == "/seen":
            with State.lock:
                body = json.dumps(State.seen).encode()
            self.answer(200, body)
        elif self.path.startswith("/release/"):
            State.release_of(self.path[len("/release/"):]).set()
            self.answer(200, b"{}")
        elif self.path.startswith("/held/"):
            with State.lock:
                held = self.path[len("/held/"):] in State.held
            self.answer(200 if held else 404, b"{}")
        else:
            self.answer(404, b"{}")

    def answer(self, status, body):
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main():
    Upstream.key = os.environ["UPSTREAM_KEY"]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    server.daemon_threads = True
    print(f"listening 127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
