#!/usr/bin/env bash
# Builds keyrelay's static release binaries, one per target, installing any
# missing tool first. Used by deploy/dist.sh (every target) and
# deploy/image.sh (the two Linux ones), so CI builds each target once.
#
#   deploy/build.sh                                   # every release target
#   deploy/build.sh aarch64-unknown-linux-musl        # just these
#   deploy/build.sh --tools-only x86_64-pc-windows-gnu  # install their tools, build nothing
#
# The binary for TARGET lands in ${CARGO_TARGET_DIR:-target}/TARGET/release/keyrelay
# (keyrelay.exe for Windows).
#
# How each target is built, on a Linux x86_64 or aarch64 machine with apt:
# - this machine's own musl target with cargo and Debian's musl-gcc, exactly as
#   the Dockerfile's build stage does;
# - every other target with cargo-zigbuild, zig (from PyPI's ziglang) being
#   the C compiler for ring and the linker. zig carries musl for static Linux
#   binaries and the libSystem stubs for macOS, so there is no SDK, no cross
#   gcc and no cmake or clang to install, and one tool covers Linux and macOS.
#   Windows (x86_64-pc-windows-gnu) too: zig carries the MinGW-w64 headers and
#   import libraries and links against the UCRT every Windows 10 has, so
#   neither Debian's gcc-mingw-w64 (537 MB installed here) nor a Windows SDK
#   is needed, and rustls' crypto provider, ring, builds its C and assembly
#   with zig cc (aws-lc-rs would want cmake and nasm). The -gnu target rather
#   than -msvc: the MSVC linker and libraries would come from Microsoft's
#   SDK, which no registry here serves. ARM64 Windows is Rust's
#   aarch64-pc-windows-gnullvm (MinGW's ABI on LLVM's runtime, which zig
#   provides); Rust has no aarch64 -gnu target.
#   All of them go into one cargo invocation: the LTO link of each target is
#   single-threaded, and building the three side by side keeps both cores
#   busy (measured here: 7m27s for the three together, 10m23s one by one).
set -euo pipefail
cd "$(dirname "$0")/.."

ALL_TARGETS=(
  x86_64-unknown-linux-musl
  aarch64-unknown-linux-musl
  aarch64-apple-darwin
  x86_64-apple-darwin
  x86_64-pc-windows-gnu
  aarch64-pc-windows-gnullvm
)
# Pinned so a release is rebuilt with the same linker; bump both together
# after checking `deploy/dist.sh` still passes.
ZIGLANG_VERSION=0.15.2
CARGO_ZIGBUILD_VERSION=0.24.1
# The oldest macOS the binaries run on: Rust's own minimum for Apple silicon,
# used for Intel too. Unset, zig 0.15 stamps its default, 13.0, into the
# Mach-O header and Macs on 11 and 12 would refuse the binary. Set for every
# zigbuild run, Linux targets included, so the build scripts that read it
# (cc, for ring) see one value and cargo does not rebuild between callers.
export MACOSX_DEPLOYMENT_TARGET=11.0

tools_only=0
if [ "${1:-}" = --tools-only ]; then
  tools_only=1
  shift
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${ALL_TARGETS[@]}")
for target in "${targets[@]}"; do
  case " ${ALL_TARGETS[*]} " in
    *" $target "*) ;;
    *) echo "build.sh: unknown target $target (known: ${ALL_TARGETS[*]})" >&2; exit 64 ;;
  esac
done

native="$(uname -m)-unknown-linux-musl"
crossed=()
for target in "${targets[@]}"; do
  [ "$target" = "$native" ] || crossed+=("$target")
done

started=$SECONDS
say() { printf '== build.sh: %s  (+%ss)\n' "$*" "$((SECONDS - started))"; }

say "tools for ${targets[*]}"
missing_targets=()
for target in "${targets[@]}"; do
  rustup target list --installed | grep -qx "$target" || missing_targets+=("$target")
done
if [ ${#missing_targets[@]} -gt 0 ]; then
  rustup target add "${missing_targets[@]}"
fi
need_apt=()
if [ ${#crossed[@]} -lt ${#targets[@]} ]; then
  command -v musl-gcc >/dev/null 2>&1 || need_apt+=(musl-tools)
fi
if [ ${#crossed[@]} -gt 0 ]; then
  command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
  python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if [ ${#crossed[@]} -gt 0 ]; then
  # cargo-zigbuild runs `python3 -m ziglang` when no zig is on PATH.
  if [ "$(python3 -m ziglang version 2>/dev/null)" != "$ZIGLANG_VERSION" ]; then
    # A throwaway build machine's Python may be "externally managed" (PEP 668).
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check \
      "ziglang==$ZIGLANG_VERSION"
  fi
  if [ "$(cargo-zigbuild --version 2>/dev/null)" != "cargo-zigbuild $CARGO_ZIGBUILD_VERSION" ]; then
    cargo install --locked --quiet cargo-zigbuild --version "$CARGO_ZIGBUILD_VERSION"
  fi
  echo "zig $(python3 -m ziglang version); $(cargo-zigbuild --version)"
fi
[ "$tools_only" = 0 ] || exit 0

if [ ${#crossed[@]} -lt ${#targets[@]} ]; then
  say "cargo build --release --locked --target $native"
  cargo build --release --locked --target "$native"
fi
if [ ${#crossed[@]} -gt 0 ]; then
  target_args=()
  for target in "${crossed[@]}"; do target_args+=(--target "$target"); done
  say "cargo zigbuild --release --locked ${target_args[*]}"
  # For the macOS targets rustc warns that xcrun cannot find an SDK; zig's own
  # libSystem stubs are what the link uses, so the warning is expected.
  cargo zigbuild --release --locked "${target_args[@]}"
fi

for target in "${targets[@]}"; do
  binary="${CARGO_TARGET_DIR:-target}/$target/release/keyrelay"
  [[ $target != *-windows-* ]] || binary+=.exe
  [ -x "$binary" ] || { echo "build.sh: no binary at $binary" >&2; exit 1; }
  printf '%-28s %9s bytes  %s\n' "$target" "$(stat -c %s "$binary")" "$binary"
done
say "done"
