#!/usr/bin/env bash
# Runs the Windows release binary under Wine: the demo streams its tokens, a
# request streams in lockstep from a Linux-side mock upstream, Ctrl-C drains,
# `listen = "unix:..."` is refused, a renamed-over key file is re-read
# (tests/windows/check.py says how each is judged). Then lints the Windows
# build and runs the library's unit tests as a Windows program under Wine.
# Called by .ci/run after deploy/dist.sh; prints a PASS or FAIL line per
# check and exits non-zero on any failure.
#
#   tests/windows/run.sh                 # dist/'s zip, or builds one if absent
#   DIST_DIR=/tmp/out tests/windows/run.sh
#
# It tests keyrelay.exe as shipped: the one in the release zip that
# deploy/dist.sh built (into a scratch directory when dist/ has none),
# installed through the Scoop manifest (deploy/scoop/fill.py). It
# installs what it lacks: Debian's wine64, and zig (for the stand-in DLL
# below) as deploy/build.sh does. Wine runs in a throwaway prefix with its
# debug output off; its first start takes about 10 s here.
#
# What Wine cannot show: Windows' own TCP stack, console and file system
# (Wine maps them onto Linux's: a rename is a Linux rename, and a file held
# open without sharing by a Windows program is not something a Linux process
# can stage), the service control manager, Defender or SmartScreen, and any
# Windows version's quirks. Debian 12's Wine (8.0) also lacks
# bcryptprimitives.dll, which Rust's standard library needs; the prefix gets
# the stand-in tests/windows/bcryptprimitives.c (see there).
set -euo pipefail
cd "$(dirname "$0")/../.."

target=x86_64-pc-windows-gnu
arm_target=aarch64-pc-windows-gnullvm
started=$SECONDS
say() { printf '== windows: %s  (+%ss)\n' "$*" "$((SECONDS - started))"; }

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
work=$(mktemp -d "${TMPDIR:-/tmp}/keyrelay-windows.XXXXXX")
export WINEPREFIX="$work/prefix" WINEDEBUG=-all
# No Mono or Gecko download prompts: keyrelay needs neither.
export WINEDLLOVERRIDES="mscoree,mshtml="
cleanup() {
  if command -v wineserver >/dev/null 2>&1 && [ -d "$WINEPREFIX" ]; then
    timeout 20 wineserver -k >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

say "tools"
if ! command -v wine >/dev/null 2>&1; then
  echo "installing wine64"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wine wine64 >/dev/null
fi
# zig, for the stand-in DLL below, as the cross builds install it.
bash deploy/build.sh --tools-only "$target"

dist=${DIST_DIR:-dist}
if [ ! -f "$dist/keyrelay-$version-$target.zip" ] || [ ! -f "$dist/keyrelay-$version-$arm_target.zip" ]; then
  say "no Windows zips in $dist/: deploy/dist.sh $target $arm_target into a scratch directory"
  dist="$work/dist"
  DIST_DIR="$dist" bash deploy/dist.sh "$target" "$arm_target"
fi
say "installing the zips in $dist/ as Scoop would, from the filled manifest"
python3 deploy/scoop/fill.py "$dist" --url-base "file://$(cd "$dist" && pwd)" --out "$work/keyrelay.json"
# The arm64 one is only unpacked and checked: Wine here runs x86_64 programs.
for arch in arm64 64bit; do
  if ! exe=$(python3 deploy/scoop/fill.py --install "$work/keyrelay.json" "$arch" "$work/scoop-$arch"); then
    echo "FAIL scoop: the manifest's $arch entry does not install its zip"
    exit 1
  fi
  echo "PASS scoop: the manifest's $arch url, hash, extract_dir and bin install $exe"
done

say "Wine prefix (first start)"
# A first wineboot now and then hangs on a busy machine (seen once in CI
# after the release builds: no progress in 180 s; the next run took 10 s):
# the wine server is stopped and the prefix made once more before failing.
booted=0
for attempt in 1 2; do
  if timeout 180 wineboot --init </dev/null >"$work/wineboot.$attempt.log" 2>&1; then
    booted=1
    break
  fi
  echo "wineboot --init did not finish within 180 s (attempt $attempt); its log:"
  tail -n 20 "$work/wineboot.$attempt.log"
  wineserver -k 2>/dev/null || true
  sleep 2
done
if [ "$booted" != 1 ]; then
  echo "FAIL wine: wineboot --init did not finish within 180 s, twice"
  exit 1
fi
system32="$WINEPREFIX/drive_c/windows/system32"
if [ ! -e "$system32/bcryptprimitives.dll" ]; then
  echo "this Wine has no bcryptprimitives.dll: installing the stand-in for ProcessPrng"
  mkdir -p "$work/shim"
  python3 -m ziglang cc -target x86_64-windows-gnu -shared -O2 \
    -o "$work/shim/bcryptprimitives.dll" tests/windows/bcryptprimitives.c -ladvapi32
  cp "$work/shim/bcryptprimitives.dll" "$system32/"
fi
printed=$(timeout 60 wine "$exe" --version </dev/null 2>"$work/version.err" | tr -d '\r') || true
if [ "$printed" != "keyrelay $version" ]; then
  tail -n 20 "$work/version.err"
  echo "FAIL start: keyrelay.exe --version printed '${printed}', expected 'keyrelay $version'"
  exit 1
fi
echo "PASS start: keyrelay.exe --version under $(wine --version 2>/dev/null)"

say "the lockstep check catches a buffering relay (no Wine)"
timeout 60 python3 tests/windows/check.py --self-test </dev/null

say "keyrelay.exe under Wine"
timeout 300 python3 tests/windows/check.py "$exe" </dev/null

# The Windows-only code (console events, lock retries, the unix: refusal)
# is compiled only for Windows: lint it there, and run the library's unit
# tests as a Windows program, so a cfg(windows) path cannot rot unseen.
say "clippy for $target (library, binary, unit tests)"
export MACOSX_DEPLOYMENT_TARGET=11.0 # as deploy/build.sh sets it, so ring is not rebuilt
timeout 900 cargo-zigbuild clippy --locked --target "$target" --lib --bins --profile test -- -D warnings
say "the library's unit tests as a Windows program, under Wine"
CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER=wine \
  timeout 900 cargo-zigbuild test --locked --target "$target" --lib </dev/null
say "done"
