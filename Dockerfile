# syntax=docker/dockerfile:1
#
# One Dockerfile for the four Tandem services. The builder compiles all four
# binaries once (BuildKit caches the layer, so building the four images in a row
# compiles once); BINARY picks the one that goes into the runtime image:
#
#   docker build --build-arg BINARY=tandem-write -t tandem-write .
#
# BINARY: tandem-write | tandem-read | tandem-outbox-relay | tandem-region2-consumer
#
# The build reaches nothing but the package registries (Debian, crates.io). The
# Amazon RDS CA bundle is therefore not in the image: RDS server certificates
# chain to the RDS CAs, which are not in the web PKI, so the Deployments mount the
# bundle from the operator-created ConfigMap tandem-rds-ca and point
# DATABASE_CA_FILE at it (eks/base, docs/deploy.md). The Lambda functions need no
# bundle: RDS Proxy presents certificates that chain to Amazon's public roots.

# Kubernetes ignores HEALTHCHECK: the liveness (/healthz) and readiness (/readyz)
# probes in eks/base do that job, and distroless has no client to run one with.
# checkov:skip=CKV_DOCKER_2:Kubernetes probes replace HEALTHCHECK (see above).

################################################################################
# Builder
################################################################################
FROM rust:1-bookworm AS builder

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# librdkafka is compiled from source by rdkafka-sys: cmake for its cmake-build
# feature (the default mklove build needs only make and a C compiler, already in
# the image), libssl-dev and pkg-config for its ssl feature. SASL/SCRAM is
# implemented inside librdkafka on top of OpenSSL and needs no libsasl2.
# DL3008 (pin apt versions) is ignored on purpose: these build-only packages
# follow the base image's Debian release and its security updates, and exact
# versions would break the build at every Debian point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake pkg-config libssl-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .

# The cache mounts keep the crate registry and the target directory between
# builds; the binaries are copied out because a cache mount is not in the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        --bin tandem-write \
        --bin tandem-read \
        --bin tandem-outbox-relay \
        --bin tandem-region2-consumer \
    && mkdir -p /out/bin /out/lib \
    && cp target/release/tandem-write target/release/tandem-read \
          target/release/tandem-outbox-relay target/release/tandem-region2-consumer /out/bin/

# The runtime image has glibc, libgcc, libstdc++, OpenSSL and CA certificates
# and nothing else: copy every other shared library the binaries link (zlib,
# for instance, when librdkafka finds it) next to them.
RUN ldd /out/bin/* \
    | awk '$2 == "=>" && $3 ~ /^\// {print $3}' \
    | sort -u \
    | { grep -vE '/(libc|libm|libdl|libpthread|librt|libgcc_s|libstdc\+\+|libssl|libcrypto|ld-linux[^/]*)\.so' || true; } \
    | xargs -r -I{} cp -L {} /out/lib/

ARG BINARY
RUN test -n "${BINARY}" && test -x "/out/bin/${BINARY}" \
    || { echo "set --build-arg BINARY to one of: $(ls /out/bin)" >&2; exit 1; }

################################################################################
# Runtime
################################################################################
FROM gcr.io/distroless/cc-debian12:nonroot

ARG BINARY
LABEL org.opencontainers.image.title="${BINARY}" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=builder /out/lib/ /usr/local/lib/tandem/
ENV LD_LIBRARY_PATH=/usr/local/lib/tandem

# One fixed path for every image: ENTRYPOINT's exec form cannot expand BINARY.
COPY --from=builder --chmod=0555 /out/bin/${BINARY} /usr/local/bin/tandem-service

# distroless defines nonroot as 65532:65532; the Kubernetes manifests also set
# runAsUser 65532 so runAsNonRoot can verify it without reading /etc/passwd.
# hadolint ignore=DL3066
USER nonroot
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tandem-service"]
