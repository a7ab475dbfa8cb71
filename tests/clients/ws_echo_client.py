"""A `websockets` client for tests/it/websocket_client.rs, driven by its stdin.

Usage: ws_echo_client.py URL

Connects to URL with a placeholder Authorization header (a browser sends none;
keyrelay must replace it either way) and prints `open`, or `rejected STATUS`
if the upgrade is refused. Then, for each line read on stdin, sends it as a
text message, waits for the answer and prints it. At end of stdin it closes
the connection with code 1000, reason "done", and prints `closed CODE` with
the code of the close frame the server answered with.
"""

import sys

from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect


def main() -> int:
    url = sys.argv[1]
    try:
        websocket = connect(url, additional_headers={"Authorization": "Bearer placeholder"})
    except InvalidStatus as refused:
        print("rejected", refused.response.status_code, flush=True)
        return 0
    with websocket:
        print("open", flush=True)
        for line in sys.stdin:
            websocket.send(line.rstrip("\n"))
            print(websocket.recv(timeout=30), flush=True)
        websocket.close(code=1000, reason="done")
        frame = websocket.protocol.close_rcvd
        print("closed", frame.code if frame else "none", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
