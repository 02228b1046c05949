"""Ingest and read service for smart-meter samples read from the P1 port (DSMR).

Edge devices POST batches of samples with a Bearer token. The service checks
them, stores them idempotently in the TimescaleDB hypertable p1_samples and
deletes the Redis cache entry of the device's realtime view. Dashboards read
that realtime view, cached in Redis, and the history aggregated per bucket of
the local clock.

Run it with ``uvicorn --factory app:create_app_from_environment``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import logging
import operator
import os
import random
import re
import secrets
import sys
import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, available_timezones

import asyncpg
import msgspec
from dotenv import load_dotenv
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

logger = logging.getLogger("app")


# Settings

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# Device ids appear in Redis keys, logs and URLs, so they keep to a safe set.
# \Z, not $, because $ also matches before a trailing newline.
DEVICE_ID_REGEX = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
DEVICE_ID_RULE = "1 to 64 characters from A-Z, a-z, 0-9, '.', '_' and '-'"

# The token68 syntax of RFC 6750, the only form a Bearer header can carry.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
SHORT_TOKEN_LENGTH = 32

# Meters without a valid clock report their factory default of 2000-01-01,
# and edge devices without a clock start at 1970. No real sample is older.
MIN_SAMPLE_TS = datetime(2001, 1, 1, tzinfo=UTC)

# A 422 lists at most this many invalid samples, so an error body stays small.
MAX_REPORTED_ERRORS = 100

# History bucket widths. A response has at most MAX_HISTORY_BUCKETS buckets:
# 1m buckets cover up to 6.9 days, 1d buckets up to 27 years.
HISTORY_BUCKETS = {
    "1m": timedelta(minutes=1),
    "5m": timedelta(minutes=5),
    "15m": timedelta(minutes=15),
    "1h": timedelta(hours=1),
    "1d": timedelta(days=1),
}
MAX_HISTORY_BUCKETS = 10_000
DEFAULT_HISTORY_TZ = "Europe/Amsterdam"
# Query ranges stay well inside what Python's datetime and PostgreSQL's
# timestamptz hold in any time zone.
HISTORY_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
HISTORY_LATEST = datetime(9000, 1, 1, tzinfo=UTC)


class ConfigError(Exception):
    """A missing or malformed environment variable. The message never contains a secret."""


@dataclass(frozen=True)
class Settings:
    """Service configuration, read once at start-up."""

    database_url: str
    redis_url: str
    device_tokens: dict[str, str]
    cache_ttl_s: int = 5
    max_body_bytes: int = 2 * 1024 * 1024
    max_batch_samples: int = 10_000
    max_clock_skew_s: int = 900
    max_requests_per_device: int = 8
    db_pool_size: int = 10
    db_timeout_s: float = 5.0
    history_timeout_s: float = 30.0
    body_timeout_s: float = 60.0
    redis_timeout_s: float = 0.5
    retry_after_s: int = 5
    log_level: str = "INFO"


def parse_device_tokens(value: str) -> dict[str, str]:
    """Parse ``token:device_id`` pairs separated by commas into a token-to-device map."""
    tokens: dict[str, str] = {}
    positions: dict[str, int] = {}
    entries = [entry.strip() for entry in value.split(",")]
    if not any(entries):
        raise ConfigError("DEVICE_TOKENS contains no token:device_id entry")

    for position, entry in enumerate(entries, start=1):
        if not entry:
            continue
        where = f"DEVICE_TOKENS entry {position}"
        token, separator, device_id = (part.strip() for part in entry.partition(":"))
        if not separator:
            raise ConfigError(f"{where} has no ':' between the token and the device id")
        if not token:
            raise ConfigError(f"{where} has an empty token")
        if not device_id:
            raise ConfigError(f"{where} has an empty device id")
        if not TOKEN_PATTERN.fullmatch(token):
            raise ConfigError(
                f"{where} has a token with characters outside A-Z, a-z, 0-9 and '-._~+/' "
                "(with optional trailing '=')"
            )
        if ":" in device_id:
            raise ConfigError(f"{where} has more than one ':'; the format is token:device_id")
        if not DEVICE_ID_REGEX.match(device_id):
            # The entry may be malformed in a way that puts the token here, so it is not repeated.
            raise ConfigError(f"{where} has an invalid device id; a device id is {DEVICE_ID_RULE}")
        if token in tokens:
            raise ConfigError(f"{where} repeats the token of entry {positions[token]}")
        tokens[token] = device_id
        positions[token] = position
    return tokens


def read_int(environ: dict[str, str], name: str, default: int, minimum: int, maximum: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    # int() would also take "1_000" and digits of other scripts.
    value = int(raw) if raw.isascii() and raw.isdigit() else None
    if value is None or not minimum <= value <= maximum:
        raise ConfigError(f"{name} must be an integer from {minimum} to {maximum}, got {raw!r}")
    return value


def read_seconds(environ: dict[str, str], name: str, default: float, minimum: float = 0.01) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not minimum <= value <= 3600:
        raise ConfigError(f"{name} must be a number of seconds from {minimum} to 3600, got {raw!r}")
    return value


def read_url(environ: dict[str, str], name: str, schemes: tuple[str, ...]) -> str:
    value = environ.get(name, "").strip()
    if not value:
        raise ConfigError(f"{name} is required but not set or empty")
    # The URL may carry a password, so no message repeats it.
    if not value.startswith(schemes):
        raise ConfigError(f"{name} must start with one of {', '.join(schemes)}")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - urlsplit checks the port only when it is read.
    except ValueError:
        raise ConfigError(f"{name} is not a valid URL: check its host and port") from None
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"{name} has no host name")
    return value


def read_log_level(environ: dict[str, str]) -> str:
    level = environ.get("LOG_LEVEL", "INFO").strip().upper() or "INFO"
    if level not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return level


def load_settings(environ: dict[str, str]) -> Settings:
    """Build Settings from environment variables. Raises ConfigError on any bad value."""
    database_url = read_url(environ, "DATABASE_URL", ("postgresql://", "postgres://"))
    redis_url = read_url(environ, "REDIS_URL", ("redis://", "rediss://", "unix://"))
    if not environ.get("DEVICE_TOKENS", "").strip():
        raise ConfigError("DEVICE_TOKENS is required but not set or empty")

    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        device_tokens=parse_device_tokens(environ["DEVICE_TOKENS"]),
        cache_ttl_s=read_int(environ, "CACHE_TTL_S", Settings.cache_ttl_s, 0, 86_400),
        max_body_bytes=read_int(environ, "MAX_BODY_BYTES", Settings.max_body_bytes, 1024, 1024**3),
        max_batch_samples=read_int(environ, "MAX_BATCH_SAMPLES", Settings.max_batch_samples, 1, 1_000_000),
        max_clock_skew_s=read_int(environ, "MAX_CLOCK_SKEW_S", Settings.max_clock_skew_s, 0, 86_400),
        max_requests_per_device=read_int(
            environ, "MAX_REQUESTS_PER_DEVICE", Settings.max_requests_per_device, 1, 10_000,
        ),
        db_pool_size=read_int(environ, "DB_POOL_SIZE", Settings.db_pool_size, 1, 1000),
        db_timeout_s=read_seconds(environ, "DB_TIMEOUT_S", Settings.db_timeout_s),
        history_timeout_s=read_seconds(environ, "HISTORY_TIMEOUT_S", Settings.history_timeout_s),
        body_timeout_s=read_seconds(environ, "BODY_TIMEOUT_S", Settings.body_timeout_s, 1),
        redis_timeout_s=read_seconds(environ, "REDIS_TIMEOUT_S", Settings.redis_timeout_s),
        retry_after_s=read_int(environ, "RETRY_AFTER_S", Settings.retry_after_s, 1, 3600),
        log_level=read_log_level(environ),
    )


# Types

Int32 = Annotated[int, msgspec.Meta(ge=INT32_MIN, le=INT32_MAX)]
PowerW = Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]
# 1 TWh is far beyond any meter's register, and the bound keeps sums of
# counter differences finite.
EnergyKwh = Annotated[float, msgspec.Meta(ge=0, le=1e9)]
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]


class Sample(msgspec.Struct, gc=False):
    """One meter reading as the edge device uploads it. Unknown fields are ignored."""

    # Checked against DEVICE_ID_REGEX only where it differs from the token's
    # device, whose id the configuration already checked: a regex per sample
    # took two thirds of the decoding time.
    device_id: str
    ts: AwareDatetime
    power_w: Int32
    import_power_w: PowerW
    energy_import_kwh: EnergyKwh | None = None
    energy_export_kwh: EnergyKwh | None = None


class Batch(msgspec.Struct):
    samples: list[Sample]


class RawBatch(msgspec.Struct):
    """A batch whose samples are still undecoded JSON, to report every invalid one."""

    samples: list[msgspec.Raw]


BATCH_DECODER = msgspec.json.Decoder(Batch)
RAW_BATCH_DECODER = msgspec.json.Decoder(RawBatch)
SAMPLE_DECODER = msgspec.json.Decoder(Sample)


class LatestSample(msgspec.Struct):
    """A device's latest stored sample: the realtime view, and what Redis caches of it."""

    ts: datetime
    power_w: int
    import_power_w: int
    energy_import_kwh: float | None
    energy_export_kwh: float | None


LATEST_SAMPLE_DECODER = msgspec.json.Decoder(LatestSample)


class TokenMap:
    """Bearer tokens of the edge devices, looked up in constant time.

    The dict is keyed by the SHA-256 digest of each token, so a lookup's timing
    reveals nothing about a token's characters, and secrets.compare_digest
    confirms the match.
    """

    def __init__(self, tokens: dict[str, str]):
        self._by_digest = {
            hashlib.sha256(token.encode()).digest(): (token.encode(), device_id)
            for token, device_id in tokens.items()
        }

    def __len__(self) -> int:
        return len(self._by_digest)

    def device_for(self, token: str) -> str | None:
        presented = token.encode()
        entry = self._by_digest.get(hashlib.sha256(presented).digest())
        if entry is None or not secrets.compare_digest(entry[0], presented):
            return None
        return entry[1]


class ApiError(Exception):
    """An error that becomes a JSON response with its status code."""

    def __init__(
        self,
        status_code: int,
        message: str,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        **fields: Any,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.errors = errors
        self.headers = headers
        self.fields = fields


# SQL

# Created once per connection, outside any transaction, so a rolled-back batch
# cannot take it away. ON COMMIT DELETE ROWS empties it at every commit, and a
# rollback discards the rows of the failed batch, so no row reaches the next
# request on the same pooled connection.
CREATE_STAGING_TABLE = """
CREATE TEMPORARY TABLE IF NOT EXISTS p1_staging (
    ts                TIMESTAMPTZ      NOT NULL,
    power_w           INTEGER          NOT NULL,
    import_power_w    INTEGER          NOT NULL,
    energy_import_kwh DOUBLE PRECISION,
    energy_export_kwh DOUBLE PRECISION
) ON COMMIT DELETE ROWS
"""

# A batch belongs to one device, so rows carry no device id: it goes once, as $1.
ROW_COLUMNS = ("ts", "power_w", "import_power_w", "energy_import_kwh", "energy_export_kwh")

# Concurrent batches that insert the same keys in different orders wait on
# each other's uncommitted rows and deadlock, so both write paths insert in
# ts order.
INSERT_FROM_STAGING = """
INSERT INTO p1_samples (device_id, ts, power_w, import_power_w, energy_import_kwh, energy_export_kwh)
SELECT $1::text, ts, power_w, import_power_w, energy_import_kwh, energy_export_kwh
FROM p1_staging
ORDER BY ts
ON CONFLICT (device_id, ts) DO NOTHING
"""

# One statement that takes a batch as one array per column. asyncpg prepares
# it once per connection, so a batch costs one statement, where the COPY path
# costs four: BEGIN, COPY, INSERT and COMMIT. A single statement is atomic, so
# a batch is still stored whole or not at all.
INSERT_FROM_ARRAYS = """
INSERT INTO p1_samples (device_id, ts, power_w, import_power_w, energy_import_kwh, energy_export_kwh)
SELECT $1::text, ts, power_w, import_power_w, energy_import_kwh, energy_export_kwh
FROM unnest($2::timestamptz[], $3::integer[], $4::integer[], $5::float8[], $6::float8[])
    AS batch (ts, power_w, import_power_w, energy_import_kwh, energy_export_kwh)
ORDER BY ts
ON CONFLICT (device_id, ts) DO NOTHING
"""

# Batches of up to this many rows go through INSERT_FROM_ARRAYS, larger ones
# through COPY and the staging table. In bench/ingest_bench.py on 2 cores with
# fsync on (BENCHMARKS.md), the single statement stored 1.8 to 2.3 times the
# batches per second of COPY at 10 rows and 1.1 to 1.5 times at 200 rows with
# 32 uploaders. At 500 rows neither was ahead in every run, and from 1,000
# rows on COPY was.
MAX_ROWS_PER_INSERT = 200

SELECT_HYPERTABLE = """
SELECT count(*)
FROM timescaledb_information.hypertables
WHERE hypertable_name = 'p1_samples'
"""

SELECT_LATEST_SAMPLE = """
SELECT ts, power_w, import_power_w, energy_import_kwh, energy_export_kwh
FROM p1_samples
WHERE device_id = $1
ORDER BY ts DESC
LIMIT 1
"""


def counter_buckets(column: str) -> str:
    """SQL for the energy per bucket from one cumulative counter.

    Each reading adds its difference from the reading before it, or its whole
    value when the counter went down (a replaced meter counts from zero).
    The two readings before the range and the first after it have no bucket
    but take part, so the energy up to the first reading in the range is
    booked in the first bucket. A single reading outside the span of its
    two neighbours, while they are in order, is dropped: a telegram damaged
    on the serial line would otherwise count as a meter replacement.
    numeric makes the differences of the float readings exact.
    """
    return f"""
{column}_readings AS (
    (SELECT ts, NULL::timestamptz AS bucket, {column}::numeric AS kwh
     FROM p1_samples
     WHERE device_id = $1 AND ts < $2 AND {column} IS NOT NULL
     ORDER BY ts DESC
     LIMIT 2)
    UNION ALL
    SELECT ts, bucket, {column}::numeric FROM in_range WHERE {column} IS NOT NULL
    UNION ALL
    (SELECT ts, NULL::timestamptz, {column}::numeric
     FROM p1_samples
     WHERE device_id = $1 AND ts >= $3 AND {column} IS NOT NULL
     ORDER BY ts
     LIMIT 1)
),
{column}_kept AS (
    SELECT ts, bucket, kwh
    FROM (SELECT ts, bucket, kwh,
                 lag(kwh) OVER (ORDER BY ts) AS before_kwh,
                 lead(kwh) OVER (ORDER BY ts) AS after_kwh
          FROM {column}_readings) AS neighbours
    WHERE NOT coalesce(before_kwh <= after_kwh AND (kwh < before_kwh OR kwh > after_kwh), FALSE)
),
{column}_buckets AS (
    SELECT bucket, sum(CASE WHEN kwh < previous_kwh THEN kwh ELSE coalesce(kwh - previous_kwh, 0) END) AS kwh
    FROM (SELECT bucket, kwh, lag(kwh) OVER (ORDER BY ts) AS previous_kwh FROM {column}_kept) AS steps
    WHERE bucket IS NOT NULL
    GROUP BY bucket
)"""


# $1 device id, $2 from, $3 to, $4 bucket width, $5 time zone. The bucket of
# each sample is computed once, in in_range, because the time zone
# conversion is the most expensive step per row.
SELECT_HISTORY_TEMPLATE = f"""
WITH in_range AS MATERIALIZED (
    SELECT ts, {{bucket}} AS bucket, power_w, import_power_w, energy_import_kwh, energy_export_kwh
    FROM p1_samples
    WHERE device_id = $1 AND ts >= $2 AND ts < $3
),
{counter_buckets("energy_import_kwh")},
{counter_buckets("energy_export_kwh")},
power_buckets AS (
    SELECT bucket,
           count(*) AS samples,
           avg(power_w)::float8 AS power_w_avg,
           min(power_w) AS power_w_min,
           max(power_w) AS power_w_max,
           avg(import_power_w)::float8 AS import_power_w_avg
    FROM in_range
    GROUP BY bucket
)
SELECT power_buckets.*,
       energy_import_kwh_buckets.kwh::float8 AS energy_import_kwh,
       energy_export_kwh_buckets.kwh::float8 AS energy_export_kwh
FROM power_buckets
LEFT JOIN energy_import_kwh_buckets USING (bucket)
LEFT JOIN energy_export_kwh_buckets USING (bucket)
ORDER BY bucket
"""

# Days start at local midnight, so a day lasts 23 or 25 hours across a DST change.
SELECT_HISTORY_BY_DAY = SELECT_HISTORY_TEMPLATE.format(bucket="time_bucket($4::interval, ts, $5)")

# Shorter buckets start on the local clock at the UTC offset in force, so the
# hour that repeats when DST ends gives two buckets. time_bucket with a time
# zone (TimescaleDB 2.19) would put both in one bucket that starts after the
# first hour's samples.
LOCAL_OFFSET = "((ts AT TIME ZONE $5) - (ts AT TIME ZONE 'UTC'))"
SELECT_HISTORY_BY_CLOCK = SELECT_HISTORY_TEMPLATE.format(
    bucket=f"(time_bucket($4::interval, ts + {LOCAL_OFFSET}) - {LOCAL_OFFSET})"
)

# Errors that an operator has to fix: the schema is missing, or the database
# or its user named in DATABASE_URL does not exist. Uploads wait for the fix.
DATABASE_SETUP_ERRORS = (
    asyncpg.UndefinedTableError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.InvalidAuthorizationSpecificationError,
)

# Errors after which a retry can succeed: the server is down, restarting,
# overloaded or cut off, or the batch lost a deadlock.
TRANSIENT_DATABASE_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
)


# Helpers


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return msgspec.json.encode(content)


class RepeatFilter:
    """Let a repeated warning through once per interval and count the rest."""

    def __init__(self, interval_s: float = 60.0):
        self.interval_s = interval_s
        self.last_logged = -interval_s
        self.suppressed = 0

    def should_log(self) -> tuple[bool, int]:
        """Return whether to log now and how many repeats were suppressed before."""
        now = time.monotonic()
        if now - self.last_logged < self.interval_s:
            self.suppressed += 1
            return False, 0
        suppressed, self.suppressed, self.last_logged = self.suppressed, 0, now
        return True, suppressed


def error_response(error: ApiError) -> JSONResponse:
    body: dict[str, Any] = {"error": error.message, **error.fields}
    if error.errors is not None:
        body["errors"] = error.errors
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


def service_unavailable(settings: Settings, message: str) -> ApiError:
    """Build a 503 whose Retry-After is jittered, so that a fleet does not retry in step."""
    retry_after = settings.retry_after_s + random.randint(0, settings.retry_after_s)
    return ApiError(503, message, headers={"Retry-After": str(retry_after)})


def content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than {limit} bytes", max_body_bytes=limit)


class GzipReader:
    """Inflate a gzip body chunk by chunk and stop once it passes the limit.

    A body of several gzip members, which gzip(1) writes when files are
    concatenated, is inflated member after member. Zero bytes after the last
    member are padding, which gzip(1) also ignores.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.size = 0
        self.inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        self.in_padding = False

    def feed(self, data: bytes) -> bytes:
        output = []
        while data:
            if self.in_padding:
                if data.strip(b"\0"):
                    raise ApiError(400, "request body has data after the zero padding of its gzip stream")
                break
            try:
                chunk = self.inflater.decompress(data, self.limit + 1 - self.size)
            except zlib.error:
                raise ApiError(400, "request body is not valid gzip") from None
            self.size += len(chunk)
            if self.size > self.limit or self.inflater.unconsumed_tail:
                raise too_large(self.limit)
            output.append(chunk)
            data = self.inflater.unused_data if self.inflater.eof else b""
            if data and data.strip(b"\0"):
                self.inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            elif data:
                self.in_padding = True
        return b"".join(output)

    def finish(self) -> None:
        if not self.inflater.eof:
            raise ApiError(400, "request body is a truncated gzip stream")


def content_encoding(request: Request) -> str:
    """Return "gzip" or "identity" from the Content-Encoding headers. Raises a 415 ApiError otherwise."""
    codings = [
        coding.strip().lower()
        for value in request.headers.getlist("content-encoding")
        for coding in value.split(",")
    ]
    codings = [coding for coding in codings if coding not in ("", "identity")]
    if not codings:
        return "identity"
    # The HTTP content coding registry lists x-gzip as a deprecated alias of gzip.
    if codings in (["gzip"], ["x-gzip"]):
        return "gzip"
    raise ApiError(
        415, f"unsupported Content-Encoding {', '.join(codings)!r}: send identity or a single gzip",
        supported_encodings=["identity", "gzip"],
    )


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """Read the request body, inflating gzip, and never hold more than ``limit`` bytes of it.

    A body that takes longer than ``timeout_s`` gets a 408, so that a slow
    sender cannot hold a connection and its buffered bytes for ever.
    """
    gzip = GzipReader(limit) if content_encoding(request) == "gzip" else None
    declared = content_length(request)
    if declared is not None and declared > limit:
        raise too_large(limit)

    received = 0
    chunks = []
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise too_large(limit)
                chunks.append(gzip.feed(chunk) if gzip else chunk)
    except TimeoutError:
        raise ApiError(408, f"request body not received within {timeout_s:g} s", body_timeout_s=timeout_s) from None
    if gzip:
        gzip.finish()
    return b"".join(chunks)


def validation_error_entry(index: int | None, error: msgspec.DecodeError) -> dict[str, Any]:
    """Turn a msgspec error such as "Expected `int`, got `str` - at `$.power_w`" into a dict."""
    message, _, path = str(error).partition(" - at ")
    field = None
    match = re.search(r"\$\.(\w+)", path) or re.search(r"required field `(\w+)`", message)
    if match:
        field = match.group(1)
    return {"index": index, "field": field, "message": message}


def decode_batch(body: bytes, settings: Settings) -> list[Sample]:
    """Decode a JSON batch. Raises a 422 ApiError that lists every invalid sample."""
    try:
        return decode_samples(body, settings)
    except RecursionError:
        # msgspec stops at Python's recursion limit, about 1,000 levels of nesting.
        raise ApiError(422, "request body is nested too deeply") from None


def decode_samples(body: bytes, settings: Settings) -> list[Sample]:
    try:
        samples = BATCH_DECODER.decode(body).samples
    except msgspec.DecodeError:
        samples = None
    if samples is not None:
        check_batch_size(len(samples), settings)
        return samples

    # The fast path failed: decode again, one sample at a time, to find every error.
    try:
        raw_samples = RAW_BATCH_DECODER.decode(body).samples
    except msgspec.ValidationError as error:
        entry = validation_error_entry(None, error)
        raise ApiError(422, f"invalid batch: {entry['message']}", [entry]) from None
    except msgspec.DecodeError as error:
        raise ApiError(422, f"request body is not valid JSON: {error}") from None
    check_batch_size(len(raw_samples), settings)

    errors = []
    latest = latest_plausible_ts(settings)
    for index, raw in enumerate(raw_samples):
        try:
            sample = SAMPLE_DECODER.decode(raw)
        except msgspec.DecodeError as error:
            # A ValidationError names its field. Invalid UTF-8 in a string is a DecodeError.
            errors.append(validation_error_entry(index, error))
            continue
        if not DEVICE_ID_REGEX.match(sample.device_id):
            errors.append(device_id_error(index))
        entry = time_error(index, sample, latest)
        if entry:
            errors.append(entry)
    raise invalid_samples(errors, len(raw_samples))


def check_batch_size(count: int, settings: Settings) -> None:
    if count == 0:
        entry = {"index": None, "field": "samples", "message": "Expected at least one sample"}
        raise ApiError(422, "invalid batch: samples is empty", [entry])
    if count > settings.max_batch_samples:
        raise ApiError(
            413, f"batch has {count} samples, more than the limit of {settings.max_batch_samples}",
            max_batch_samples=settings.max_batch_samples,
        )


def latest_plausible_ts(settings: Settings) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=settings.max_clock_skew_s)


def time_error(index: int, sample: Sample, latest: datetime) -> dict[str, Any] | None:
    """Return an error entry if the sample's time is implausible, else None."""
    if sample.ts < MIN_SAMPLE_TS:
        message = "Expected a time after 2001-01-01T00:00:00Z; the meter clock is not set"
        return {"index": index, "field": "ts", "message": message}
    if sample.ts > latest:
        message = "Expected a time no further ahead of the server clock than MAX_CLOCK_SKEW_S"
        return {"index": index, "field": "ts", "message": message, "latest_allowed": latest.isoformat()}
    return None


def invalid_samples(errors: list[dict[str, Any]], total: int) -> ApiError:
    invalid = len({entry["index"] for entry in errors})
    return ApiError(
        422,
        f"invalid batch: {invalid} of {total} samples are invalid; nothing was stored",
        errors[:MAX_REPORTED_ERRORS],
        invalid_samples=invalid,
        errors_truncated=len(errors) > MAX_REPORTED_ERRORS,
    )


def check_samples(samples: list[Sample], device_id: str, settings: Settings) -> None:
    """Reject a batch with a sample of another device (403), or an invalid device id or time (422)."""
    others = [(index, sample) for index, sample in enumerate(samples) if sample.device_id != device_id]
    foreign = [
        {"index": index, "field": "device_id", "message": f"Expected {device_id!r}, the token's device"}
        for index, sample in others
        if DEVICE_ID_REGEX.match(sample.device_id)
    ]
    if foreign:
        raise ApiError(
            403, f"{len(foreign)} samples belong to another device than the token's; nothing was stored",
            foreign[:MAX_REPORTED_ERRORS],
        )

    latest = latest_plausible_ts(settings)
    errors = [device_id_error(index) for index, _ in others]
    stamps = [sample.ts for sample in samples]
    if stamps and (min(stamps) < MIN_SAMPLE_TS or max(stamps) > latest):
        errors += [entry for index, sample in enumerate(samples) if (entry := time_error(index, sample, latest))]
    if errors:
        errors.sort(key=lambda entry: entry["index"])
        raise invalid_samples(errors, len(samples))


def device_id_error(index: int) -> dict[str, Any]:
    return {"index": index, "field": "device_id", "message": f"Expected {DEVICE_ID_RULE}"}


def batch_rows(samples: list[Sample]) -> list[tuple]:
    """Return one row per timestamp, with values in ROW_COLUMNS order. The first sample of a timestamp wins."""
    rows = [
        (sample.ts, sample.power_w, sample.import_power_w, sample.energy_import_kwh, sample.energy_export_kwh)
        for sample in samples
    ]
    # Edge devices send samples in time order, so checking that order is the
    # usual path: 100 µs per 1,000 new samples against 363 µs for hashing every
    # timestamp (measured), because an aware datetime converts itself to UTC to hash.
    stamps = [row[0] for row in rows]
    if all(map(operator.lt, stamps, itertools.islice(stamps, 1, None))):
        return rows
    first = {}
    for row in rows:
        first.setdefault(row[0], row)
    return list(first.values())


async def prepare_connection(connection: asyncpg.Connection) -> None:
    await connection.execute(CREATE_STAGING_TABLE)


async def skip_session_reset(connection: asyncpg.Connection) -> None:
    """Release a pooled connection without asyncpg's reset query.

    asyncpg rolls back an open transaction before it calls this. The default
    reset adds a round trip per request to drop session state (settings,
    cursors, LISTEN, advisory locks) that this service never creates.
    """


@contextlib.asynccontextmanager
async def connection_from(pool: asyncpg.Pool, timeout_s: float):
    """Acquire a pooled connection, and drop it with a ConnectionResetError when asyncpg loses track of it.

    When the server ends a session between two statements
    (pg_terminate_backend, a restart), asyncpg can raise an InternalClientError
    or InterfaceError about its own protocol state ("another operation is in
    progress") instead of a connection error, sometimes before it notices the
    closed socket. The connection is unusable then, and a retry on a new one
    succeeds. asyncpg's client-side DataError, an InterfaceError and a
    ValueError, means a value it cannot encode, which a retry cannot fix, so
    it passes unchanged.
    """
    # run_database bounds the whole operation, so the acquire needs no timeout
    # of its own, which asyncpg would implement with one more task.
    async with pool.acquire() as connection:
        try:
            yield connection
        except ValueError:
            raise
        except (asyncpg.InterfaceError, asyncpg.InternalClientError) as error:
            connection.terminate()
            raise ConnectionResetError(f"database connection lost its protocol state: {error}") from error


async def write_rows(pool: asyncpg.Pool, device_id: str, rows: list[tuple], timeout_s: float) -> int:
    """Store rows atomically and return how many were new, by the faster path for the batch's size."""
    if len(rows) <= MAX_ROWS_PER_INSERT:
        return await insert_rows(pool, device_id, rows, timeout_s)
    return await copy_rows(pool, device_id, rows, timeout_s)


async def insert_rows(pool: asyncpg.Pool, device_id: str, rows: list[tuple], timeout_s: float) -> int:
    """Store rows with one INSERT ... SELECT FROM unnest statement and return how many were new."""
    if not rows:
        return 0
    columns = list(zip(*rows, strict=True))
    async with connection_from(pool, timeout_s) as connection:
        status = await connection.execute(INSERT_FROM_ARRAYS, device_id, *columns)
    return int(status.rsplit(" ", 1)[1])


async def copy_rows(pool: asyncpg.Pool, device_id: str, rows: list[tuple], timeout_s: float) -> int:
    """COPY rows into the staging table, insert them from there in one transaction and return how many were new."""
    async with connection_from(pool, timeout_s) as connection, connection.transaction():
        await connection.copy_records_to_table("p1_staging", records=rows, columns=ROW_COLUMNS)
        status = await connection.execute(INSERT_FROM_STAGING, device_id)
    return int(status.rsplit(" ", 1)[1])


def is_transient(error: BaseException) -> bool:
    """Return whether the error, or an error it was raised while handling, can pass on a retry.

    When the connection drops inside a transaction, asyncpg raises an
    InterfaceError from the transaction's exit while handling the lost
    connection, so the chain has to be followed.
    """
    while error is not None:
        if isinstance(error, TRANSIENT_DATABASE_ERRORS):
            return True
        error = error.__cause__ or error.__context__
    return False


async def run_database(request: Request, operation, device_id: str | None = None, timeout_s: float | None = None):
    """Await a database operation and raise a 503 ApiError if it fails transiently or is too slow.

    The operation runs as its own task. When it takes longer than
    ``timeout_s`` (DB_TIMEOUT_S by default), the request gets its 503 at once
    and the task is cancelled in the background. A cancelled transaction
    rolls back, and a batch that commits anyway is a duplicate that the
    retry skips. Warnings are logged once a minute at most, with a count of
    the ones left out, because an outage fails every request.
    """
    state = request.app.state
    settings: Settings = state.settings
    timeout_s = timeout_s or settings.db_timeout_s
    # asyncio.wait neither cancels the task on timeout nor wraps it in another
    # task, as wait_for(shield()) would on every request.
    task = asyncio.ensure_future(operation)
    done, _ = await asyncio.wait((task,), timeout=timeout_s)
    if not done:
        task.cancel()
        state.background_tasks.add(task)
        task.add_done_callback(state.background_tasks.discard)
        log_database_problem(state, "database timed out after %.1f s device=%s", timeout_s, device_id)
        raise service_unavailable(settings, "database timed out; retry later")
    try:
        return task.result()
    except (*TRANSIENT_DATABASE_ERRORS, asyncpg.InterfaceError, asyncpg.InternalClientError) as error:
        if not is_transient(error):
            raise
        log_database_problem(state, "database unavailable device=%s: %s: %s", device_id, type(error).__name__, error)
        raise service_unavailable(settings, "database unavailable; retry later") from None
    except DATABASE_SETUP_ERRORS as error:
        log_database_problem(
            state, "database rejected the service, check DATABASE_URL and apply schema.sql: %s: %s",
            type(error).__name__, error, level=logging.ERROR,
        )
        raise service_unavailable(settings, "database not set up for this service; retry later") from None


def log_database_problem(state, message: str, *args, level: int = logging.WARNING) -> None:
    should_log, suppressed = state.database_warnings.should_log()
    if should_log:
        logger.log(level, message + " (%d similar messages suppressed)", *args, suppressed)


async def call_cache(state, command, device_id: str, action: str):
    """Await a Redis command within REDIS_TIMEOUT_S. Return None if it fails, and log that.

    Redis is only a cache, so its failures never fail a request. The warning
    is logged once a minute at most, with a count of the ones left out.
    """
    try:
        async with asyncio.timeout(state.settings.redis_timeout_s):
            return await command
    except (RedisError, OSError, TimeoutError) as error:
        should_log, suppressed = state.redis_warnings.should_log()
        if should_log:
            logger.warning(
                "Redis cache %s failed device=%s: %s: %s (%d similar warnings suppressed)",
                action, device_id, type(error).__name__, error, suppressed,
            )
        return None


class CacheInvalidator:
    """Delete realtime cache keys, many keys to one Redis DEL.

    While one DEL is in flight, the keys of the batches that commit meanwhile
    wait and go out together in the next, so under load a DEL carries many
    keys and Redis costs a fraction of a command per batch. A key never joins
    a DEL that was sent before its batch committed, and delete() returns only
    after a DEL that contains the key has finished or failed, so a read after
    the upload's response never finds the view from before it. That wait is
    at most two DELs, each bounded by REDIS_TIMEOUT_S.
    """

    def __init__(self, state):
        self.state = state
        self.next_keys: dict[str, asyncio.Future] = {}
        self.flusher: asyncio.Task | None = None

    async def delete(self, key: str) -> None:
        done = self.next_keys.get(key)
        if done is None:
            done = self.next_keys[key] = asyncio.get_running_loop().create_future()
        if self.flusher is None:
            self.flusher = asyncio.ensure_future(self.flush())
        # A cancelled caller must not cancel the future that others wait on too.
        await asyncio.shield(done)

    async def flush(self) -> None:
        """Send DELs until no key waits. Every waiter is released, whatever happens to its DEL."""
        try:
            while self.next_keys:
                keys, self.next_keys = self.next_keys, {}
                devices = ",".join(key.removeprefix("realtime:") for key in keys)
                try:
                    await call_cache(self.state, self.state.redis.delete(*keys), devices[:200], "delete")
                finally:
                    release(keys)
        except Exception:
            logger.exception("Redis cache delete failed unexpectedly; the views expire after CACHE_TTL_S")
        finally:
            self.flusher = None
            release(self.next_keys)
            self.next_keys = {}


def release(waiters: dict[str, asyncio.Future]) -> None:
    for done in waiters.values():
        if not done.done():
            done.set_result(None)


async def invalidate_realtime(request: Request, device_id: str) -> None:
    """Delete the device's cached realtime view.

    The rows are already committed, so a cache outage must not fail the
    upload. A stale entry expires after CACHE_TTL_S seconds.
    """
    await request.app.state.cache_invalidator.delete(f"realtime:{device_id}")


async def read_cached_view(state, device_id: str) -> LatestSample | None:
    if state.settings.cache_ttl_s == 0:
        return None
    cached = await call_cache(state, state.redis.get(f"realtime:{device_id}"), device_id, "read")
    if cached is None:
        return None
    try:
        return LATEST_SAMPLE_DECODER.decode(cached)
    except msgspec.DecodeError as error:
        logger.warning("ignoring invalid cached realtime view device=%s: %s", device_id, error)
        return None


async def store_cached_view(state, device_id: str, latest: LatestSample) -> None:
    ttl_s = state.settings.cache_ttl_s
    if ttl_s == 0:
        return
    command = state.redis.set(f"realtime:{device_id}", msgspec.json.encode(latest), ex=ttl_s)
    await call_cache(state, command, device_id, "write")


async def fetch_latest(pool: asyncpg.Pool, device_id: str, timeout_s: float) -> LatestSample | None:
    async with connection_from(pool, timeout_s) as connection:
        row = await connection.fetchrow(SELECT_LATEST_SAMPLE, device_id)
    return None if row is None else LatestSample(**row)


def realtime_body(device_id: str, latest: LatestSample, source: str) -> dict[str, Any]:
    age_s = (datetime.now(UTC) - latest.ts).total_seconds()
    return {
        "device_id": device_id,
        **msgspec.structs.asdict(latest),
        "age_s": round(age_s, 3),
        "source": source,
    }


def query_value(request: Request, name: str, default: str | None = None) -> str | None:
    """Return a query parameter. Raises a 422 ApiError if it is given more than once."""
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise query_error(name, "is given more than once")
    return values[0] if values else default


def query_datetime(request: Request, name: str) -> datetime:
    """Parse an RFC 3339 query parameter with an offset. Raises a 422 ApiError."""
    value = query_value(request, name)
    if not value:
        raise query_error(name, "is required: an RFC 3339 time with an offset, e.g. 2024-03-31T00:00:00+01:00")
    # An unencoded '+' in a query string arrives as a space: read "...T00:00:00 01:00" as "+01:00".
    value = re.sub(r"(\d\d:\d\d(?::\d\d(?:\.\d+)?)?) (\d\d:\d\d)$", r"\1+\2", value)
    try:
        moment = msgspec.convert(value, AwareDatetime)
    except msgspec.ValidationError:
        raise query_error(
            name, f"must be an RFC 3339 time with an offset or Z, e.g. 2024-03-31T00:00:00+01:00; got {value!r}",
        ) from None
    if not HISTORY_EARLIEST <= moment <= HISTORY_LATEST:
        raise query_error(name, f"must lie between {HISTORY_EARLIEST.isoformat()} and {HISTORY_LATEST.isoformat()}")
    return moment


def query_error(name: str, message: str) -> ApiError:
    return ApiError(422, f"{name} {message}", [{"index": None, "field": name, "message": message}])


@functools.cache
def history_time_zones() -> frozenset[str]:
    """IANA zone names of the zone database, without the host-dependent ``localtime`` and ``Factory``."""
    return frozenset(available_timezones() - {"localtime", "Factory"})


def query_zone(request: Request) -> ZoneInfo:
    # Zone names contain no spaces, so a space is an unencoded '+', as in Etc/GMT+5.
    name = query_value(request, "tz", DEFAULT_HISTORY_TZ).replace(" ", "+")
    if name not in history_time_zones():
        raise query_error("tz", f"must be an IANA time zone such as Europe/Amsterdam; got {name[:64]!r}")
    return ZoneInfo(name)


def parse_history_query(request: Request) -> tuple[datetime, datetime, str, ZoneInfo]:
    """Read and check from, to, bucket and tz. Raises a 422 ApiError naming the parameter."""
    start = query_datetime(request, "from")
    end = query_datetime(request, "to")
    if start >= end:
        raise query_error("to", "must be later than from")

    bucket = query_value(request, "bucket", "1h")
    if bucket not in HISTORY_BUCKETS:
        raise query_error("bucket", f"must be one of {', '.join(HISTORY_BUCKETS)}; got {bucket[:16]!r}")
    zone = query_zone(request)

    # One more bucket than the plain quotient, for partial buckets at both ends and 23-hour days.
    buckets = (end - start) // HISTORY_BUCKETS[bucket] + 2
    if buckets > MAX_HISTORY_BUCKETS:
        raise query_error(
            "bucket", f"gives up to {buckets} buckets from {start.isoformat()} to {end.isoformat()}, "
            f"more than the maximum of {MAX_HISTORY_BUCKETS}: use a wider bucket or a shorter range",
        )
    return start, end, bucket, zone


async def fetch_history(pool, device_id, start, end, bucket, zone, timeout_s) -> list[asyncpg.Record]:
    query = SELECT_HISTORY_BY_DAY if bucket == "1d" else SELECT_HISTORY_BY_CLOCK
    async with connection_from(pool, timeout_s) as connection:
        return await connection.fetch(
            query, device_id, start, end, HISTORY_BUCKETS[bucket], zone.key, timeout=timeout_s,
        )


def history_bucket(row: asyncpg.Record, zone: ZoneInfo) -> dict[str, Any]:
    return {
        "start": row["bucket"].astimezone(zone).isoformat(),
        "samples": row["samples"],
        "power_w_avg": round(row["power_w_avg"], 3),
        "power_w_min": row["power_w_min"],
        "power_w_max": row["power_w_max"],
        "import_power_w_avg": round(row["import_power_w_avg"], 3),
        "energy_import_kwh": row["energy_import_kwh"],
        "energy_export_kwh": row["energy_export_kwh"],
    }


def energy_total(buckets: list[dict[str, Any]], field: str) -> float | None:
    values = [bucket[field] for bucket in buckets if bucket[field] is not None]
    return round(sum(values), 9) if values else None


# Endpoints


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def database_status(state) -> str:
    """Return "ok" when the database responds and p1_samples is a hypertable, else the problem."""
    settings: Settings = state.settings

    async def query() -> int:
        async with state.pool.acquire(timeout=settings.db_timeout_s) as connection:
            return await connection.fetchval(SELECT_HYPERTABLE)

    try:
        found = await asyncio.wait_for(query(), settings.db_timeout_s)
    except TimeoutError:
        return "timed out"
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        return f"unavailable: {type(error).__name__}"
    if not found:
        return "p1_samples is missing or not a hypertable; apply schema.sql"
    return "ok"


async def redis_status(state) -> str:
    try:
        await asyncio.wait_for(state.redis.ping(), state.settings.redis_timeout_s)
    except TimeoutError:
        return "timed out"
    except (RedisError, OSError) as error:
        return f"unavailable: {type(error).__name__}"
    return "ok"


async def ready(request: Request) -> JSONResponse:
    """Report whether the service can take data.

    Only the database decides the status code: without Redis, ingest still
    stores every batch and the realtime view reads the database, so taking a
    replica out of rotation for a cache outage would turn it into a full one.
    """
    state = request.app.state
    database, cache = await asyncio.gather(database_status(state), redis_status(state))
    is_ready = database == "ok"
    if not is_ready:
        should_log, suppressed = state.readiness_warnings.should_log()
        if should_log:
            logger.warning("not ready: database %s (%d similar warnings suppressed)", database, suppressed)
    body = {"status": "ready" if is_ready else "not ready", "database": database, "redis": cache}
    return JSONResponse(body, status_code=200 if is_ready else 503)


async def ingest(request: Request) -> JSONResponse:
    """Store a batch of samples of the token's device."""
    started = time.perf_counter()
    settings: Settings = request.app.state.settings
    device_id: str = request.state.device_id

    try:
        body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
    except ClientDisconnect:
        logger.info("client disconnected while sending a batch device=%s", device_id)
        return JSONResponse({"error": "client disconnected"}, status_code=400)
    samples = decode_batch(body, settings)
    check_samples(samples, device_id, settings)

    rows = batch_rows(samples)
    timeout_s = settings.db_timeout_s
    inserted = await run_database(request, write_rows(request.app.state.pool, device_id, rows, timeout_s), device_id)
    await invalidate_realtime(request, device_id)

    logger.info(
        "batch stored device=%s samples=%d inserted=%d duration_ms=%.1f",
        device_id, len(samples), inserted, (time.perf_counter() - started) * 1000,
    )
    return JSONResponse({"inserted": inserted, "received": len(samples)})


async def realtime(request: Request) -> JSONResponse:
    """Return the device's latest sample, from the Redis cache when it has one."""
    state = request.app.state
    device_id: str = request.state.device_id

    cached = await read_cached_view(state, device_id)
    if cached is not None:
        return JSONResponse(realtime_body(device_id, cached, "cache"))

    fetch = fetch_latest(state.pool, device_id, state.settings.db_timeout_s)
    latest = await run_database(request, fetch, device_id)
    if latest is None:
        raise ApiError(404, f"no samples stored for device {device_id!r}")
    await store_cached_view(state, device_id, latest)
    return JSONResponse(realtime_body(device_id, latest, "database"))


async def history(request: Request) -> JSONResponse:
    """Return the device's samples aggregated per bucket of the local clock."""
    state = request.app.state
    device_id: str = request.state.device_id
    start, end, bucket, zone = parse_history_query(request)

    timeout_s = state.settings.history_timeout_s
    fetch = fetch_history(state.pool, device_id, start, end, bucket, zone, timeout_s)
    try:
        rows = await run_database(request, fetch, device_id, timeout_s)
    except asyncpg.InvalidParameterValueError:
        # zoneinfo has the zone but the database's time zone data does not.
        raise query_error("tz", f"is not known to the database: {zone.key!r}") from None

    buckets = [history_bucket(row, zone) for row in rows]
    return JSONResponse({
        "device_id": device_id,
        "from": start.isoformat(),
        "to": end.isoformat(),
        "bucket": bucket,
        "tz": zone.key,
        "empty_buckets": "omitted",
        "buckets": buckets,
        "totals": {
            "samples": sum(entry["samples"] for entry in buckets),
            "energy_import_kwh": energy_total(buckets, "energy_import_kwh"),
            "energy_export_kwh": energy_total(buckets, "energy_export_kwh"),
        },
    })


# Middleware


def bearer_token(scope: dict) -> tuple[str | None, str]:
    """Return the token of the Authorization header, or None and the reason it is unusable."""
    values = [value for name, value in scope["headers"] if name == b"authorization"]
    if not values:
        return None, "missing Authorization header"
    if len(values) > 1:
        return None, "more than one Authorization header"

    parts = values[0].decode("latin-1").split(None, 1)
    if not parts or parts[0].lower() != "bearer":
        return None, "Authorization header must use the Bearer scheme"
    token = parts[1].strip() if len(parts) == 2 else ""
    if not token:
        return None, "Bearer token is empty"
    return token, ""


class BearerTokenMiddleware:
    """Authenticate requests under /v1/ by Bearer token and set request.state.device_id.

    A rejected request never reaches an endpoint, so it costs no database work.
    A device with MAX_REQUESTS_PER_DEVICE requests in progress gets 429 for the
    next, so that one token cannot hold every connection or the memory of many
    slow uploads.
    """

    def __init__(self, app, tokens: TokenMap, max_requests_per_device: int, prefix: str = "/v1/"):
        self.app = app
        self.tokens = tokens
        self.max_requests_per_device = max_requests_per_device
        self.prefix = prefix
        self.in_progress: dict[str, int] = {}
        self.warnings = RepeatFilter()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return

        token, reason = bearer_token(scope)
        device_id = self.tokens.device_for(token) if token else None
        if device_id is None:
            challenge = 'Bearer realm="p1"' if token is None else 'Bearer realm="p1", error="invalid_token"'
            response = JSONResponse(
                {"error": reason or "unknown token"}, status_code=401,
                headers={"WWW-Authenticate": challenge},
            )
            await response(scope, receive, send)
            return

        if self.in_progress.get(device_id, 0) >= self.max_requests_per_device:
            should_log, suppressed = self.warnings.should_log()
            if should_log:
                logger.warning(
                    "too many requests in progress device=%s limit=%d (%d similar warnings suppressed)",
                    device_id, self.max_requests_per_device, suppressed,
                )
            response = JSONResponse(
                {"error": f"more than {self.max_requests_per_device} requests of this device in progress; "
                          "retry after the others finish"},
                status_code=429, headers={"Retry-After": "1"},
            )
            await response(scope, receive, send)
            return

        scope.setdefault("state", {})["device_id"] = device_id
        self.in_progress[device_id] = self.in_progress.get(device_id, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress[device_id] -= 1
            if not self.in_progress[device_id]:
                del self.in_progress[device_id]


class InternalErrorMiddleware:
    """Respond to an unexpected exception with a JSON 500 and log its traceback with the device id."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        response_started = False

        async def send_and_track(message):
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, receive, send_and_track)
        except Exception:
            device_id = scope.get("state", {}).get("device_id")
            logger.exception("unexpected error device=%s %s %s", device_id, scope["method"], scope["path"])
            if not response_started:
                response = JSONResponse({"error": "internal server error"}, status_code=500)
                await response(scope, receive, send)


async def handle_api_error(request: Request, error: ApiError) -> JSONResponse:
    if error.status_code < 500:
        logger.info(
            "request rejected status=%d device=%s %s %s: %s",
            error.status_code, request.scope.get("state", {}).get("device_id"),
            request.method, request.url.path, error.message,
        )
    return error_response(error)


async def handle_http_exception(request: Request, error: HTTPException) -> JSONResponse:
    return JSONResponse({"error": error.detail}, status_code=error.status_code, headers=error.headers)


# Lifespan


@contextlib.asynccontextmanager
async def lifespan(app: Starlette):
    settings: Settings = app.state.settings
    # min_size=0 opens connections on demand, so the service starts and responds
    # with 503 while the database is still down, and recovers once it is up.
    app.state.pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=0,
        max_size=settings.db_pool_size,
        init=prepare_connection,
        reset=skip_session_reset,
        timeout=settings.db_timeout_s,
        command_timeout=settings.db_timeout_s,
    )
    # call_cache bounds every command with REDIS_TIMEOUT_S. A socket_timeout
    # would add redis-py's own wait_for, one more task, to every command.
    app.state.redis = Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_timeout_s,
        retry=Retry(NoBackoff(), 0),
    )
    app.state.redis_warnings = RepeatFilter()
    app.state.readiness_warnings = RepeatFilter()
    app.state.database_warnings = RepeatFilter()
    app.state.background_tasks = set()
    app.state.cache_invalidator = CacheInvalidator(app.state)
    logger.info(
        "service started: %d tokens, database pool of up to %d connections",
        len(app.state.tokens), settings.db_pool_size,
    )
    try:
        yield
    finally:
        await close_clients(app)
        logger.info("service stopped")


async def close_clients(app: Starlette) -> None:
    """Close the pool and the Redis client within a few seconds, even if the database hangs."""
    for task in list(app.state.background_tasks):
        task.cancel()
    # A container stop kills the process 10 s after SIGTERM, and a request may
    # already have waited DB_TIMEOUT_S (5 s by default), so the pool gets 2 s.
    try:
        await asyncio.wait_for(app.state.pool.close(), 2)
    except (TimeoutError, OSError, asyncpg.PostgresError) as error:
        logger.warning("database pool did not close cleanly, terminating it: %s", error)
        app.state.pool.terminate()
    flusher = app.state.cache_invalidator.flusher
    if flusher is not None:
        await asyncio.wait((flusher,), timeout=1)
    try:
        await asyncio.wait_for(app.state.redis.aclose(), 2)
    except (TimeoutError, RedisError, OSError) as error:
        logger.warning("Redis client did not close cleanly: %s", error)


# App


def create_app(settings: Settings) -> Starlette:
    tokens = TokenMap(settings.device_tokens)
    app = Starlette(
        routes=[
            Route("/", health, methods=["GET"]),
            Route("/ready", ready, methods=["GET"]),
            Route("/v1/ingest", ingest, methods=["POST"]),
            Route("/v1/realtime", realtime, methods=["GET"]),
            Route("/v1/history", history, methods=["GET"]),
        ],
        middleware=[
            Middleware(InternalErrorMiddleware),
            Middleware(BearerTokenMiddleware, tokens=tokens, max_requests_per_device=settings.max_requests_per_device),
        ],
        exception_handlers={ApiError: handle_api_error, HTTPException: handle_http_exception},
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.tokens = tokens
    return app


def warn_about_weak_tokens(settings: Settings) -> None:
    """Log a warning for short tokens. Neither warning names a device, which may be a swapped token."""
    pairs = settings.device_tokens.items()
    short = sum(1 for token, _ in pairs if len(token) < SHORT_TOKEN_LENGTH)
    if short:
        logger.warning(
            "%d of %d tokens in DEVICE_TOKENS are shorter than %d characters; make strong ones with: "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'",
            short, len(pairs), SHORT_TOKEN_LENGTH,
        )
    if any(len(device_id) > len(token) for token, device_id in pairs):
        logger.warning(
            "a device id in DEVICE_TOKENS is longer than its token: check that each entry is token:device_id"
        )


def create_app_from_environment() -> Starlette:
    """Build the app from the environment and a .env file in the working directory.

    Variables already in the environment win over the .env file. A bad value
    exits with status 2 and a message that names the variable.
    """
    load_dotenv(".env", override=False)
    try:
        settings = load_settings(dict(os.environ))
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    warn_about_weak_tokens(settings)
    return create_app(settings)
