# Multi-stage build of the pgoutbox relay; the runtime image runs as a
# non-root user.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake pkg-config libssl-dev libsasl2-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked && strip target/release/pgoutbox

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 libsasl2-2 zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home pgoutbox
COPY --from=build /src/target/release/pgoutbox /usr/local/bin/pgoutbox
COPY config/pgoutbox.toml /etc/pgoutbox/pgoutbox.toml
USER 10001
ENTRYPOINT ["/usr/local/bin/pgoutbox", "--config", "/etc/pgoutbox/pgoutbox.toml"]
CMD ["run"]
