"""A `grpcio` client for tests/it/grpc.rs: one server-streaming call, no stubs.

Usage: grpc_client.py TARGET REQUEST [CA_PEM]

Calls /demo.Tokens/Stream on TARGET with REQUEST as raw bytes, sending a
placeholder `authorization: Bearer unused` (keyrelay must not forward it).
Without CA_PEM the channel is plaintext HTTP/2 (h2c, as apps talk to
keyrelay); with it, TLS trusting that CA (to call the upstream directly).

Prints `message TEXT` for each message the moment it arrives, then the
trailing metadata as `trailer KEY=VALUE` lines and `status CODE DETAILS`.
A non-OK status is printed the same way (exit status 0): the test checks it.
"""

import sys

import grpc


def main() -> int:
    target, request = sys.argv[1], sys.argv[2]
    options = [("grpc.enable_http_proxy", 0)]
    if len(sys.argv) > 3:
        with open(sys.argv[3], "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    with channel:
        method = channel.unary_stream(
            "/demo.Tokens/Stream",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        call = method(request.encode(), metadata=[("authorization", "Bearer unused")], timeout=30)
        try:
            for message in call:
                print("message", message.decode(), flush=True)
        except grpc.RpcError:
            pass  # the status is read from the call below, as for OK
        for key, value in call.trailing_metadata() or ():
            print(f"trailer {key}={value}", flush=True)
        print(f"status {call.code().name} {call.details() or ''}".rstrip(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
