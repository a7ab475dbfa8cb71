#!/usr/bin/env bash
# Checks the two ways keyrelay is installed from source:
#
#   1. `cargo package`: the source package holds what building and testing
#      need (LICENSE, README.md, Cargo.lock, src/, tests/, config/) and none of
#      this repository's own tooling (bench scripts and reports, deploy/, CI,
#      fuzz/, Dockerfile); cargo builds it from the packed sources alone and
#      prints no warning beyond the known one (no repository address yet);
#   2. `cargo install --locked --path .`: it installs a keyrelay that runs and
#      renders its man page and completions. CI passes --debug so the install
#      reuses `cargo test`'s build instead of a 4-5 minute LTO build of a
#      target nothing else builds; the release profile itself is built by
#      deploy/build.sh for every shipped target.
#
#   deploy/install_check.sh            # the release profile, as the README says
#   deploy/install_check.sh --debug    # what CI runs
set -euo pipefail
cd "$(dirname "$0")/.."

profile_args=("$@")
started=$SECONDS
fail() { echo "install_check.sh: FAILED: $*" >&2; exit 1; }
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
work=$(mktemp -d "${TMPDIR:-/tmp}/keyrelay-install.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "== cargo package --locked (packs, then builds the packed sources)"
# --allow-dirty: CI's checkout is clean, a developer's may not be; what is
# checked is the list of files, not the tree's state.
cargo package --locked --allow-dirty 2>"$work/package.log" || { cat "$work/package.log" >&2; fail "cargo package"; }
cat "$work/package.log"
# The one warning expected until the repository has a public address.
if grep '^warning:' "$work/package.log" | grep -v 'manifest has no documentation, homepage or repository'; then
  fail "cargo package warned (above)"
fi
cargo package --locked --allow-dirty --list 2>/dev/null >"$work/files"
for needed in LICENSE README.md Cargo.lock Cargo.toml src/main.rs src/lib.rs tests/it/main.rs tests/it/demo.rs config/keyrelay.toml; do
  grep -qx "$needed" "$work/files" || fail "the package lacks $needed"
done
if grep -E '^(deploy/|\.ci/|tests/browser/|tests/redis/|tests/node/|fuzz/|Dockerfile|\.dockerignore|BENCHMARKS\.md|RELIABILITY\.md|bench/.*\.sh$)' "$work/files"; then
  fail "the package holds the repository-only files above"
fi
echo "packed $(wc -l <"$work/files") files; none of deploy/, .ci/, fuzz/, bench scripts or reports"

echo "== cargo install --locked --path . ${profile_args[*]}"
cargo install --locked --path . --root "$work/root" "${profile_args[@]}"
installed="$work/root/bin/keyrelay"
[ "$("$installed" --version)" = "keyrelay $version" ] || fail "installed keyrelay --version says $("$installed" --version)"
# Written whole to a file first: `grep -q` stops reading at its first
# match, and a page or script longer than the pipe's buffer would then end
# in a broken pipe that pipefail counts as keyrelay's failure.
"$installed" man >"$work/man.1" || fail "installed keyrelay man failed"
grep -q '^\.TH keyrelay 1' "$work/man.1" || fail "installed keyrelay man is not the man page"
"$installed" completions bash >"$work/completions.bash" || fail "installed keyrelay completions bash failed"
grep -q -- '--upstream' "$work/completions.bash" || fail "installed keyrelay's bash completions lack --upstream"
echo "== install_check.sh: keyrelay $version packs and installs; in $((SECONDS - started))s"
