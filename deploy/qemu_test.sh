#!/usr/bin/env bash
# Runs the integration tests that start the keyrelay binary against another
# architecture's static release build, under qemu-user: by default the
# aarch64 musl binary, on an x86_64 machine. The tests themselves are the
# host's (tests/support's binary() runs KEYRELAY_TEST_RUNNER
# KEYRELAY_TEST_BINARY), so what is checked is the shipped binary: its
# demo, streaming, signals, Unix sockets and file watching on that CPU.
#
#   deploy/qemu_test.sh                               # aarch64-unknown-linux-musl
#   deploy/qemu_test.sh x86_64-unknown-linux-musl     # from an aarch64 machine
#
# Installs qemu-user-static when missing, and builds the binary with
# deploy/build.sh when it is not there yet (deploy/dist.sh or deploy/image.sh
# leave it behind). qemu-user runs the binary directly: no binfmt_misc
# registration, which would be global to the kernel.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=${1:-aarch64-unknown-linux-musl}
# The test modules (tests/it/) whose tests start the binary, less backpressure (it
# reads the child's peak memory from /proc, which under qemu is the
# emulator's): the demo (streams a prediction and runs the curl commands it
# prints), secrets (traffic at RUST_LOG=trace, output scanned for the key),
# config errors (exit 64, every problem named), key rotation (file watching,
# SIGHUP), Unix sockets, completions and the man page.
TESTS=(demo secrets config_errors key_rotation unix_socket completions_and_man)

arch=${TARGET%%-*}
qemu="qemu-$arch-static"
started=$SECONDS
if [ "$arch" = "$(uname -m)" ]; then
  echo "qemu_test.sh: $TARGET is this machine's own architecture; nothing to emulate" >&2
  exit 64
fi
if ! command -v "$qemu" >/dev/null 2>&1; then
  echo "installing qemu-user-static"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static >/dev/null
fi
binary="${CARGO_TARGET_DIR:-target}/$TARGET/release/keyrelay"
[ -x "$binary" ] || bash deploy/build.sh "$TARGET"
binary=$(realpath "$binary")

# A wrong path would quietly test the host's own build: check the header.
PYTHONDONTWRITEBYTECODE=1 python3 - "$binary" "$TARGET" <<'PY'
import sys
sys.path.insert(0, "deploy")
from dist_check import expected_platform
from image_check import binary_platform
path, target = sys.argv[1:]
found = binary_platform(open(path, "rb").read(), path)
want = expected_platform(target)
if found[:2] != want or not found[2]:
    sys.exit(f"qemu_test.sh: {path} is {found}, expected a static {want} binary")
PY
echo "$($qemu --version | head -n 1); $("$qemu" "$binary" --version) ($TARGET)"

test_args=()
for name in "${TESTS[@]}"; do test_args+=("$name::"); done
KEYRELAY_TEST_BINARY="$binary" KEYRELAY_TEST_RUNNER="$qemu" cargo test --locked --test it -- "${test_args[@]}"
echo "== qemu_test.sh: ${TESTS[*]} passed against $TARGET under $qemu in $((SECONDS - started))s"
