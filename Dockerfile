# syntax=docker/dockerfile:1.7
# One image for `mlp server` (the default command) and `mlp worker` (docker run IMAGE worker).
# The base is pinned by digest; Dependabot/Renovate bump it. `nox -s image_e2e` builds this same
# file on a locally bootstrapped Debian base (no registry needed) by overriding BASE_IMAGE.
ARG BASE_IMAGE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

FROM ${BASE_IMAGE} AS builder
ARG UV_VERSION=0.13.9
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m pip install "uv==${UV_VERSION}"
WORKDIR /src
# Dependencies first (a layer that changes only with uv.lock), then the package itself.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=/src/uv.lock \
    --mount=type=bind,source=pyproject.toml,target=/src/pyproject.toml \
    uv sync --frozen --no-default-groups --no-install-project
COPY pyproject.toml uv.lock README.md ./
COPY src/ml_platform ./src/ml_platform
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-default-groups --no-editable

FROM ${BASE_IMAGE} AS runtime
ARG VERSION=0.0.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=https://github.com/ml-platform/ml-platform
LABEL org.opencontainers.image.title="ml-platform" \
      org.opencontainers.image.description="ML workflow orchestration: API server and workers" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 mlp \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin mlp \
    && mkdir -p /var/lib/ml-platform \
    && chown 10001:10001 /var/lib/ml-platform
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ML_PLATFORM_HOME=/var/lib/ml-platform \
    HOME=/var/lib/ml-platform \
    TMPDIR=/tmp
# With a read-only root filesystem these two are the writable places (mount volumes there).
VOLUME ["/var/lib/ml-platform", "/tmp"]
USER 10001:10001
WORKDIR /var/lib/ml-platform
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=2).status != 200)"]
ENTRYPOINT ["mlp"]
CMD ["server", "--host", "0.0.0.0", "--port", "8000"]
