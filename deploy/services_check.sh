#!/usr/bin/env bash
# Checks keyrelay's service files, as far as a Linux machine without a
# running systemd, launchd or Homebrew can:
#
#   - deploy/systemd/ (system and user units, socket units): systemd-analyze
#     verify, with warnings counted as failures (verify exits 0 on an
#     unknown or misspelt directive); the system unit's
#     `systemd-analyze security` exposure, which must stay at most
#     MAX_EXPOSURE; its SystemCallFilter= allows every system call keyrelay
#     makes in a traced demo run (strace); keyrelay.env starts the keyrelay
#     binary as the units do;
#   - deploy/launchd/: the agent plist's structure (plistlib) and the
#     keyrelay-agent wrapper with stand-ins for `security` and keyrelay;
#   - deploy/homebrew/keyrelay.rb: `ruby -c` on the template and on the
#     formula fill.py writes from dist/SHA256SUMS (the archives deploy/dist.sh
#     built; made-up archives of the same layout when dist/ has none), whose
#     urls and sha256 are checked against the archives.
#
#   deploy/services_check.sh      # CI runs it after deploy/dist.sh
#
# Installs systemd (for systemd-analyze), strace and ruby with apt-get when missing.
# Uses target/debug/keyrelay (`cargo build` when missing) or $KEYRELAY_BINARY.
set -euo pipefail
cd "$(dirname "$0")/.."

# The system unit's exposure today is 1.1 (0 = locked down, 10 = none);
# a change that loosens it past this fails.
MAX_EXPOSURE=1.5
fail() { echo "services_check.sh: FAILED: $*" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/keyrelay-services.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

need_apt=()
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
command -v ruby >/dev/null 2>&1 || need_apt+=(ruby)
command -v strace >/dev/null 2>&1 || need_apt+=(strace)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]}"
  apt-get update -qq
  # systemd's postinst would try to talk to a running systemd; none runs here.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >"$work/apt.log" 2>&1 \
    || { cat "$work/apt.log" >&2; fail "apt-get install ${need_apt[*]}"; }
fi
binary=${KEYRELAY_BINARY:-target/debug/keyrelay}
if [ ! -x "$binary" ]; then
  echo "== cargo build (no $binary)"
  cargo build --quiet
fi
binary=$(realpath "$binary")

# Runs systemd-analyze, failing on any message: verify reports unknown keys
# and bad values as warnings and still exits 0.
analyze() {
  if ! "$@" >"$work/analyze.log" 2>&1 || [ -s "$work/analyze.log" ]; then
    cat "$work/analyze.log" >&2
    fail "$*"
  fi
}

echo "== systemd-analyze verify: the system units ($(systemd-analyze --version | head -n 1))"
# verify checks that ExecStart's program exists; the units name where the
# README installs keyrelay, so the copies checked name the binary built here.
mkdir -p "$work/system"
cp deploy/systemd/keyrelay.service deploy/systemd/keyrelay.socket "$work/system/"
sed -i "s|^ExecStart=/usr/local/bin/keyrelay|ExecStart=$binary|" "$work/system/keyrelay.service"
grep -q "^ExecStart=$binary" "$work/system/keyrelay.service" || fail "keyrelay.service's ExecStart is not /usr/local/bin/keyrelay"
# --man=no: Documentation=man:keyrelay(1) is checked with man(1) otherwise,
# and the page is installed by the archive, not here.
(cd "$work/system" && analyze systemd-analyze verify --man=no keyrelay.service keyrelay.socket)
echo "ok"

echo "== systemd-analyze --user verify: the user units"
# The user unit runs %h/.cargo/bin/keyrelay: a home of its own with the
# binary there, and the runtime directory a user manager needs.
home="$work/home"
mkdir -p "$home/.cargo/bin" "$work/runtime" "$work/user"
chmod 0700 "$work/runtime"
ln -s "$binary" "$home/.cargo/bin/keyrelay"
cp deploy/systemd/user/keyrelay.service deploy/systemd/user/keyrelay.socket "$work/user/"
(cd "$work/user" && HOME="$home" XDG_RUNTIME_DIR="$work/runtime" \
  analyze systemd-analyze --user verify --man=no keyrelay.service keyrelay.socket)
echo "ok"

echo "== systemd-analyze security: the system unit"
if systemd-analyze security --offline=yes "$work/system/keyrelay.service" >"$work/security.log" 2>&1; then
  exposure=$(sed -n 's/.*Overall exposure level for keyrelay.service: \([0-9.]*\).*/\1/p' "$work/security.log")
  [ -n "$exposure" ] || { cat "$work/security.log"; fail "no exposure level in systemd-analyze security's output"; }
  grep -v '✓' "$work/security.log"
  awk -v e="$exposure" -v max="$MAX_EXPOSURE" 'BEGIN { exit !(e <= max) }' \
    || fail "keyrelay.service's exposure is $exposure, above $MAX_EXPOSURE"
  echo "exposure $exposure (at most $MAX_EXPOSURE)"
else
  # Offline analysis came with systemd 250; without it, say so, do not fail.
  cat "$work/security.log"
  echo "systemd-analyze security --offline is not available here: exposure NOT measured"
fi

echo "== the system unit's SystemCallFilter= allows every system call keyrelay makes"
# Under strace: keyrelay demo (startup, the mock model, keyrelay relaying a
# streamed prediction and chat, two more from curl, the SIGTERM drain). A
# call the filter refuses fails with EPERM in the real service.
strace -f -qq -o "$work/strace.out" -- "$binary" demo --listen 127.0.0.1:0 >"$work/demo.out" 2>/dev/null &
strace_pid=$!
pids+=("$strace_pid")
for _ in $(seq 300); do
  grep -q "Press Ctrl-C" "$work/demo.out" && break
  kill -0 "$strace_pid" 2>/dev/null || break
  sleep 0.1
done
address=$(sed -n 's|^  keyrelay  *http://\([^ ]*\) .*|\1|p' "$work/demo.out")
demo_pid=$(pgrep -P "$strace_pid" || true)
if [ -n "$address" ] && [ -n "$demo_pid" ]; then
  curl -sS --no-buffer -X POST "http://$address/production/predict" -d '{"prompt": "hi", "stream": true}' >/dev/null
  curl -sS --no-buffer "http://$address/v1/chat/completions" -d '{"model": "m", "stream": true, "messages": []}' >/dev/null
  kill -TERM "$demo_pid"
  wait "$strace_pid" || fail "keyrelay demo under strace did not exit 0 on SIGTERM"
  python3 deploy/check_services.py syscalls deploy/systemd/keyrelay.service "$work/strace.out"
else
  # strace needs ptrace, which some containers refuse: say so, do not fail.
  head -n 5 "$work/strace.out" 2>/dev/null || true
  echo "keyrelay demo did not run under strace here: system calls NOT checked"
fi

echo "== keyrelay.env: the units' settings start keyrelay"
# As the units run it: the env file's settings, the key from a file
# (KEYRELAY_KEY_FILE); moved to a free port, with no warm connection (so
# nothing reaches for the example upstream), then stopped with SIGTERM.
install -m 0600 /dev/null "$work/api-key"
echo "kr-services-check-KEY" >"$work/api-key"
env_args=()
while IFS= read -r line; do
  case "$line" in '' | '#'*) continue ;; esac
  env_args+=("$line")
done <deploy/systemd/keyrelay.env
env -i PATH="$PATH" "${env_args[@]}" KEYRELAY_KEY_FILE="$work/api-key" \
  KEYRELAY_LISTEN=127.0.0.1:0 KEYRELAY_WARM_CONNECTIONS=0 "$binary" 2>"$work/env.log" &
pids+=($!)
for _ in $(seq 100); do
  grep -q "keyrelay ready" "$work/env.log" && break
  kill -0 "${pids[-1]}" 2>/dev/null || { cat "$work/env.log" >&2; fail "keyrelay exited with keyrelay.env's settings"; }
  sleep 0.1
done
grep -q "keyrelay ready" "$work/env.log" || { cat "$work/env.log" >&2; fail "keyrelay not ready within 10 s"; }
grep -q "kr-services-check-KEY" "$work/env.log" && fail "the key appears in keyrelay's log"
kill -TERM "${pids[-1]}"
wait "${pids[-1]}" || fail "keyrelay did not exit 0 on SIGTERM"
grep "keyrelay ready" "$work/env.log"

echo "== launchd: the agent plist and keyrelay-agent"
sh -n deploy/launchd/keyrelay-agent
python3 deploy/check_services.py plist
python3 deploy/check_services.py agent

echo "== Homebrew: the formula template and the formula filled from dist/"
ruby -c deploy/homebrew/keyrelay.rb
ruby -c deploy/homebrew/formula_facts.rb
dist=dist
targets=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl aarch64-apple-darwin x86_64-apple-darwin)
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
for target in "${targets[@]}"; do
  [ -f "$dist/keyrelay-$version-$target.tar.gz" ] || dist=""
done
if [ -z "$dist" ]; then
  # No release archives here (deploy/dist.sh has not run): archives of the
  # same layout, so fill.py and the checks still run end to end.
  echo "no archives in dist/ for $version: checking against made-up archives of the same layout"
  dist="$work/dist"
  mkdir -p "$dist"
  for target in "${targets[@]}"; do
    top="$work/stage/keyrelay-$version-$target"
    mkdir -p "$top/completions"
    printf '#!/bin/sh\necho "keyrelay %s"\n' "$version" >"$top/keyrelay"
    : >"$top/keyrelay.1"
    for file in keyrelay.bash _keyrelay keyrelay.fish; do : >"$top/completions/$file"; done
    tar -C "$work/stage" -czf "$dist/keyrelay-$version-$target.tar.gz" "keyrelay-$version-$target"
  done
  (cd "$dist" && sha256sum -- *.tar.gz >SHA256SUMS)
fi
url_base="file://$(realpath "$dist")"
python3 deploy/homebrew/fill.py "$dist" --url-base "$url_base" --out "$work/keyrelay.rb"
ruby -c "$work/keyrelay.rb"
python3 deploy/check_services.py formula "$work/keyrelay.rb" "$dist" "$url_base"

echo "== the checks themselves fail on broken files"
python3 deploy/check_services.py self-test
echo "== services_check.sh: ok"
