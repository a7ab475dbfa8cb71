# keyrelay container image: one static (musl) binary in an otherwise empty image.
#
#   docker build --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" -t keyrelay:0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 --build-arg VERSION=0.1.0 -t REGISTRY/keyrelay:0.1.0 --push .
#
# The build stage needs BuildKit (the default builder since Docker 23; buildah
# and podman too) for its cache mounts. It runs on the platform it builds for
# and compiles that platform's musl target, so a plain `docker build` on an
# arm64 machine gives an arm64 image; buildx builds the other platform under
# emulation, which is slow (an LTO build under qemu). deploy/image.sh instead
# builds both images' final stage from cross-compiled binaries and joins them
# in a manifest list, with no registry at all.

FROM rust:1.95.0-bookworm AS build
# musl-gcc compiles ring's C and assembly for this platform's musl target.
RUN rustup target add "$(uname -m)-unknown-linux-musl" \
    && apt-get update \
    && apt-get install -y --no-install-recommends musl-tools=1.2.3-1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# The patched hyper of Cargo.toml's [patch.crates-io] (patches/hyper/PATCH.md).
COPY patches ./patches
COPY src ./src
# The cache mounts keep the crate downloads and compiled dependencies between
# builds (the target directory one per platform, since a multi-platform build
# runs both at once); the binary is copied out of the cached target directory.
ARG TARGETARCH
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,id=keyrelay-target-${TARGETARCH},target=/src/target \
    cargo build --release --locked --target "$(uname -m)-unknown-linux-musl" \
    && cp "target/$(uname -m)-unknown-linux-musl/release/keyrelay" /keyrelay

FROM scratch
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="keyrelay" \
      org.opencontainers.image.description="Local authenticating streaming proxy for hosted model endpoints" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# Only the binary. No CA bundle, on purpose: keyrelay trusts the Mozilla roots
# compiled into it (webpki-roots) and never reads the system store, so a bundle
# here would be dead weight that goes stale. ca_file only *adds* private CAs
# (a corporate or in-cluster CA), which no public bundle holds anyway: mount
# that PEM (e.g. from a ConfigMap) and pass --ca-file /path/to/it.
COPY --from=build /keyrelay /keyrelay
# The conventional "nonroot" uid/gid; numeric, since there is no /etc/passwd.
USER 65532:65532
# A sidecar default: both listeners on the pod's loopback. To publish the proxy
# port (docker run -p, a Service) pass --listen 0.0.0.0:8080 together with access
# tokens (--access-token-files), because whoever reaches it spends the key.
# Kubelet HTTP probes need --admin-listen 0.0.0.0:9901; exec probes running
# `/keyrelay health --url ...` work with the loopback default (deploy/kubernetes/).
ENV KEYRELAY_LISTEN=127.0.0.1:8080 \
    KEYRELAY_ADMIN_LISTEN=127.0.0.1:9901
EXPOSE 8080 9901
# No shell or curl in the image: the binary checks its own admin /healthz
# (default URL http://127.0.0.1:9901/healthz, the address set above).
HEALTHCHECK --interval=15s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/keyrelay", "health"]
# Settings come as flags after the image name or as KEYRELAY_* variables, e.g.
#   docker run -e BASETEN_API_KEY keyrelay:0.1.0 --upstream https://model-ID.api.baseten.co
# No CMD: given no upstream (--upstream, --model, ... or KEYRELAY_UPSTREAM),
# keyrelay exits 64 and says how to set one.
ENTRYPOINT ["/keyrelay"]
