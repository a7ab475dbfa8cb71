"""A `grpcio` client for tests/it/grpc.rs: raw-bytes calls, no stubs.

Usage: grpc_client.py TARGET REQUEST [CA_PEM]
                      [--unary] [--metadata NAME=VALUE]... [--without-placeholder]
                      [--concurrent N]

Calls /demo.Tokens/Stream (or, with --unary, /demo.Tokens/Echo) on TARGET
with REQUEST as raw bytes, sending a placeholder `authorization: Bearer
unused` (keyrelay must not forward it; --without-placeholder leaves it out,
to call the upstream directly with the right credential) and each
--metadata entry. Without CA_PEM the channel is plaintext HTTP/2 (h2c, as
apps talk to keyrelay); with it, TLS trusting that CA (to call the upstream
directly).

Prints `message TEXT` for each message the moment it arrives, then the
trailing metadata as `trailer KEY=VALUE` lines and `status CODE DETAILS`.
A non-OK status is printed the same way (exit status 0): the test checks it.

With --concurrent N, opens N calls of REQUEST (a `burst M ...` request) at
once on one channel (grpc.aio, one connection) and checks that every call
received `token 0` .. `token M-1` in order, trailing metadata
`x-tokens-sent: M` and status OK. Prints `failed I WHY` for each call that
did not (at most 10 of them), then `streams OK/N ok` and `elapsed SECONDS`
(from opening the first call to the last one's status). Each call has a
30 s deadline, so the client ends within about that.
"""

import argparse
import asyncio
import sys
import time

import grpc

from grpc_args import name_value

DEADLINE_SECONDS = 30
OPTIONS = [("grpc.enable_http_proxy", 0)]
SERIALIZE = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}


def parse_args():
    parser = argparse.ArgumentParser(description="gRPC test client")
    parser.add_argument("target")
    parser.add_argument("request")
    parser.add_argument("ca", nargs="?")
    parser.add_argument("--unary", action="store_true")
    parser.add_argument("--metadata", type=name_value, action="append", default=[])
    parser.add_argument("--without-placeholder", action="store_true")
    parser.add_argument("--concurrent", type=int, default=0)
    return parser.parse_args()


def credentials(args):
    if args.ca is None:
        return None
    with open(args.ca, "rb") as f:
        return grpc.ssl_channel_credentials(root_certificates=f.read())


def metadata(args):
    entries = [] if args.without_placeholder else [("authorization", "Bearer unused")]
    return entries + list(args.metadata)


def one_call(args) -> None:
    creds = credentials(args)
    if creds is None:
        channel = grpc.insecure_channel(args.target, options=OPTIONS)
    else:
        channel = grpc.secure_channel(args.target, creds, options=OPTIONS)
    with channel:
        request = args.request.encode()
        if args.unary:
            method = channel.unary_unary("/demo.Tokens/Echo", **SERIALIZE)
            try:
                reply, call = method.with_call(
                    request, metadata=metadata(args), timeout=DEADLINE_SECONDS
                )
                print("message", reply.decode(), flush=True)
            except grpc.RpcError as err:
                call = err  # a failed unary call's error is its call
        else:
            method = channel.unary_stream("/demo.Tokens/Stream", **SERIALIZE)
            call = method(request, metadata=metadata(args), timeout=DEADLINE_SECONDS)
            try:
                for message in call:
                    print("message", message.decode(), flush=True)
            except grpc.RpcError:
                pass  # the status is read from the call below, as for OK
        for key, value in call.trailing_metadata() or ():
            print(f"trailer {key}={value}", flush=True)
        print(f"status {call.code().name} {call.details() or ''}".rstrip(), flush=True)


async def concurrent_calls(args) -> None:
    count = int(args.request.split()[1])
    expected = [f"token {k}" for k in range(count)]
    creds = credentials(args)
    if creds is None:
        channel = grpc.aio.insecure_channel(args.target, options=OPTIONS)
    else:
        channel = grpc.aio.secure_channel(args.target, creds, options=OPTIONS)

    async def check(method) -> str:
        """Runs one call; returns why it failed, or "" if it did not."""
        call = method(args.request.encode(), metadata=metadata(args), timeout=DEADLINE_SECONDS)
        received = []
        try:
            async for message in call:
                received.append(message.decode())
        except grpc.RpcError:
            pass  # reported from the status below
        code = await call.code()
        if code != grpc.StatusCode.OK:
            return f"status {code.name} {await call.details()}"
        if received != expected:
            return f"received {len(received)} messages out of order or incomplete: {received[:5]}..."
        trailers = [(k, v) for k, v in (await call.trailing_metadata() or ())]
        if ("x-tokens-sent", str(count)) not in trailers:
            return f"trailers {trailers}"
        return ""

    async with channel:
        method = channel.unary_stream("/demo.Tokens/Stream", **SERIALIZE)
        started = time.monotonic()
        failures = await asyncio.gather(*(check(method) for _ in range(args.concurrent)))
        elapsed = time.monotonic() - started
    failed = [(i, why) for i, why in enumerate(failures) if why]
    for i, why in failed[:10]:
        print("failed", i, why, flush=True)
    print(f"streams {args.concurrent - len(failed)}/{args.concurrent} ok", flush=True)
    print(f"elapsed {elapsed:.2f}", flush=True)


def main() -> int:
    args = parse_args()
    if args.concurrent:
        asyncio.run(concurrent_calls(args))
    else:
        one_call(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
