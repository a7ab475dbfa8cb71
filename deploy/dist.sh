#!/usr/bin/env bash
# Builds the release archives: one per target, each holding the static binary,
# its man page, bash/zsh/fish completions, README.md and LICENSE, plus a
# SHA256SUMS file, all in dist/ (gitignored; replaced on every run). Windows
# gets a .zip with keyrelay.exe, README.md, LICENSE and the PowerShell
# completion script (no man page: Windows has no man):
#
#   dist/keyrelay-VERSION-x86_64-unknown-linux-musl.tar.gz
#   dist/keyrelay-VERSION-aarch64-unknown-linux-musl.tar.gz
#   dist/keyrelay-VERSION-aarch64-apple-darwin.tar.gz
#   dist/keyrelay-VERSION-x86_64-apple-darwin.tar.gz
#   dist/keyrelay-VERSION-x86_64-pc-windows-gnu.zip
#   dist/keyrelay-VERSION-aarch64-pc-windows-gnullvm.zip
#   dist/SHA256SUMS                                  (sha256sum -c SHA256SUMS)
#
#   deploy/dist.sh                               # every target
#   deploy/dist.sh aarch64-unknown-linux-musl    # just these
#   DIST_DIR=/tmp/out deploy/dist.sh
#
# Runs on Linux (x86_64 or aarch64) with apt; deploy/build.sh installs the
# tools and says how each target is built. The archives are reproducible: the
# same commit and toolchain give the same bytes (sorted members, owner 0,
# timestamps from the commit, gzip without a name or time).
set -euo pipefail
cd "$(dirname "$0")/.."

DIST_DIR=${DIST_DIR:-dist}
started=$SECONDS

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
[ -n "$version" ] || { echo "dist.sh: cannot read the version from Cargo.toml" >&2; exit 1; }
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl aarch64-apple-darwin x86_64-apple-darwin
    x86_64-pc-windows-gnu aarch64-pc-windows-gnullvm)
fi
# The man page and completions come from a binary that runs here; they are
# the same for every target, since all are rendered from one clap command.
native="$(uname -m)-unknown-linux-musl"
build=("${targets[@]}")
case " ${targets[*]} " in *" $native "*) ;; *) build+=("$native") ;; esac
bash deploy/build.sh "${build[@]}"
out="${CARGO_TARGET_DIR:-target}"

epoch=$(git log -1 --format=%ct 2>/dev/null || echo 0)
rm -rf "$DIST_DIR"
mkdir -p "$DIST_DIR"
work=$(mktemp -d "${TMPDIR:-/tmp}/keyrelay-dist.XXXXXX")
trap 'rm -rf "$work"' EXIT

generator="$out/$native/release/keyrelay"
mkdir -p "$work/docs/completions"
"$generator" man >"$work/docs/keyrelay.1"
"$generator" completions bash >"$work/docs/completions/keyrelay.bash"
"$generator" completions zsh >"$work/docs/completions/_keyrelay"
"$generator" completions fish >"$work/docs/completions/keyrelay.fish"
"$generator" completions powershell >"$work/keyrelay.ps1"

for target in "${targets[@]}"; do
  name="keyrelay-$version-$target"
  stage="$work/$name"
  mkdir -p "$stage"
  if [[ $target == *-windows-* ]]; then
    install -m 0644 "$out/$target/release/keyrelay.exe" README.md LICENSE "$stage/"
    install -d "$stage/completions"
    install -m 0644 "$work/keyrelay.ps1" "$stage/completions/"
    python3 deploy/dist_zip.py "$DIST_DIR/$name.zip" "$work" "$name" "$epoch"
    continue
  fi
  # install(1) sets the modes, so the archive does not depend on the umask.
  install -m 0755 "$out/$target/release/keyrelay" "$stage/keyrelay"
  install -m 0644 README.md LICENSE "$work/docs/keyrelay.1" "$stage/"
  install -d -m 0755 "$stage/completions"
  install -m 0644 "$work/docs/completions/"* "$stage/completions/"
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" \
    --format=gnu -C "$work" -cf - "$name" | gzip -9n >"$DIST_DIR/$name.tar.gz"
done
(cd "$DIST_DIR" && shopt -s nullglob && sha256sum -- *.tar.gz *.zip >SHA256SUMS)

python3 deploy/dist_check.py "$DIST_DIR" "$version" "${targets[@]}"
echo "== dist.sh: ${#targets[@]} archives in $DIST_DIR/ in $((SECONDS - started))s"
