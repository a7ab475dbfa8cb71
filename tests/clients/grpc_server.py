"""A gRPC upstream over TLS for tests/it/grpc.rs, built on `grpcio` without stubs.

Usage: grpc_server.py CERT_DER KEY_DER EXPECTED_AUTH

Serves one server-streaming method, /demo.Tokens/Stream, on raw bytes, with
the certificate (DER) and PKCS#8 key (DER) the test generated. Listens on
127.0.0.1 with an OS-chosen port and prints `port N`.

A call must carry exactly one `baseten-authorization` metadata entry equal to
EXPECTED_AUTH, and nothing containing the client's placeholder "unused";
otherwise it prints `rejected` and aborts with UNAUTHENTICATED before sending
anything. An accepted call prints `call REQUEST`. The request says what to do:

  stream N              send `token 0` .. `token N-1`, then end with OK
  abort-after N CODE    send N tokens, then abort with status CODE

Before each token the server waits for a line on its stdin, so the test
decides when each message leaves. Trailing metadata `x-tokens-sent: N` is set
in both cases.
"""

import base64
import ssl
import sys
import textwrap
from concurrent import futures

import grpc


def pem_key(der: bytes) -> bytes:
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n".encode()


def main() -> None:
    cert_path, key_path, expected = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(cert_path, "rb") as f:
        cert = ssl.DER_cert_to_PEM_cert(f.read()).encode()
    with open(key_path, "rb") as f:
        key = pem_key(f.read())

    def stream(request: bytes, context):
        metadata = context.invocation_metadata()
        auth = [value for key, value in metadata if key == "baseten-authorization"]
        placeholder = any("unused" in str(value) for _, value in metadata)
        if auth != [expected] or placeholder:
            print("rejected", flush=True)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing baseten-authorization")
        print("call", request.decode(), flush=True)
        command = request.decode().split()
        count = int(command[1])
        for k in range(count):
            if not sys.stdin.readline():
                context.abort(grpc.StatusCode.CANCELLED, "the test closed the server's stdin")
            yield f"token {k}".encode()
        context.set_trailing_metadata((("x-tokens-sent", str(count)),))
        if command[0] == "abort-after":
            context.abort(getattr(grpc.StatusCode, command[2]), "stopped by the test")

    handler = grpc.method_handlers_generic_handler(
        "demo.Tokens", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler])
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    server.start()
    print("port", port, flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
