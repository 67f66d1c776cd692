# imagegate: `cargo build --release --locked` in the official Rust image (the release
# profile strips the binary), then the binary alone on Debian slim, running
# `imagegate serve` as a non-root user.
#
# The database migrations are embedded in the binary (sqlx::migrate!) and applied by
# `imagegate serve` at start (or by `imagegate migrate`): the image needs no migrations folder.

FROM rust:1.95-bookworm AS builder
WORKDIR /src

# Dependencies first, in a layer of their own that is rebuilt only when Cargo.toml or
# Cargo.lock change. The placeholders stand in for the targets Cargo.toml declares.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src tests/it \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs tests/it/main.rs \
    && cargo build --release --locked \
    && rm -rf src tests

COPY src src
COPY migrations migrations
# Cargo decides what to rebuild by file times, and the placeholders are newer than the
# copied sources: touch the crate roots so that the real crate is built.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked


FROM debian:bookworm-slim

# imagegate's TLS uses the root certificates built into it; the system store is for
# anything else run in the container.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --home-dir /app --no-create-home --shell /usr/sbin/nologin imagegate

COPY --from=builder /src/target/release/imagegate /usr/local/bin/imagegate
WORKDIR /app
COPY config/ /app/config/
# Writable by imagegate, and to be kept across restarts: the usage journal
# (server.journal_dir, data/journal), the upload spool (data/spool) and the default
# SQLite database (data/imagegate.db). /app/results is for a result store that replicas
# share as a folder (docker-compose.yml mounts one volume there in each replica): a
# named volume mounted there starts with its owner.
RUN mkdir -p /app/data /app/results \
    && chown imagegate:imagegate /app/data /app/results
VOLUME /app/data

USER 10001:10001
ENV IMAGEGATE_SERVER__LISTEN=0.0.0.0:8080 IMAGEGATE_LOG_FORMAT=json
EXPOSE 8080
# `imagegate healthcheck` asks GET /readyz on server.listen (here 0.0.0.0:8080, reached on
# 127.0.0.1): healthy once the database answers and the usage journal is writable. The
# start period covers the migrations of a first start. Orchestrators may probe GET /healthz
# (liveness) and GET /readyz themselves on port 8080.
HEALTHCHECK --interval=15s --timeout=6s --start-period=60s --retries=3 \
    CMD ["imagegate", "healthcheck", "--timeout", "5s"]
ENTRYPOINT ["imagegate"]
CMD ["serve"]
