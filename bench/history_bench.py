"""Time GET /v1/history for one day of a device that sends a sample every second.

Starts its own TimescaleDB, Redis and service on loopback, stores
``--days`` days of 1 Hz samples for one device (and as many for
``--other-devices`` more, so the table is not trivially small), then asks
for one local day in each bucket width, ``--repeat`` times each. It prints
the median and 95th percentile over HTTP and of the same SQL run straight
through asyncpg, and their ratio.

    .venv/bin/python bench/history_bench.py
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import app as service  # noqa: E402
import devstack  # noqa: E402

DEVICE = "history-bench-0"
TOKEN = "history-bench-token-0123456789abcdef"
ZONE = ZoneInfo("Europe/Amsterdam")

# One row a second per device, counters rising by a watt-second each second.
FILL_SQL = """
INSERT INTO p1_samples
SELECT $1, ts, 500 + (extract(epoch FROM ts)::bigint % 300)::int, 500,
       1000 + extract(epoch FROM ts - $2) / 3600000.0 * 500, 0
FROM generate_series($2::timestamptz, $3::timestamptz - interval '1 second', interval '1 second') AS ts
"""


async def fill(dsn: str, start: datetime, days: int, other_devices: int) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        for index in range(other_devices + 1):
            await connection.execute(FILL_SQL, f"history-bench-{index}", start, start + timedelta(days=days))
        await connection.execute("ANALYZE p1_samples")
    finally:
        await connection.close()


def percentiles(durations: list[float]) -> tuple[float, float]:
    ordered = sorted(durations)
    return statistics.median(ordered), ordered[max(0, round(0.95 * len(ordered)) - 1)]


async def time_sql(dsn: str, day: datetime, bucket: str, repeat: int) -> list[float]:
    connection = await asyncpg.connect(dsn)
    query = service.SELECT_HISTORY_BY_DAY if bucket == "1d" else service.SELECT_HISTORY_BY_CLOCK
    durations = []
    try:
        for _ in range(repeat):
            started = time.perf_counter()
            await connection.fetch(
                query, DEVICE, day, day + timedelta(days=1), service.HISTORY_BUCKETS[bucket], ZONE.key,
            )
            durations.append(time.perf_counter() - started)
    finally:
        await connection.close()
    return durations


def time_http(url: str, day: datetime, bucket: str, repeat: int) -> tuple[list[float], int]:
    params = {"from": day.isoformat(), "to": (day + timedelta(days=1)).isoformat(), "bucket": bucket, "tz": ZONE.key}
    durations = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
        for _ in range(repeat):
            started = time.perf_counter()
            response = client.get("/v1/history", params=params)
            durations.append(time.perf_counter() - started)
            response.raise_for_status()
    return durations, response.json()["totals"]["samples"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=3, help="days of 1 Hz samples per device (default 3)")
    parser.add_argument("--other-devices", type=int, default=4, help="more devices with the same data (default 4)")
    parser.add_argument("--repeat", type=int, default=20, help="requests per bucket width (default 20)")
    arguments = parser.parse_args()

    first_day = datetime(2024, 10, 26, tzinfo=ZONE)
    measured_day = datetime(2024, 10, 27, tzinfo=ZONE)
    postgres = devstack.PostgresServer(devstack.make_temporary_directory("p1-history-bench-"))
    redis_server = devstack.RedisServer()
    postgres.start()
    try:
        redis_server.start()
        postgres.apply_schema()
        asyncio.run(fill(postgres.dsn, first_day, arguments.days, arguments.other_devices))
        environment = {
            "DATABASE_URL": postgres.dsn, "REDIS_URL": redis_server.url,
            "DEVICE_TOKENS": f"{TOKEN}:{DEVICE}", "LOG_LEVEL": "WARNING", "DB_TIMEOUT_S": "60",
        }
        log_dir = Path(tempfile.mkdtemp(prefix="p1-history-bench-log-"))
        api = devstack.ServiceProcess(environment, log_file=log_dir / "service.log", cwd=log_dir)
        api.start()
        try:
            print(f"one local day ({measured_day.date()}, 25 hours) of a 1 Hz device; "
                  f"{(arguments.other_devices + 1) * arguments.days * 86400:,} rows stored; "
                  f"{arguments.repeat} requests per row")
            print("| bucket | samples | HTTP p50 ms | HTTP p95 ms | SQL p50 ms | SQL p95 ms | HTTP/SQL p50 |")
            print("| --- | --- | --- | --- | --- | --- | --- |")
            for bucket in service.HISTORY_BUCKETS:
                http_times, samples = time_http(api.url, measured_day, bucket, arguments.repeat)
                sql_times = asyncio.run(time_sql(postgres.dsn, measured_day, bucket, arguments.repeat))
                http_p50, http_p95 = percentiles(http_times)
                sql_p50, sql_p95 = percentiles(sql_times)
                print(f"| {bucket} | {samples:,} | {http_p50 * 1000:.0f} | {http_p95 * 1000:.0f} | "
                      f"{sql_p50 * 1000:.0f} | {sql_p95 * 1000:.0f} | {http_p50 / sql_p50:.2f} |")
        finally:
            api.stop()
    finally:
        redis_server.stop()
        postgres.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
