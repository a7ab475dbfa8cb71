#!/usr/bin/env python3
"""Load for tests/interop/run.sh: real traffic through keyrelay, every body checked.

Standard library only (it runs before any virtual environment exists).

  load.py sequential --port P --count N
      N requests one after another on one keep-alive connection, alternating
      GET /small (an exact body) and GET /bulk?bytes=B (B bytes of 'x'),
      through keyrelay to the mock upstream behind the server under test.
  load.py held --port P --streams S --records R --interval-us I
      S streams open at once (one connection each), each GET /stream with R
      records of 64 bytes I us apart; every stream must deliver R records,
      numbered 0..R-1 in order, each exactly 64 bytes.

Prints one line `ok KIND total=... failed=0 secs=...` or the failures, and
exits 1 if any request failed or any body was not exact.
"""

import argparse
import asyncio
import http.client
import sys
import time

SMALL = b'{"id":"bench","output":"hello from the keyrelay benchmark upstream"}\n'
RECORD = 64


def sequential(port, count):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    failures = []
    start = time.monotonic()
    for n in range(count):
        if n % 2 == 0:
            path, expected = "/small", SMALL
        else:
            size = 1024 + (n % 7) * 4096
            path, expected = f"/bulk?bytes={size}&chunk=1500", b"x" * size
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as err:
            failures.append(f"request {n} {path}: {err!r}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            continue
        if response.status != 200:
            failures.append(f"request {n} {path}: status {response.status} {body[:200]!r}")
        elif body != expected:
            failures.append(f"request {n} {path}: body of {len(body)} bytes differs")
    return count, failures, time.monotonic() - start


async def one_stream(port, records, interval_us, index):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = 0
    try:
        target = f"/stream?n={records}&interval_us={interval_us}&size={RECORD}"
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        if status != b"200":
            return f"stream {index}: status {status.decode()} {head[:200]!r}"
        if b"transfer-encoding: chunked" not in head.lower():
            return f"stream {index}: not chunked: {head!r}"
        body = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            received = len(body)
            await reader.readexactly(2)
        if len(body) != records * RECORD:
            return f"stream {index}: {len(body)} bytes, expected {records * RECORD}"
        for seq in range(records):
            record = bytes(body[seq * RECORD : (seq + 1) * RECORD])
            number = record.split(b" ", 1)[0]
            if not number.isdigit() or int(number) != seq or not record.endswith(b"\n"):
                return f"stream {index}: record {seq} is {record[:40]!r}"
        return None
    except (OSError, asyncio.IncompleteReadError, ValueError) as err:
        return f"stream {index}: {err!r} after {received} body bytes"
    finally:
        writer.close()


async def held(port, streams, records, interval_us):
    start = time.monotonic()
    # Opened in waves of 200 so the client's own connects never overflow a
    # listen queue; every stream is still open while the others run.
    tasks = []
    for index in range(streams):
        tasks.append(asyncio.create_task(one_stream(port, records, interval_us, index)))
        if index % 200 == 199:
            await asyncio.sleep(0.02)
    results = await asyncio.gather(*tasks)
    return streams, [r for r in results if r], time.monotonic() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["sequential", "held"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--records", type=int, default=20)
    parser.add_argument("--interval-us", type=int, default=100000)
    args = parser.parse_args()
    if args.kind == "sequential":
        total, failures, secs = sequential(args.port, args.count)
    else:
        total, failures, secs = asyncio.run(
            held(args.port, args.streams, args.records, args.interval_us)
        )
    if failures:
        print(f"FAILED {args.kind} total={total} failed={len(failures)} secs={secs:.1f}")
        for failure in failures[:20]:
            print("  " + failure)
        sys.exit(1)
    print(f"ok {args.kind} total={total} failed=0 secs={secs:.1f}")


if __name__ == "__main__":
    main()
