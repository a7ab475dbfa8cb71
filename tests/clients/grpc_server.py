"""A gRPC upstream over TLS for tests/it/grpc.rs, built on `grpcio` without stubs.

Usage: grpc_server.py CERT_DER KEY_DER EXPECTED_AUTH
                      [--require NAME=VALUE]... [--absent NAME]...

Serves two methods on raw bytes with the certificate (DER) and PKCS#8 key
(DER) the test generated: server-streaming /demo.Tokens/Stream and unary
/demo.Tokens/Echo. Listens on 127.0.0.1 with an OS-chosen port and prints
`port N`.

Every call is checked before anything is sent, in this order:

- exactly one `baseten-authorization` entry equal to EXPECTED_AUTH, and no
  entry containing the client's placeholder "unused"; otherwise
  UNAUTHENTICATED "wrong or missing baseten-authorization";
- for each `--require NAME=VALUE` (what the Baseten gRPC shortcut adds,
  e.g. `baseten-model-id=model-abc123`): exactly one NAME entry, equal to
  VALUE; otherwise INVALID_ARGUMENT "wrong or missing NAME";
- for each `--absent NAME`: no NAME entry; otherwise INVALID_ARGUMENT
  "unexpected NAME".

A refused call prints `rejected DETAILS` (the status details) and is aborted
with that status, a "trailers-only" response. An accepted Stream call prints
`call REQUEST`, an accepted Echo call `echo REQUEST`.

Echo replies `echo REQUEST` with trailing metadata `x-echo-bytes: LEN` (the
request's length). A Stream request says what to do:

  stream N              send `token 0` .. `token N-1`, then end with OK
  abort-after N CODE    send N tokens, then abort with status CODE
  burst N               send N tokens at once, then end with OK
  burst N together K    as burst, but first wait until K burst calls have
                        arrived (counted over the server's life), so K calls
                        are provably open at once; after 15 s without them,
                        abort with DEADLINE_EXCEEDED

For `stream` and `abort-after` the server waits for a line on its stdin
before each token, so the test decides when each message leaves. Trailing
metadata `x-tokens-sent: N` is set in every case. The worker pool has room
for 256 calls in flight (the sync server runs each call on a thread).
"""

import argparse
import base64
import ssl
import sys
import textwrap
import threading
from concurrent import futures

import grpc

from grpc_args import name_value

# Calls the server runs at once: each in-flight call holds a worker thread.
MAX_WORKERS = 256
# How long a `burst ... together K` call waits for the others.
TOGETHER_TIMEOUT_SECONDS = 15


def pem_key(der: bytes) -> bytes:
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n".encode()


_PRINT_LOCK = threading.Lock()


def say(*words) -> None:
    """Prints one line; calls run on many threads, and `print` may interleave them."""
    line = " ".join(str(word) for word in words) + "\n"
    with _PRINT_LOCK:
        sys.stdout.write(line)
        sys.stdout.flush()


def parse_args():
    parser = argparse.ArgumentParser(description="gRPC test upstream")
    parser.add_argument("cert")
    parser.add_argument("key")
    parser.add_argument("expected_auth")
    parser.add_argument("--require", type=name_value, action="append", default=[])
    parser.add_argument("--absent", type=str.lower, action="append", default=[])
    return parser.parse_args()


class Together:
    """Counts burst calls; `wait(k)` returns once k have arrived, or False."""

    def __init__(self):
        self.arrived = 0
        self.cond = threading.Condition()

    def wait(self, k: int):
        with self.cond:
            self.arrived += 1
            self.cond.notify_all()
            ok = self.cond.wait_for(lambda: self.arrived >= k, TOGETHER_TIMEOUT_SECONDS)
            return ok, self.arrived


def main() -> None:
    args = parse_args()
    with open(args.cert, "rb") as f:
        cert = ssl.DER_cert_to_PEM_cert(f.read()).encode()
    with open(args.key, "rb") as f:
        key = pem_key(f.read())
    together = Together()

    def refusal(metadata):
        """The (code, details) a call's metadata earns, or None to accept it."""

        def values(name):
            return [value for key, value in metadata if key == name]

        placeholder = any("unused" in str(value) for _, value in metadata)
        if values("baseten-authorization") != [args.expected_auth] or placeholder:
            return grpc.StatusCode.UNAUTHENTICATED, "wrong or missing baseten-authorization"
        for name, expected in args.require:
            if values(name) != [expected]:
                return grpc.StatusCode.INVALID_ARGUMENT, f"wrong or missing {name}"
        for name in args.absent:
            if values(name):
                return grpc.StatusCode.INVALID_ARGUMENT, f"unexpected {name}"
        return None

    def check(context):
        refused = refusal(context.invocation_metadata())
        if refused is not None:
            code, details = refused
            say("rejected", details)
            context.abort(code, details)

    def stream(request: bytes, context):
        check(context)
        say("call", request.decode())
        command = request.decode().split()
        count = int(command[1])
        if command[0] == "burst":
            if len(command) == 4 and command[2] == "together":
                ok, arrived = together.wait(int(command[3]))
                if not ok:
                    context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"only {arrived} of {command[3]} calls arrived together",
                    )
            for k in range(count):
                yield f"token {k}".encode()
        else:
            for k in range(count):
                if not sys.stdin.readline():
                    context.abort(grpc.StatusCode.CANCELLED, "the test closed the server's stdin")
                yield f"token {k}".encode()
        context.set_trailing_metadata((("x-tokens-sent", str(count)),))
        if command[0] == "abort-after":
            context.abort(getattr(grpc.StatusCode, command[2]), "stopped by the test")

    def echo(request: bytes, context):
        check(context)
        say("echo", request.decode())
        context.set_trailing_metadata((("x-echo-bytes", str(len(request))),))
        return b"echo " + request

    handler = grpc.method_handlers_generic_handler(
        "demo.Tokens",
        {
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=MAX_WORKERS),
        handlers=[handler],
        maximum_concurrent_rpcs=MAX_WORKERS,
    )
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    server.start()
    say("port", port)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
