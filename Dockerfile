# The ingest service: uvicorn on port 8000 as a non-root user.
# Every dependency ships as a binary wheel for CPython 3.12 on x86_64 and
# arm64, so the image needs no compiler.
FROM python:3.12.8-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin app

WORKDIR /app
COPY requirements.txt ./
RUN pip install --requirement requirements.txt
COPY app.py schema.sql ./

USER app
EXPOSE 8000
CMD ["uvicorn", "--factory", "app:create_app_from_environment", "--host", "0.0.0.0", "--port", "8000"]
