# DeltaStore sidecar image.
#
# CPU (default):   docker build -t deltastore .
# CUDA workers can share the image family; for a CUDA build of torch (only the client-side codecs
# use the GPU; the server parses headers and never needs one):
#   docker build -t deltastore:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/deltastore \
    PATH=/opt/deltastore/bin:$PATH \
    DELTASTORE_DATA_DIR=/data \
    DELTASTORE_GRPC_ADDRESS=0.0.0.0:50051 \
    DELTASTORE_HTTP_ADDRESS=0.0.0.0:8080

# CUDA base images ship no Python; slim Python images skip this step.
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv "$VIRTUAL_ENV" \
    && pip install --upgrade pip \
    && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY deltastore ./deltastore
COPY codecs ./codecs
COPY server ./server
COPY client ./client
COPY proto ./proto
RUN pip install . && rm -rf /src

RUN useradd --system --uid 10001 --home-dir /data deltastore \
    && mkdir -p /data && chown deltastore /data
USER deltastore
WORKDIR /data
VOLUME ["/data"]

# 50051: gRPC (workers); 8080: ops HTTP (/healthz, /readyz, /metrics, /v1/savings, /).
EXPOSE 50051 8080

HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD python3 -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"

# Exec form: the server is PID 1 and receives SIGTERM itself, so it drains in-flight calls.
ENTRYPOINT ["deltastore", "serve"]
