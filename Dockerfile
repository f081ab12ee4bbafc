# syntax=docker/dockerfile:1
# iampool container image: a release build on Debian 12, run on distroless (glibc: aws-lc-rs
# needs it) as user 65532. Writes nothing at run time, so a read-only root filesystem works.
#
#   docker build -t iampool:dev .        (or: buildah build --layers -t iampool:dev .)

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
# No debug info in the image (the release profile keeps line tables for profiling);
# symbol names stay, so backtraces still name functions.
ENV CARGO_PROFILE_RELEASE_DEBUG=0 \
    CARGO_PROFILE_RELEASE_STRIP=debuginfo
# Dependencies first, against stub sources: this layer is rebuilt only when Cargo.toml or
# Cargo.lock change. benches/hot_path.rs is named in Cargo.toml, so it must exist.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > benches/hot_path.rs \
 && cargo build --release --locked --bin iampool \
 && rm -rf src
COPY src ./src
# touch: the stubs above are newer than the copied sources, and cargo compares mtimes.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin iampool \
 && install -D -m 0755 target/release/iampool /out/iampool

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="iampool" \
      org.opencontainers.image.description="PostgreSQL connection pooler sidecar that signs in to Amazon RDS and Aurora with IAM" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
COPY --from=builder /out/iampool /usr/local/bin/iampool
USER 65532:65532
# Fails the build if the binary cannot start here (a missing shared library, say).
RUN ["/usr/local/bin/iampool", "--version"]
# 6432: PostgreSQL clients; 9090: metrics and health, when IAMPOOL_METRICS_LISTEN is set.
EXPOSE 6432 9090
ENTRYPOINT ["/usr/local/bin/iampool"]
