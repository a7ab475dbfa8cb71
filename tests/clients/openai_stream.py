"""Calls a chat completion with the official `openai` SDK, for tests/it/sdk_openai.rs.

Usage: openai_stream.py BASE_URL stream|once

The SDK gets a placeholder key ("unused"), as keyrelay's README shows: keyrelay
must replace it with the real one. Retries are off, so a failure shows at once
(as a traceback and exit status 1). Prints `ready` once the SDK is loaded,
before calling.

stream: every chunk is printed as one JSON line, flushed, the moment the SDK
        yields it ({"content": ..., "finish_reason": ...}), then `end`. The
        test sends the next event only after reading this line.
once:   a non-streaming call; prints the answer as one JSON line
        ({"content": ..., "finish_reason": ..., "total_tokens": ...}).
"""

import json
import sys

from openai import OpenAI

MODEL = "kr-test-model"
MESSAGES = [{"role": "user", "content": "What is the Mistral wind?"}]


def emit(value) -> None:
    print(json.dumps(value), flush=True)


def main() -> int:
    base_url, mode = sys.argv[1], sys.argv[2]
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30)
    completions = client.chat.completions  # loads the SDK's lazy modules now
    print("ready", flush=True)
    if mode == "stream":
        stream = completions.create(model=MODEL, messages=MESSAGES, stream=True)
        for chunk in stream:
            choice = chunk.choices[0]
            emit({"content": choice.delta.content, "finish_reason": choice.finish_reason})
        print("end", flush=True)
    elif mode == "once":
        completion = completions.create(model=MODEL, messages=MESSAGES)
        choice = completion.choices[0]
        emit(
            {
                "content": choice.message.content,
                "finish_reason": choice.finish_reason,
                "total_tokens": completion.usage.total_tokens,
            }
        )
    else:
        sys.exit(f"unknown mode {mode!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
