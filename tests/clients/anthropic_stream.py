"""Streams a Messages API call with Anthropic's official `anthropic` SDK, for
tests/it/sdk_anthropic.rs.

Usage: anthropic_stream.py BASE_URL keyless|placeholder

keyless:     the SDK holds no key at all (no api_key, no ANTHROPIC_API_KEY,
             the Authorization header explicitly omitted), as an app behind
             keyrelay can run: keyrelay adds x-api-key.
placeholder: the SDK gets a dummy key (PLACEHOLDER below), as apps that
             insist on one do: keyrelay must replace it, never forward it.

Prints `ready` once the SDK is loaded, then each text delta as one JSON line
({"text": ...}), flushed the moment the SDK yields it (the test sends the
next event only after reading it), then the final message's
{"stop_reason": ..., "output_tokens": ..., "text": ...} and `end`.
"""

import json
import os
import sys

import anthropic

PLACEHOLDER = "sk-ant-placeholder-not-a-key"
MODEL = "claude-kr-test"


def emit(value) -> None:
    print(json.dumps(value), flush=True)


def main() -> int:
    base_url, mode = sys.argv[1], sys.argv[2]
    os.environ.pop("ANTHROPIC_API_KEY", None)
    os.environ.pop("ANTHROPIC_AUTH_TOKEN", None)
    if mode == "keyless":
        client = anthropic.Anthropic(
            base_url=base_url,
            api_key=None,
            default_headers={"Authorization": anthropic.omit},
            max_retries=0,
            timeout=30,
        )
    else:
        client = anthropic.Anthropic(base_url=base_url, api_key=PLACEHOLDER, max_retries=0, timeout=30)
    messages = client.messages  # loads the SDK's lazy modules now
    print("ready", flush=True)
    with messages.stream(
        model=MODEL,
        max_tokens=64,
        messages=[{"role": "user", "content": "What is the Mistral wind?"}],
    ) as stream:
        for text in stream.text_stream:
            emit({"text": text})
        final = stream.get_final_message()
    emit(
        {
            "stop_reason": final.stop_reason,
            "output_tokens": final.usage.output_tokens,
            "text": "".join(block.text for block in final.content if block.type == "text"),
        }
    )
    print("end", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
