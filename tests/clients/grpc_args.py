"""Command-line pieces shared by grpc_client.py and grpc_server.py."""

import argparse


def name_value(text: str):
    """A `NAME=VALUE` argument (metadata), the name lowercased as gRPC sends it."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name.lower(), value
