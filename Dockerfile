# syntax=docker/dockerfile:1
# The relay in a container (docs/deploy.md, "Docker"):
#   docker build -t tornado-llm-relay .
#   docker run -p 8888:8888 -e RELAY_UPSTREAM=https://api.openai.com/v1 \
#              -e RELAY_API_KEYS=sk-... tornado-llm-relay
# Settings come from RELAY_* variables (docs/api.md); the robots from a relay.conf
# mounted at /srv/relay/conf/relay.conf (else the packaged one).

# Stage 1: the sdist, the wheel built from it (python -m build, as a release would), and
# wheels of its dependencies, so that the final stage installs files and needs no compiler.
FROM python:3.12-slim AS build
WORKDIR /src
RUN pip install --no-cache-dir "build>=1"
COPY . .
RUN python -m build --outdir /dist \
    && pip wheel --no-cache-dir --wheel-dir /wheels /dist/*.whl

# Stage 2: only the installed wheel; no source tree, no build tools.
FROM python:3.12-slim
# All addresses: the container's network namespace is the boundary, and a loopback-only
# relay would be unreachable. No .pyc at run time (site-packages is not the user's).
ENV RELAY_HOST=0.0.0.0 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The wheels are bind-mounted from the build stage, so no layer of the image keeps them.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels tornado-llm-relay \
    && groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin relay
WORKDIR /srv/relay
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
EXPOSE 8888
STOPSIGNAL SIGTERM
# Liveness only (Docker has no readiness); slim images have no curl, so Python's urllib.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RELAY_PORT', '8888'), timeout=4)"]
CMD ["tornado-llm-relay"]
