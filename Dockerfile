# tollgate: the gateway (`tollgate`), the mock backend (`tollgate-mock`) and the load generator
# (`tollgate-load`) in one small image.
#
#   docker build -t tollgate .
#   docker run --rm -p 8080:8080 -v $PWD/deploy/tollgate.toml:/etc/tollgate/tollgate.toml tollgate
#
# Stage 1 builds release binaries with the workspace's lockfile; stage 2 is Debian slim with
# only CA certificates (for HTTPS backends and token endpoints) and the three binaries, run as
# an unprivileged user.

# The toolchain this workspace is built and tested with (rust-version in Cargo.toml is the floor).
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tollgate -p tollgate-loadtest \
        --bin tollgate --bin tollgate-mock --bin tollgate-load \
    && mkdir -p /out \
    && cp target/release/tollgate target/release/tollgate-mock target/release/tollgate-load /out/

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home tollgate
COPY --from=builder /out/tollgate /out/tollgate-mock /out/tollgate-load /usr/local/bin/
USER tollgate
EXPOSE 8080
ENV TOLLGATE_LOG=info
ENTRYPOINT ["tollgate"]
CMD ["serve", "--config", "/etc/tollgate/tollgate.toml"]
