#!/usr/bin/env python3
"""Runs the README's marked snippets against a running keyrelay.

    snippets.py README ADDRESS ANSWER_FILE --python PYTHON [--node NODE] [--list]

A snippet is a fenced block (```sh, ```python or ```js) whose opening fence
comes right after the line `<!-- snippet: run -->`: the marking is explicit,
so a snippet that starts a server or needs a real model is never run by
accident, and one that is marked cannot rot. Each runs as written, with the
README's address 127.0.0.1:8080 replaced by ADDRESS (the keyrelay under
test, usually `keyrelay demo`), bounded by TIMEOUT seconds, and must exit 0
and print the model's answer (ANSWER_FILE, what the demo streamed) whole:
a snippet that mangles a multi-byte character fails here.

- sh runs under `bash -euo pipefail`; python under PYTHON (with requests
  and openai: tests/requirements.txt); js as an ES module under NODE.
- A js snippet that defines `async function NAME(output)`, as the browser
  examples do, is called with a stand-in element, and its textContent printed.

--list prints each marked snippet's line and language and runs nothing.
Exits 1 if a snippet fails, a marker is not followed by a fence, or none
is marked.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

MARKER = "<!-- snippet: run -->"
README_ADDRESS = "127.0.0.1:8080"
TIMEOUT = 60
LANGUAGES = {"sh", "python", "js"}


class Snippet:
    def __init__(self, line: int, language: str, code: str):
        self.line, self.language, self.code = line, language, code

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.language})"


def extract(readme: Path) -> list[Snippet]:
    lines = readme.read_text().splitlines()
    snippets = []
    for index, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        fence = lines[index + 1] if index + 1 < len(lines) else ""
        language = fence.removeprefix("```").strip()
        if not fence.startswith("```") or language not in LANGUAGES:
            raise SystemExit(f"snippets.py: README.md:{index + 1}: {MARKER} must come right before "
                             f"a ```sh, ```python or ```js fence, not {fence!r}")
        end = next((i for i in range(index + 2, len(lines)) if lines[i].startswith("```")), None)
        if end is None:
            raise SystemExit(f"snippets.py: README.md:{index + 2}: the fence is never closed")
        snippets.append(Snippet(index + 2, language, "\n".join(lines[index + 2:end]) + "\n"))
    if not snippets:
        raise SystemExit(f"snippets.py: no snippet in {readme} is marked {MARKER}")
    return snippets


def js_program(code: str) -> str:
    """The snippet, plus a call of each `async function NAME(output)` it defines."""
    calls = "".join(
        f'{{ const output = {{ textContent: "" }}; await {name}(output); console.log(output.textContent); }}\n'
        for name in re.findall(r"^async function (\w+)\(output\)", code, re.MULTILINE)
    )
    return code + calls


def command(snippet: Snippet, file: Path, python: str, node: str) -> list[str]:
    if snippet.language == "sh":
        return ["bash", "-euo", "pipefail", str(file)]
    if snippet.language == "python":
        return [python, str(file)]
    return [node, str(file)]


def run(snippet: Snippet, address: str, answer: str, python: str, node: str) -> str | None:
    """None if the snippet passed, else why it failed."""
    code = snippet.code.replace(README_ADDRESS, address)
    if snippet.language == "js":
        code = js_program(code)
    suffix = {"sh": ".sh", "python": ".py", "js": ".mjs"}[snippet.language]
    with tempfile.NamedTemporaryFile("w", suffix=suffix, delete=False) as file:
        file.write(code)
    try:
        done = subprocess.run(command(snippet, Path(file.name), python, node), capture_output=True,
                              timeout=TIMEOUT, env=snippet_env())
    except subprocess.TimeoutExpired:
        return f"did not finish within {TIMEOUT} s"
    finally:
        Path(file.name).unlink()
    stdout = done.stdout.decode("utf-8", "replace")
    stderr = done.stderr.decode("utf-8", "replace")
    if done.returncode != 0:
        return f"exit {done.returncode}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    if answer not in stdout:
        return f"exit 0, but it did not print the model's answer whole\n--- expected\n{answer}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    return None


def snippet_env() -> dict[str, str]:
    """The environment, less proxies: snippets talk to 127.0.0.1 only."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["NO_PROXY"] = "127.0.0.1,localhost"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("readme", type=Path)
    parser.add_argument("address", nargs="?", help="HOST:PORT of the keyrelay under test")
    parser.add_argument("answer_file", nargs="?", type=Path, help="the answer every snippet must print")
    parser.add_argument("--python", default="python3")
    parser.add_argument("--node", default="node")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    snippets = extract(args.readme)
    if args.list:
        for snippet in snippets:
            print(snippet)
        return 0
    answer = args.answer_file.read_text(encoding="utf-8")
    failed = 0
    for snippet in snippets:
        why = run(snippet, args.address, answer, args.python, args.node)
        print(f"{'ok  ' if why is None else 'FAIL'} {snippet}", flush=True)
        if why is not None:
            failed += 1
            print(why, flush=True)
    print(f"{len(snippets) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
