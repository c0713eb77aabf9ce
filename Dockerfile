# syntax=docker/dockerfile:1
# outbox-relay container image.
#
#   docker build -t outbox-relay:0.1.0 \
#     --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg SOURCE=https://<your git host>/outbox-relay .
#   docker run --rm outbox-relay:0.1.0 --help
#
# Runtime base: distroless cc-debian12 (glibc, libgcc-s1, libstdc++6, libgomp1, libssl3,
# ca-certificates, tzdata; no shell, no package manager), user 65532 ("nonroot").
# The binary links only libc, libm, libgcc_s, libssl and libcrypto dynamically: zlib is
# linked statically (rdkafka feature `libz-static`, Cargo.toml), because debian12's
# distroless images carry no zlib1g. scripts/image-check.sh verifies this with ldd.
# Pin the base images by digest (name:tag@sha256:...) in your release pipeline.

ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS builder
# librdkafka (built by rdkafka-sys with its ./configure, not cmake) needs a C toolchain,
# make, pkg-config, the OpenSSL headers (feature ssl) and python3 (its linker-script
# generator). zstd, lz4 and zlib are compiled from bundled sources.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config libssl-dev python3 \
 && rm -rf /var/lib/apt/lists/*
ENV CARGO_INCREMENTAL=0 CARGO_TERM_COLOR=never
WORKDIR /build

# Dependencies first, in their own layer: rebuilt only when Cargo.toml or Cargo.lock change.
# rust-toolchain.toml is left out on purpose: the base image tag pins the same toolchain, and
# the file's components (rustfmt, clippy) would make rustup download them during the build.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src

# The real sources. `touch` makes them newer than the stub build, so cargo rebuilds the crate.
COPY migrations ./migrations
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked \
 && install -D -m 0755 target/release/outbox-relay /out/outbox-relay

FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=
LABEL org.opencontainers.image.title="outbox-relay" \
      org.opencontainers.image.description="Transactional outbox relay: PostgreSQL outbox table to Apache Kafka" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/outbox-relay /usr/local/bin/outbox-relay
# distroless "nonroot": uid/gid 65532. Numeric, so Kubernetes runAsNonRoot can verify it.
USER 65532:65532
# /metrics, /healthz, /readyz (--metrics-addr, default 0.0.0.0:9464)
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/outbox-relay"]
CMD ["run"]
