# syntax=docker/dockerfile:1
# llm-sidecar image: a venv built in one stage, copied onto a clean slim Python.
#
#   docker build -t llm-sidecar:0.1.0 .
#   docker run --rm --read-only --tmpfs /tmp -p 9901:9901 \
#     -v "$PWD/config:/etc/llm-sidecar:ro" llm-sidecar:0.1.0
#
# Runs as UID/GID 10001 and writes nothing outside the mounted /tmp and
# /var/log/llm-sidecar (audit log), so it works with readOnlyRootFilesystem.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# A venv without pip or setuptools of its own: the base image's pip installs into it.
RUN python -m venv --without-pip /opt/llm-sidecar
# README.md* : the readme pyproject names, copied when present (a glob may match nothing).
COPY pyproject.toml README.md* ./
COPY sidecar ./sidecar
# Every dependency ships manylinux wheels (amd64, arm64): no compiler in this stage.
RUN python -m pip --python /opt/llm-sidecar/bin/python install --no-cache-dir . \
 && /opt/llm-sidecar/bin/llm-sidecar --help > /dev/null

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="llm-sidecar" \
      org.opencontainers.image.description="Per-pod egress proxy for LLM API traffic: breakers, token-aware limits, retries, streaming, metrics." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/llm-sidecar/llm-sidecar" \
      org.opencontainers.image.documentation="https://github.com/llm-sidecar/llm-sidecar/blob/main/docs/KUBERNETES.md"

RUN groupadd --system --gid 10001 llm-sidecar \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin llm-sidecar \
 && install -d -o 10001 -g 10001 -m 0755 /etc/llm-sidecar /var/log/llm-sidecar

COPY --from=build /opt/llm-sidecar /opt/llm-sidecar

# Bytecode was compiled at install time; never write it at run time (read-only root).
ENV PATH=/opt/llm-sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp

USER 10001:10001
WORKDIR /tmp
# 4000: the proxy (listens on 127.0.0.1 unless config.listen.proxy says otherwise);
# 9901: admin (/healthz, /readyz, /metrics, /dashboard).
EXPOSE 4000 9901
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2)"]
ENTRYPOINT ["llm-sidecar"]
CMD ["--config", "/etc/llm-sidecar/config.yaml"]
