#!/usr/bin/env python3
r"""Runs keyrelay.exe under Wine and checks what Wine can show of it.

    check.py KEYRELAY_EXE
    check.py --self-test     # the lockstep check fails through a buffering relay


tests/windows/run.sh sets up Wine (WINEPREFIX, WINEDEBUG) and calls this. Each
check prints one PASS or FAIL line; the exit status is 1 if any failed. Every
wait is bounded, and every keyrelay.exe started is ended.

  demo         `keyrelay.exe demo` streams its tokens apart in time, keeps
               serving the answer, and stops with exit 0 on Ctrl-C
  lockstep     a request through `keyrelay.exe --upstream http://127.0.0.1:PORT`
               to a Linux-side mock upstream that sends SSE event N only after
               the client has read event N-1 through keyrelay: a relay that
               held a frame back would hang here, and one that sent frames
               together would show two events in one read
  drain        Ctrl-C (Wine turns SIGINT into CTRL_C_EVENT) while a stream is
               open: keyrelay stops accepting, finishes the stream, exits 0;
               a second Ctrl-C exits at once (143)
  unix-listen  `--listen unix:...` is a config error naming the setting (64)
  key-rename   a key file replaced by a rename is re-read by the poll
  windows-path a key file named as Windows names it (C:\...), as the README's
               service commands do, is read, and a missing one is reported
               under that name
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

KEY = "win-test-key-0123456789"
# Wine's first start of a prefix can take tens of seconds; later ones about 1 s.
START_TIMEOUT = 120.0
STEP_TIMEOUT = 15.0
EVENTS = 20

failures: list[str] = []


class Failed(Exception):
    pass


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise Failed(message)


class Keyrelay:
    """keyrelay.exe under Wine, its stdout and stderr read line by line."""

    def __init__(self, exe: str, args: list[str], env: dict[str, str] | None = None):
        self.lines: dict[str, queue.Queue[str]] = {"stdout": queue.Queue(), "stderr": queue.Queue()}
        self.seen: list[str] = []
        self.proc = subprocess.Popen(
            ["wine", exe, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            text=True,
            encoding="utf-8",
            errors="replace",
            start_new_session=True,
        )
        for name in self.lines:
            threading.Thread(target=self._pump, args=(name,), daemon=True).start()

    def _pump(self, name: str) -> None:
        for line in getattr(self.proc, name):
            self.lines[name].put(line.rstrip("\n"))

    def wait_for(self, stream: str, pattern: str, timeout: float) -> tuple[re.Match[str], list[str]]:
        """The first line of `stream` matching `pattern`, and every line read until it."""
        deadline = time.monotonic() + timeout
        read = []
        while True:
            left = deadline - time.monotonic()
            expect(left > 0, f"no line matching {pattern!r} on {stream} within {timeout:.0f}s; read {read[-5:]}")
            try:
                line = self.lines[stream].get(timeout=min(left, 0.5))
            except queue.Empty:
                expect(self.proc.poll() is None, f"keyrelay.exe exited ({self.proc.returncode}) before {pattern!r}; read {read[-5:]}")
                continue
            read.append(line)
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match, read

    def ready(self) -> tuple[str, int]:
        match, _ = self.wait_for("stderr", r"keyrelay ready listen=(\S+):(\d+)", START_TIMEOUT)
        return match[1], int(match[2])

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def exit_status(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Failed(f"keyrelay.exe still running {timeout:.0f}s later") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


class LockstepUpstream:
    """A model endpoint on 127.0.0.1 that streams SSE events in lockstep.

    Event N is sent only once `acked[N - 1]` is set, which the client does
    when it has read event N-1 through keyrelay. Every connection is served
    on its own thread (keyrelay opens warm connections that carry nothing).
    """

    def __init__(self, events: int = EVENTS):
        self.events = events
        self.acked = [threading.Event() for _ in range(events)]
        self.sent_at: list[float] = []
        self.auth: list[str | None] = []
        self.problem: str | None = None
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(60)
            head = b""
            try:
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return  # a warm connection closed unused
                    head += chunk
            except OSError:
                return
            head, _, body = head.partition(b"\r\n\r\n")
            headers = {}
            for line in head.decode("latin-1").split("\r\n")[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            while len(body) < length:
                body += conn.recv(4096)
            self.auth.append(headers.get("authorization"))
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n\r\n"
            )
            for n in range(self.events):
                if n > 0 and not self.acked[n - 1].wait(STEP_TIMEOUT):
                    self.problem = f"the client never read event {n - 1}"
                    return
                event = f"data: {json.dumps({'n': n})}\n\n".encode()
                self.sent_at.append(time.monotonic())  # before: the client may read it at once
                conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
            conn.sendall(b"0\r\n\r\n")

    def close(self) -> None:
        self.server.close()


def stream_in_lockstep(
    port: int, upstream: LockstepUpstream, before_ack=None, timeout: float = STEP_TIMEOUT
) -> list[float]:
    """POSTs a streaming chat through keyrelay at `port` and reads the events,
    acknowledging each to `upstream`; returns each event's delay from send to read.
    `before_ack(n)` runs after event n is read and before it is acknowledged."""
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as client:
        client.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        received = b""
        seen = 0
        delays = []
        while seen < upstream.events:
            try:
                chunk = client.recv(65536)
            except socket.timeout:
                raise Failed(f"the stream hung after {seen} of {upstream.events} events: keyrelay held event {seen} back") from None
            expect(chunk != b"", f"keyrelay closed the stream after {seen} of {upstream.events} events")
            received += chunk
            numbers = [int(n) for n in re.findall(rb'data: \{"n": (\d+)\}\n\n', received)]
            fresh = numbers[seen:]
            expect(len(fresh) <= 1, f"events {fresh} arrived together in one read")
            if fresh:
                expect(fresh[0] == seen, f"event {fresh[0]} arrived where {seen} was due")
                delays.append(time.monotonic() - upstream.sent_at[seen])
                if before_ack:
                    before_ack(seen)
                upstream.acked[seen].set()
                seen += 1
        expect(received.startswith(b"HTTP/1.1 200"), f"status line {received[:40]!r}")
        while not received.endswith(b"0\r\n\r\n"):
            chunk = client.recv(65536)
            expect(chunk != b"", "keyrelay closed the stream before its last chunk")
            received += chunk
    expect(upstream.problem is None, f"upstream: {upstream.problem}")
    return delays


def dechunk(response: bytes) -> bytes:
    """The body of a chunked HTTP/1.1 response."""
    head, _, rest = response.partition(b"\r\n\r\n")
    expect(b"transfer-encoding: chunked" in head.lower(), f"not a chunked response: {head!r}")
    body = b""
    while True:
        size, _, rest = rest.partition(b"\r\n")
        length = int(size, 16)
        if length == 0:
            return body
        body, rest = body + rest[:length], rest[length + 2:]


def check_demo(exe: str) -> str:
    demo = Keyrelay(exe, ["demo", "--listen", "127.0.0.1:0"])
    try:
        _, output = demo.wait_for("stdout", r"Press Ctrl-C", START_TIMEOUT)
        arrivals = [float(m[1]) for line in output if (m := re.match(r"\s*\+\s*([\d.]+) ms", line))]
        summary = next((m for line in output if (m := re.match(r"\s*(\d+) frames in \d+ ms: (.*)", line))), None)
        expect(summary is not None, f"no 'N frames' line in the demo's output: {output[:12]}")
        expect(len(arrivals) == int(summary[1]) > 5, f"{len(arrivals)} token lines for {summary[1]} frames")
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
        median = statistics.median(gaps)
        # The mock model waits between tokens; a buffering relay would hand
        # them over together, 0 ms apart.
        expect(median >= 10, f"tokens arrived bunched: median gap {median:.1f} ms")
        proxy = next(m[1] for line in output if (m := re.search(r"keyrelay\s+(http://\S+)", line)))
        host, port = proxy.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=STEP_TIMEOUT) as client:
            body = b'{"prompt": "hi", "stream": true}'
            client.sendall(
                b"POST /production/predict HTTP/1.1\r\nhost: %s\r\nconnection: close\r\n"
                b"content-length: %d\r\n\r\n%s" % (f"{host}:{port}".encode(), len(body), body)
            )
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
        text = dechunk(answer).decode()
        expect(text == summary[2], f"the demo's proxy answered {text!r}, expected {summary[2]!r}")
        demo.interrupt()
        status = demo.exit_status(STEP_TIMEOUT * 2)
        expect(status == 0, f"the demo exited {status} on Ctrl-C, expected 0")
        return f"{len(arrivals)} tokens over {arrivals[-1] - arrivals[0]:.0f} ms (median gap {median:.0f} ms), answer served again, exit 0 on Ctrl-C"
    finally:
        demo.stop()


def start_proxy(exe: str, upstream: LockstepUpstream, *extra: str, env: dict[str, str] | None = None) -> tuple[Keyrelay, int]:
    proxy = Keyrelay(
        exe,
        ["--upstream", f"http://127.0.0.1:{upstream.port}", "--listen", "127.0.0.1:0", *extra],
        env={"BASETEN_API_KEY": KEY, **(env or {})},
    )
    _, port = proxy.ready()
    return proxy, port


def check_lockstep(exe: str) -> str:
    upstream = LockstepUpstream()
    proxy, port = start_proxy(exe, upstream)
    try:
        delays = stream_in_lockstep(port, upstream)
        expect(upstream.auth == [f"Api-Key {KEY}"], f"the upstream saw authorization {upstream.auth}")
        worst = max(delays) * 1e3
        return f"{EVENTS} events one read each, each relayed before the next was sent (median {statistics.median(delays) * 1e3:.1f} ms, worst {worst:.1f} ms), key injected"
    finally:
        proxy.stop()
        upstream.close()


def check_drain(exe: str) -> str:
    upstream = LockstepUpstream()
    proxy, port = start_proxy(exe, upstream)
    try:
        refused = []

        def interrupt_mid_stream(n: int) -> None:
            if n == 2:
                proxy.interrupt()
                proxy.wait_for("stderr", r"draining", STEP_TIMEOUT)
                # Each serving thread closes its listener as it sees the drain,
                # a moment after the log line.
                deadline = time.monotonic() + 5
                while not refused and time.monotonic() < deadline:
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=2).close()
                        time.sleep(0.05)
                    except OSError:
                        refused.append(True)

        stream_in_lockstep(port, upstream, before_ack=interrupt_mid_stream)
        status = proxy.exit_status(STEP_TIMEOUT)
        expect(refused == [True], "keyrelay still accepted connections 5 s into the drain")
        expect(status == 0, f"keyrelay exited {status} after draining, expected 0")
    finally:
        proxy.stop()
        upstream.close()

    upstream = LockstepUpstream()
    proxy, port = start_proxy(exe, upstream)
    try:

        def interrupt_twice(n: int) -> None:
            if n == 0:
                proxy.interrupt()
                proxy.wait_for("stderr", r"draining", STEP_TIMEOUT)
                proxy.interrupt()

        try:
            stream_in_lockstep(port, upstream, before_ack=interrupt_twice)
        except (Failed, OSError):
            pass  # the stream is cut: that is the point
        status = proxy.exit_status(STEP_TIMEOUT)
        expect(status == 143, f"a second Ctrl-C exited {status}, expected 143")
    finally:
        proxy.stop()
        upstream.close()
    return "Ctrl-C mid-stream: new connections refused, the open stream finished, exit 0; a second Ctrl-C: exit 143"


def check_unix_listen(exe: str) -> str:
    run = subprocess.run(
        ["wine", exe, "--upstream", "http://127.0.0.1:9", "--listen", "unix:/tmp/keyrelay.sock"],
        env={**os.environ, "BASETEN_API_KEY": KEY},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
    )
    expect(run.returncode == 64, f"exit {run.returncode}, expected 64; stderr {run.stderr[-300:]!r}")
    expect("listen:" in run.stderr and "not supported on Windows" in run.stderr, f"stderr {run.stderr[-300:]!r}")
    return "exit 64: " + next(line.strip() for line in run.stderr.splitlines() if "listen:" in line)


def check_key_rename(exe: str, scratch: Path) -> str:
    key_file = scratch / "key.txt"
    key_file.write_text("first-key-0123456789\n")
    upstream = LockstepUpstream(events=1)
    proxy, port = start_proxy(exe, upstream, "--key-file", str(key_file))
    try:
        stream_in_lockstep(port, upstream)
        replacement = scratch / "key.txt.new"
        replacement.write_text("second-key-0123456789\n")
        os.replace(replacement, key_file)
        proxy.wait_for("stderr", r"upstream key reloaded", STEP_TIMEOUT)
        upstream.acked = [threading.Event()]
        stream_in_lockstep(port, upstream)
        expect(
            upstream.auth == ["Api-Key first-key-0123456789", "Api-Key second-key-0123456789"],
            f"the upstream saw {upstream.auth}",
        )
        return "the key file replaced by rename: reloaded, the next request carried the new key"
    finally:
        proxy.stop()
        upstream.close()


def buffering_relay(upstream_port: int) -> int:
    """A relay on 127.0.0.1 that forwards a response only once it is whole:
    what the lockstep check must catch."""
    server = socket.create_server(("127.0.0.1", 0))

    def relay() -> None:
        client, _ = server.accept()
        with client, socket.create_connection(("127.0.0.1", upstream_port)) as upstream:
            upstream.sendall(client.recv(65536))
            upstream.settimeout(STEP_TIMEOUT)
            response = b""
            try:
                while not response.endswith(b"0\r\n\r\n"):
                    response += upstream.recv(65536)
            except OSError:
                return
            client.sendall(response)

    threading.Thread(target=relay, daemon=True).start()
    return server.getsockname()[1]


def self_test() -> int:
    """The lockstep check passes straight to the mock and fails through a
    buffering relay, without Wine."""
    upstream = LockstepUpstream(events=5)
    stream_in_lockstep(upstream.port, upstream)
    print("PASS self-test: the lockstep check passes straight to the mock upstream")
    upstream = LockstepUpstream(events=5)
    try:
        stream_in_lockstep(buffering_relay(upstream.port), upstream, timeout=2)
    except Failed as err:
        print(f"PASS self-test: through a buffering relay the lockstep check fails: {err}")
        return 0
    print("FAIL self-test: the lockstep check passed through a buffering relay")
    return 1


def check_windows_path(exe: str) -> str:
    drive_c = Path(os.environ["WINEPREFIX"]) / "drive_c"
    (drive_c / "keyrelay").mkdir(exist_ok=True)
    (drive_c / "keyrelay" / "key.txt").write_text("windows-path-key-0123456789\r\n")
    upstream = LockstepUpstream(events=1)
    proxy, port = start_proxy(exe, upstream, "--key-file", "C:\\keyrelay\\key.txt")
    try:
        stream_in_lockstep(port, upstream)
        expect(upstream.auth == ["Api-Key windows-path-key-0123456789"], f"the upstream saw {upstream.auth}")
    finally:
        proxy.stop()
        upstream.close()
    missing = "C:\\keyrelay\\missing.txt"
    run = subprocess.run(
        ["wine", exe, "--upstream", "http://127.0.0.1:9", "--key-file", missing],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
    )
    expect(run.returncode == 64 and missing in run.stderr, f"exit {run.returncode}, stderr {run.stderr[-300:]!r}")
    said = next(line.strip() for line in run.stderr.splitlines() if missing in line)
    return f"--key-file C:\\keyrelay\\key.txt (CRLF) read; a missing one: exit 64, {said}"


def main(argv: list[str]) -> int:
    if argv == ["--self-test"]:
        return self_test()
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 64
    exe = argv[0]
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"keyrelay-windows-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    checks = [
        ("demo", lambda: check_demo(exe)),
        ("lockstep", lambda: check_lockstep(exe)),
        ("drain", lambda: check_drain(exe)),
        ("unix-listen", lambda: check_unix_listen(exe)),
        ("key-rename", lambda: check_key_rename(exe, scratch)),
        ("windows-path", lambda: check_windows_path(exe)),
    ]
    for name, check in checks:
        started = time.monotonic()
        try:
            detail = check()
            print(f"PASS {name}: {detail} ({time.monotonic() - started:.1f}s)", flush=True)
        except Exception as err:  # noqa: BLE001 - any error is this check's FAIL, and the others still run
            failures.append(name)
            kind = "" if isinstance(err, Failed) else f"{type(err).__name__}: "
            print(f"FAIL {name}: {kind}{err}", flush=True)
    for path in scratch.iterdir():
        path.unlink()
    scratch.rmdir()
    passed = len(checks) - len(failures)
    print(f"windows: {passed} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
