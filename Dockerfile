# syntax=docker/dockerfile:1
#
# wschat container image.
#
#   docker build -t wschat:0.1.0 .
#   docker run --rm --stop-timeout 30 -p 8080:8080 -p 8081:8081 wschat:0.1.0
#   docker run --rm -p 8080:8080 -p 8081:8081 -e ENABLE_PERSISTENCE=true \
#       -v wschat-data:/data wschat:0.1.0        # SQLite in /data/wschat.db
#
# Two stages: "build" installs the project and its runtime dependencies into a
# virtual environment at /opt/venv; "runtime" is a fresh slim Python image that
# receives only that venv and gunicorn.conf.py, and runs them as an
# unprivileged user. No compiler, pip cache, source tree or tests reach it.
#
# The dependencies come from requirements/image.txt, a lock of exact versions
# with the hash of every file: two builds of one commit install the same
# packages, whatever PyPI has published since. docs/deployment.md says how to
# regenerate it after a change to pyproject.toml's dependencies.
#
# tests/test_packaging.py reads this file (the COPY lines, the build stage's
# pip commands, USER, CMD and HEALTHCHECK) and performs the same install
# without Docker, then starts the result as a non-root user: keep those
# instructions in the simple forms used here (one `pip ...` or `python -m ...`
# command per `&&`, exec-form JSON for CMD and HEALTHCHECK).

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# The dependencies, exactly as locked: the runtime dependencies plus the
# optional extras baked into the image, Redis (several workers or pods) and
# PostgreSQL (ENABLE_PERSISTENCE with a postgresql:// DATABASE_URL); the
# extras are chosen when the lock is compiled (--extra redis --extra postgres).
# --require-hashes refuses any file whose hash the lock does not list,
# --no-deps any package it does not pin, and --only-binary any source build
# (which would fetch an unpinned build backend): the lock has wheels for
# linux x86_64 and aarch64. Its own layer, so a change to the code alone
# reuses it.
COPY requirements/image.txt ./requirements/
RUN pip install --no-cache-dir --require-hashes --only-binary=:all: --no-deps \
        -r requirements/image.txt
# Then the project itself (pyproject.toml names README.md as the long
# description), adding nothing to the lock and built by the lock's setuptools
# (--no-build-isolation: no unpinned build backend); `pip check` fails the build if a
# dependency of the project or of a locked package is missing or at a version
# it refuses (the extras' are checked by tests/test_packaging.py).
COPY pyproject.toml README.md ./
COPY wschat ./wschat
RUN pip install --no-cache-dir --no-deps --no-build-isolation /src \
    && pip check \
    && python -m compileall -q /opt/venv


FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime

ARG APP_UID=10001

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    METRICS_PORT=8081 \
    DATABASE_URL=sqlite:////data/wschat.db

RUN groupadd --system --gid "${APP_UID}" wschat \
    && useradd --system --uid "${APP_UID}" --gid wschat --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin wschat \
    && install -d -o "${APP_UID}" -g "${APP_UID}" -m 0750 /data

COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY gunicorn.conf.py ./

# With ENABLE_PERSISTENCE=true (and no other DATABASE_URL) the SQLite file lives
# here, writable by the user below; mount a volume to keep it across containers.
VOLUME ["/data"]

# Numeric so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001

EXPOSE 8080 8081

# Liveness of the chat port; the image carries no curl, Python does the GET.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8080'), timeout=4).status == 200 else 1)"]

# gunicorn runs as PID 1 (exec form, no shell in between), so it receives
# SIGTERM itself: it stops accepting, the app closes every WebSocket with 1001,
# and the workers exit within GRACEFUL_TIMEOUT (25 s by default).
STOPSIGNAL SIGTERM
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wschat:app"]
