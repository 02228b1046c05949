# The ingest service: uvicorn on port 8000 as a non-root user, behind Caddy.
# NOTE: the tag is pinned, the digest is not; add @sha256:... after pulling
# the image once to make rebuilds byte-for-byte repeatable.
FROM python:3.12.8-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin app

WORKDIR /app
COPY requirements.txt ./
# Every dependency ships a binary wheel for CPython 3.12 on x86_64 and arm64.
# --only-binary makes a missing wheel fail the build instead of compiling from
# source, so the image never needs and never contains a compiler.
RUN pip install --only-binary=:all: --requirement requirements.txt
COPY app.py schema.sql ./

USER app
EXPOSE 8000

# /ready fails while the database is down or p1_samples is not a hypertable,
# so `docker compose ps` shows a half-initialized database as unhealthy.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]

# --proxy-headers takes the client address and the https scheme from Caddy's
# X-Forwarded-For and X-Forwarded-Proto, and only from the compose network
# 172.30.53.0/24 that compose.yaml fixes. No other network reaches port 8000,
# because compose.yaml publishes it nowhere. The keep-alive timeout outlasts
# the 60 s after which Caddy closes an idle upstream connection, so idle
# connections are closed by Caddy first: a POST that Caddy sends on a
# connection that uvicorn is closing would get a 502.
# --loop and --http are named so that an image without uvloop or httptools
# fails at start instead of falling back to asyncio and h11, the slowest pair
# in BENCHMARKS.md.
CMD ["uvicorn", "--factory", "app:create_app_from_environment", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers", "--forwarded-allow-ips", "172.30.53.0/24", "--timeout-keep-alive", "75", "--loop", "uvloop", "--http", "httptools"]
