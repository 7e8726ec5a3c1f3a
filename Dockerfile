# syntax=docker/dockerfile:1
# Multi-stage build of the pgoutbox relay.
#
#   docker build --build-arg PGOUTBOX_GIT_REVISION="$(git rev-parse --short=12 HEAD)" -t pgoutbox .
#
# The build context has no .git (.dockerignore), so the revision that
# `pgoutbox --version` shows comes from the build argument ("unknown" without
# it). The runtime image runs as the non-root user 10001 and needs nothing
# writable: it suits a read-only root filesystem.
# Checked by scripts/check-deploy (hadolint).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
# rdkafka builds librdkafka from source (cmake) with the `ssl` feature:
# OpenSSL headers found through pkg-config; zlib for compression.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake pkg-config libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ARG PGOUTBOX_GIT_REVISION=unknown
ENV PGOUTBOX_GIT_REVISION=${PGOUTBOX_GIT_REVISION}
# Registry and target dir in BuildKit caches; the binary is copied out of them.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin pgoutbox \
 && cp target/release/pgoutbox /usr/local/bin/pgoutbox \
 && strip /usr/local/bin/pgoutbox \
 && /usr/local/bin/pgoutbox --version

FROM debian:${DEBIAN_RELEASE}-slim
ARG PGOUTBOX_GIT_REVISION=unknown
LABEL org.opencontainers.image.title="pgoutbox" \
      org.opencontainers.image.description="PostgreSQL transactional-outbox relay to Apache Kafka" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.revision="${PGOUTBOX_GIT_REVISION}"
# libssl3: librdkafka's TLS (SSL, SASL_SSL); ca-certificates: the system trust
# store for Kafka and for PostgreSQL's verify-full (rustls-native-certs).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 pgoutbox \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin pgoutbox
COPY --from=build /usr/local/bin/pgoutbox /usr/local/bin/pgoutbox
COPY config/pgoutbox.toml /etc/pgoutbox/pgoutbox.toml
# /metrics, /healthz and /readyz: on all interfaces inside the container, so
# that Prometheus and the orchestrator's probes reach them.
ENV OUTBOX_METRICS_LISTEN=0.0.0.0:9187
EXPOSE 9187
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/pgoutbox", "--config", "/etc/pgoutbox/pgoutbox.toml"]
CMD ["run"]
