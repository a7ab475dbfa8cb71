"""Streams a keyrelay response with Python `requests`, as Baseten's docs show.

Usage: requests_stream.py URL JSON_BODY [CHUNK_SIZE]

Writes every chunk to stdout the moment `iter_content` yields it (flushed), so
the test driving this script can check tokens arrive one at a time. Sends a
placeholder Authorization header, like SDKs do, to prove keyrelay replaces it.
Exits 3 if the response status is not 200.
"""

import sys

import requests


def main() -> int:
    url, body = sys.argv[1], sys.argv[2]
    chunk_size = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    out = sys.stdout.buffer
    headers = {"Authorization": "Bearer placeholder-from-python", "Content-Type": "application/json"}
    with requests.Session() as session:
        with session.post(url, data=body, headers=headers, stream=True, timeout=30) as resp:
            if resp.status_code != 200:
                sys.stderr.write(f"status {resp.status_code}: {resp.text}\n")
                return 3
            for chunk in resp.iter_content(chunk_size):
                out.write(chunk)
                out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
