# syntax=docker/dockerfile:1
# FlatRender Edge: the container image (issue 7). Build from the repository root:
#
#     docker build -t flatrender-edge .
#
# BuildKit is required (RUN --mount and heredocs); it is the default builder since Docker 23.
#
# Runtime layout, and why the package is NOT installed as a wheel:
#
#     /app/proxy    the package, copied as source (byte-compiled at build time)
#     /app/sql      the migrations
#     /app/config   edge.toml and tenants.toml: the documented defaults (embedded demo data,
#                   demo key included); a deployment mounts its own file and sets EDGE_CONFIG
#     /app/var      the only directory the proxy writes: audit JSON lines (embedded mode) and
#                   the audit spool (database mode)
#
# `python -m proxy migrate` reads proxy/migrate.py's DEFAULT_SQL_DIR, which is
# "<the directory holding proxy/>/sql". Installed from a wheel, proxy/ would sit in
# site-packages and migrate would look for site-packages/sql, which no wheel provides. So the
# image installs only the runtime *dependencies* from wheels and runs the package from /app,
# side by side with sql/; PYTHONPATH=/app makes `python -m proxy` find it whatever the working
# directory. The price: no `flatrender-edge` console script in the image; the entrypoint is
# `python -m proxy`, the same command (CONTRACT §1). Relative paths in edge.toml (var/...,
# config/tenants.toml) resolve against the working directory, hence WORKDIR /app.

# Both stages share this base on purpose: the builder resolves the wheels for its own interpreter
# (environment markers differ even between patch releases: redis needs async-timeout below
# 3.11.3), so the runtime must run exactly that interpreter.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ----------------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /build
COPY pyproject.toml ./

# The runtime dependencies are [project].dependencies, read from pyproject.toml (the single
# source of truth); [project.optional-dependencies] (the test tools) is never looked at.
RUN python - > requirements.txt <<'EOF'
import tomllib

with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
EOF

# --only-binary: every runtime dependency publishes manylinux wheels for CPython 3.11 (x86_64
# and aarch64). Refusing source distributions means the C extensions in the image are the ones
# upstream built and tested, and a missing wheel fails the build loudly instead of compiling
# (which would need a toolchain) or, for aiohttp, quietly falling back to pure Python. Should a
# dependency ever need compiling, install build-essential in THIS stage only.
RUN mkdir /wheels \
    && cp requirements.txt /wheels/requirements.txt \
    && pip wheel --only-binary=:all: --wheel-dir /wheels --requirement requirements.txt

# ----------------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONPATH=/app \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# A numeric uid/gid (10001): Kubernetes' runAsNonRoot can only verify a numeric USER.
RUN groupadd --system --gid 10001 edge \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin edge

# The wheels are bind-mounted from the builder, so they never become a layer of this image;
# --no-index: nothing is downloaded here, only what the builder produced is installed.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels --requirement /wheels/requirements.txt

# Fail the build unless aiohttp (and the libraries under it) run on their C extensions: the
# pure-Python fallbacks are several times slower, and aiohttp falls back without a word.
RUN python - <<'EOF'
import os

assert not os.environ.get("AIOHTTP_NO_EXTENSIONS"), "AIOHTTP_NO_EXTENSIONS is set"

import aiohttp
import aiohttp._http_parser as hp_c
import aiohttp._http_writer as hw_c
import aiohttp._websocket.helpers as wh
import aiohttp._websocket.mask as wm
import aiohttp._websocket.reader as wr
import aiohttp._websocket.reader_c as wr_c
import aiohttp.http_parser as hp
import aiohttp.http_writer as hw

assert hp.HttpRequestParser is hp_c.HttpRequestParser, "aiohttp request parser: pure Python"
assert hp.HttpResponseParser is hp_c.HttpResponseParser, "aiohttp response parser: pure Python"
assert hw._serialize_headers is hw_c._serialize_headers, "aiohttp header writer: pure Python"
assert wr.WebSocketReader is wr_c.WebSocketReader, "aiohttp WebSocket reader: pure Python"
assert wh.websocket_mask is wm._websocket_mask_cython, "aiohttp WebSocket mask: pure Python"

import multidict
import multidict._multidict as md_c
import yarl._quoting as yq
import yarl._quoting_c as yq_c

assert multidict.CIMultiDict is md_c.CIMultiDict, "multidict: pure Python"
assert yq._Quoter is yq_c._Quoter, "yarl: pure Python"

import redis.utils

assert redis.utils.HIREDIS_AVAILABLE, "redis: hiredis parser missing"

import asyncpg, orjson, uvloop  # C only: importing them is the check

print("C extensions in use: aiohttp", aiohttp.__version__)
EOF

WORKDIR /app
COPY sql/ sql/
COPY config/ config/
COPY proxy/ proxy/
# Byte-compiled now: the root filesystem is read-only in Kubernetes, so nothing could be cached
# at run time. The code stays owned by root (the proxy cannot rewrite itself); only var/ is
# the proxy's.
RUN python -m compileall -q proxy \
    && mkdir -p var \
    && chown 10001:10001 var

USER 10001:10001

# The shipped configuration passes `check` as the runtime user (the same validation as serve's;
# no DATABASE_URL or REDIS_URL here, so no store is asked): an image whose code and defaults
# disagree fails to build. A deployment checks its own file and stores before starting the
# proxy: `docker run --rm -e DATABASE_URL -e REDIS_URL -e EDGE_CONFIG ... IMAGE check` (exit 2
# and one line per problem, CONTRACT §10); compose.yaml and k8s/edge.yaml run it first.
RUN python -m proxy check

# 8080: the public listener. 9901: the admin listener (/healthz, /readyz, /tls/allowed). The
# admin port is bound on 0.0.0.0 below so that the orchestrator's probes and the load balancer
# can reach it inside the pod or network, but it must NEVER be published publicly
# (no `-p 9901:...`, no public Service or Ingress in front of it): CONTRACT §10.
EXPOSE 8080 9901

# No curl in the slim image; python's urllib raises (exit 1) on a refused connection or a
# non-2xx answer.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2)"]

# SIGTERM (Docker's default stop signal) drains: stop accepting, finish in-flight requests up
# to server.shutdown_timeout_s (30 s), then write pending audit rows. Give the container more
# than that to stop: `docker stop -t 45`, compose stop_grace_period, Kubernetes
# terminationGracePeriodSeconds.
ENTRYPOINT ["python", "-m", "proxy"]
CMD ["serve", "--listen", "0.0.0.0:8080", "--admin-listen", "0.0.0.0:9901"]
