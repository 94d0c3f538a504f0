# DeltaStore sidecar image: the server and store only.
#
#   docker build -t deltastore .
#
# The server parses block headers and never decodes a tensor, so the image has no torch (nor
# transformers): workers install the client with `pip install "deltastore[worker]"` (or `[hf]`,
# `[vllm]`) in their own image, next to their own torch build.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/deltastore \
    PATH=/opt/deltastore/bin:$PATH \
    DELTASTORE_DATA_DIR=/data \
    DELTASTORE_GRPC_ADDRESS=0.0.0.0:50051 \
    DELTASTORE_HTTP_ADDRESS=0.0.0.0:8080 \
    DELTASTORE_AUTH_FILE=/run/secrets/deltastore-auth

RUN python3 -m venv "$VIRTUAL_ENV" && pip install --upgrade pip

WORKDIR /src
COPY pyproject.toml README.md ./
COPY deltastore ./deltastore
COPY codecs ./codecs
COPY server ./server
COPY client ./client
COPY bench ./bench
COPY integrations ./integrations
COPY proto ./proto
RUN pip install . && rm -rf /src

RUN useradd --system --uid 10001 --home-dir /data deltastore \
    && mkdir -p /data && chown deltastore /data
USER deltastore
WORKDIR /data
VOLUME ["/data"]

# Secure by default: the server listens on every interface, so it needs API keys. Mount an auth
# file at /run/secrets/deltastore-auth (a compose or Kubernetes secret; see docker-compose.yml), or
# the container refuses to start. Opting out takes DELTASTORE_AUTH_FILE= and DELTASTORE_INSECURE=1.
# 50051: gRPC (workers); 8080: ops HTTP (/healthz, /readyz, /metrics, /v1/savings, /).
EXPOSE 50051 8080

HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD python3 -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"

# Exec form: the server is PID 1 and receives SIGTERM itself, so it drains in-flight calls.
ENTRYPOINT ["deltastore", "serve"]
