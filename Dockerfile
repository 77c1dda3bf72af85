# syntax=docker/dockerfile:1
#
# One image with the three binaries: edge-gateway, script-worker and the all-in-one
# tcp-connectivity (the default command).
#
#   docker build -t tcp-connectivity .
#   docker run --rm -p 7653:7653 -p 7654:7654 tcp-connectivity
#
# Dependencies are compiled in their own layer (cargo-chef): a change to the project's
# code rebuilds only the project's crates. The builder and the runtime share one Debian
# release, so the binaries find the glibc they were linked against. No system protoc is
# needed: proto/build.rs uses a vendored one.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=trixie

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS chef
RUN cargo install cargo-chef --locked --version 0.1.77
WORKDIR /src

# The recipe: every manifest and Cargo.lock, without the sources.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --bins -p edge-gateway -p script-worker -p tcp-connectivity \
      --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bins -p edge-gateway -p script-worker -p tcp-connectivity \
 && mkdir /out \
 && cp target/release/edge-gateway target/release/script-worker target/release/tcp-connectivity /out/

FROM debian:${DEBIAN_RELEASE}-slim
# ca-certificates: the system CA store, which the NATS client trusts for tls:// URLs.
# Not pinned (DL3008): the release's current package, security fixes included.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 tcpc \
 && useradd --system --uid 10001 --gid tcpc --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin tcpc
COPY --from=builder /out/ /usr/local/bin/
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
# 7653 TP devices, 7654 custom devices, 50051 edge gRPC, 8098 plugin HTTP API,
# 9100 /metrics /healthz /readyz.
EXPOSE 7653 7654 50051 8098 9100
CMD ["tcp-connectivity"]
