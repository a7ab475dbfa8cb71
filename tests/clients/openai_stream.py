"""Calls a chat completion with the official `openai` SDK, for tests/it/sdk_openai.rs.

Usage: openai_stream.py BASE_URL stream|once [--max-retries N] [--raw]

The SDK gets a placeholder key ("unused"), as keyrelay's README shows: keyrelay
must replace it with the real one. Prints `ready` once the SDK is loaded,
before calling.

stream: every chunk is printed as one JSON line, flushed, the moment the SDK
        yields it ({"content": ..., "finish_reason": ...}), then `end`. The
        test sends the next event only after reading this line.
once:   a non-streaming call; prints the answer as one JSON line
        ({"content": ..., "finish_reason": ..., "total_tokens": ...}).

--max-retries N  the SDK's own retries (default 0, so a failure shows at once,
                 as a traceback and exit status 1).
--raw            calls through `with_raw_response` and, before the answer,
                 prints one JSON line {"retries_taken": ..., "server_timing": ...}:
                 how often the SDK itself retried, and the response's
                 Server-Timing header (null when absent).
"""

import argparse
import json
import sys

from openai import OpenAI

MODEL = "kr-test-model"
MESSAGES = [{"role": "user", "content": "What is the Mistral wind?"}]


def emit(value) -> None:
    print(json.dumps(value), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("base_url")
    parser.add_argument("mode", choices=["stream", "once"])
    parser.add_argument("--max-retries", type=int, default=0)
    parser.add_argument("--raw", action="store_true")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="unused", max_retries=args.max_retries, timeout=30)
    completions = client.chat.completions  # loads the SDK's lazy modules now
    create = completions.with_raw_response.create if args.raw else completions.create
    print("ready", flush=True)

    def answer(result):
        if not args.raw:
            return result
        emit({"retries_taken": result.retries_taken, "server_timing": result.headers.get("server-timing")})
        return result.parse()

    if args.mode == "stream":
        stream = answer(create(model=MODEL, messages=MESSAGES, stream=True))
        for chunk in stream:
            choice = chunk.choices[0]
            emit({"content": choice.delta.content, "finish_reason": choice.finish_reason})
        print("end", flush=True)
    else:
        completion = answer(create(model=MODEL, messages=MESSAGES))
        choice = completion.choices[0]
        emit(
            {
                "content": choice.message.content,
                "finish_reason": choice.finish_reason,
                "total_tokens": completion.usage.total_tokens,
            }
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
