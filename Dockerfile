# keyrelay container image: a static (musl) binary in an otherwise empty image.
# The Mozilla root certificates are compiled into the binary, so the image
# needs no CA bundle. Build: docker build -t keyrelay .
FROM rust:1-bookworm AS build
RUN rustup target add x86_64-unknown-linux-musl \
    && apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --target x86_64-unknown-linux-musl

FROM scratch
LABEL org.opencontainers.image.title="keyrelay" \
      org.opencontainers.image.description="Local authenticating streaming proxy for hosted model endpoints"
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/keyrelay /keyrelay
# Non-root (the conventional "nonroot" uid); keyrelay needs no privileges.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/keyrelay"]
# In a pod, other containers reach it over the pod's loopback; listen wider only
# behind a NetworkPolicy, since anyone who can reach keyrelay can spend the key.
CMD ["--listen", "127.0.0.1:8080"]
