"""A WebSocket upstream for tests/it/websocket_client.rs, built on `websockets`.

Usage: ws_echo_server.py EXPECTED_AUTHORIZATION

Listens on 127.0.0.1 with an OS-chosen port and prints `port N`. An upgrade
request must carry exactly one Authorization header equal to
EXPECTED_AUTHORIZATION, else it is refused with 401 and the server prints
`rejected`. An accepted connection prints `accepted PATH`, then for each
message `received MESSAGE` before answering `echo: MESSAGE`, and finally
`closed CODE REASON` with the close frame the client sent.
"""

import http
import sys

from websockets.exceptions import ConnectionClosed
from websockets.sync.server import serve


def main() -> None:
    expected = sys.argv[1]

    def check_authorization(connection, request):
        if request.headers.get_all("Authorization") != [expected]:
            print("rejected", flush=True)
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "wrong or missing key\n")
        return None

    def echo(websocket):
        print("accepted", websocket.request.path, flush=True)
        while True:
            try:
                message = websocket.recv()
            except ConnectionClosed as closed:
                frame = closed.rcvd
                print("closed", frame.code if frame else "none", frame.reason if frame else "", flush=True)
                return
            print("received", message, flush=True)
            websocket.send(f"echo: {message}")

    with serve(echo, "127.0.0.1", 0, process_request=check_authorization) as server:
        print("port", server.socket.getsockname()[1], flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
