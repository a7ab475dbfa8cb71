#!/usr/bin/env python3
"""Builds, once, the virtual environment the integration tests run their
Python clients and servers in, and prints its interpreter's path.

    python3 tests/clients/test_venv.py VENV_DIR REQUIREMENTS_FILE

`cargo test` calls this (tests/it/support/python.rs) the first time a test needs
Python, so a fresh machine with only the Rust toolchain and python3 passes the
README's test command: nothing is installed into the user's Python.

- Every test binary, and every test thread in it, may call this at once: an
  exclusive lock on VENV_DIR.lock makes one of them build while the others
  wait, then all reuse the result.
- The environment is reused while the requirements file and the interpreter
  are unchanged (a stamp file records both) and rebuilt from scratch when
  either changes, so an edited pin never leaves a stale package behind.
- When it cannot be built, the message names the missing piece and the
  command that fixes it, and the exit status is non-zero. Nothing is skipped.

Progress goes to stderr; stdout carries only the interpreter's path.
"""

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys

STAMP = "keyrelay-requirements.sha256"
# A generous bound: the first install downloads about 15 MB of wheels.
PIP_TIMEOUT_SECONDS = 900
OVERRIDE = "KEYRELAY_TEST_PYTHON"


def fail(message):
    sys.stderr.write(f"\ntests/clients/test_venv.py: {message}\n")
    sys.stderr.write(
        f"(Or set {OVERRIDE}=/path/to/python3 for an interpreter that already "
        "has the packages in tests/requirements.txt.)\n"
    )
    sys.exit(1)


def tail(output, lines=25):
    return "\n".join(output.strip().splitlines()[-lines:])


def interpreter_in(venv_dir):
    return os.path.join(venv_dir, "bin", "python3")


def stamp_of(requirements):
    digest = hashlib.sha256()
    with open(requirements, "rb") as f:
        digest.update(f.read())
    # A new interpreter (an upgraded python3) needs a new environment.
    digest.update(sys.version.encode())
    digest.update(os.path.realpath(sys.executable).encode())
    return digest.hexdigest()


def is_current(venv_dir, stamp):
    try:
        with open(os.path.join(venv_dir, STAMP)) as f:
            recorded = f.read().strip()
    except OSError:
        return False
    return recorded == stamp and os.access(interpreter_in(venv_dir), os.X_OK)


def build(venv_dir, requirements, stamp):
    sys.stderr.write(
        f"keyrelay tests: building the Python test environment in {venv_dir}\n"
        f"  from {requirements} (first run only; downloads about 15 MB, "
        "usually under a minute)\n"
    )
    shutil.rmtree(venv_dir, ignore_errors=True)
    made = subprocess.run(
        [sys.executable, "-m", "venv", venv_dir],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        shutil.rmtree(venv_dir, ignore_errors=True)
        fail(
            f"`{sys.executable} -m venv` failed:\n{tail(made.stdout + made.stderr)}\n"
            "The tests need Python's venv module with ensurepip. On Debian or "
            "Ubuntu: apt-get install python3-venv"
        )
    python = interpreter_in(venv_dir)
    try:
        installed = subprocess.run(
            [
                python, "-m", "pip", "install",
                "--disable-pip-version-check", "--no-input", "--quiet",
                "-r", requirements,
            ],
            capture_output=True,
            text=True,
            timeout=PIP_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired:
        shutil.rmtree(venv_dir, ignore_errors=True)
        fail(f"pip did not finish installing {requirements} in {PIP_TIMEOUT_SECONDS} s.")
    if installed.returncode != 0:
        shutil.rmtree(venv_dir, ignore_errors=True)
        fail(
            f"pip could not install {requirements}:\n"
            f"{tail(installed.stdout + installed.stderr)}\n"
            "pip needs to reach the Python package index (or the mirror named by "
            "PIP_INDEX_URL). Once it can, run `cargo test` again."
        )
    # Written last and atomically: an interrupted build is never taken as done.
    partial = os.path.join(venv_dir, STAMP + ".partial")
    with open(partial, "w") as f:
        f.write(stamp + "\n")
    os.replace(partial, os.path.join(venv_dir, STAMP))
    sys.stderr.write("keyrelay tests: Python test environment ready\n")


def main():
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} VENV_DIR REQUIREMENTS_FILE")
    venv_dir, requirements = (os.path.abspath(p) for p in sys.argv[1:])
    os.makedirs(os.path.dirname(venv_dir), exist_ok=True)
    stamp = stamp_of(requirements)
    with open(venv_dir + ".lock", "w") as lock:
        # Blocks while another test binary or thread builds; the lock is
        # released when this process exits, however it exits.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_current(venv_dir, stamp):
            build(venv_dir, requirements, stamp)
    print(interpreter_in(venv_dir))


if __name__ == "__main__":
    main()
