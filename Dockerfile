# syntax=docker/dockerfile:1
#
# Both Infinite-LLM images from one build:
#
#   docker build --target operator -t ghcr.io/infinite-llm/operator:0.1.0 .
#   docker build --target worker   -t ghcr.io/infinite-llm/worker:0.1.0 .
#
# Dependencies are compiled in a layer of their own (cargo-chef), which only changes when
# Cargo.toml or Cargo.lock do, so editing the sources rebuilds our crates and nothing else.
# The final images hold one binary each and no compiler, cargo or package manager cache.

ARG RUST_VERSION=1.95.0
ARG CUDA_VERSION=13.0.1
ARG VERSION=0.1.0
ARG REVISION=unknown

# ---- build ---------------------------------------------------------------------------
# Debian bookworm: glibc 2.36, no newer than either runtime base below.
FROM rust:${RUST_VERSION}-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

# The dependency graph only, from the manifests and lock file.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bins \
    && mkdir -p /out \
    && cp target/release/infinite-llm-operator target/release/infinite-llm-worker /out/

# ---- operator: distroless, i.e. glibc, libgcc and CA certificates; no shell, no packages
FROM gcr.io/distroless/cc-debian12:nonroot AS operator
ARG VERSION
ARG REVISION
LABEL org.opencontainers.image.title="infinite-llm-operator" \
      org.opencontainers.image.description="Kubernetes operator for InfiniteLLMCluster, with the gManager" \
      org.opencontainers.image.source="https://github.com/infinite-llm/infinite-llm" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=builder /out/infinite-llm-operator /usr/local/bin/infinite-llm-operator
# 65532 is distroless' "nonroot"; numeric so that runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 8080 8001
ENTRYPOINT ["/usr/local/bin/infinite-llm-operator"]
CMD ["run"]

# ---- worker: the CUDA runtime image, whose cuBLAS, NVRTC and NCCL cudarc loads at run time
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04 AS worker
ARG CUDA_VERSION
ARG VERSION
ARG REVISION
LABEL org.opencontainers.image.title="infinite-llm-worker" \
      org.opencontainers.image.description="Infinite-LLM worker: Llama-family engine with a pooled KV cache and an OpenAI-compatible API" \
      org.opencontainers.image.source="https://github.com/infinite-llm/infinite-llm" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# cudarc opens libraries by name (dynamic loading): lib<name>.so or lib<name>.so.<CUDA major>.
# NCCL's soname is libnccl.so.2, which it does not try, and the unversioned link ships only
# in the -dev package, so add that link. Then fail the build, rather than the first GPU
# Pod, when a library is not found. libcuda itself comes from the node's driver.
RUN nccl="$(ldconfig -p | awk '$1 == "libnccl.so.2" { print $NF; exit }')" \
    && test -n "${nccl}" \
    && ln -sf "$(basename "${nccl}")" "$(dirname "${nccl}")/libnccl.so" \
    && ldconfig \
    && major="${CUDA_VERSION%%.*}" \
    && for lib in "libcublas.so.${major}" "libcublasLt.so.${major}" "libnvrtc.so.${major}" libnccl.so; do \
        ldconfig -p | awk -v lib="${lib}" '$1 == lib { found = 1 } END { exit !found }' \
            || { echo "missing ${lib}" >&2; exit 1; }; \
    done \
    && groupadd --gid 65532 ilm \
    && useradd --uid 65532 --gid 65532 --create-home --home-dir /home/ilm --shell /usr/sbin/nologin ilm
COPY --from=builder /out/infinite-llm-worker /usr/local/bin/infinite-llm-worker
# Compiled kernels are cached here; give the Pod an emptyDir at /home/ilm/.cache when its
# root filesystem is read-only.
ENV XDG_CACHE_HOME=/home/ilm/.cache
USER 65532:65532
WORKDIR /home/ilm
EXPOSE 8000 8101
ENTRYPOINT ["/usr/local/bin/infinite-llm-worker"]
