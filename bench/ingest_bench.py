"""Measure the ingest service's throughput against the database's own ceiling, in one run.

The ceiling is app.write_rows called straight with an asyncpg pool: the
service's own SQL, without HTTP, JSON or validation. The service runs under
uvicorn on a loopback port and gets the same batches over HTTP/1.1 from
concurrent keep-alive uploaders. Both write into one durable TimescaleDB
(fsync on), started for the run, and every batch carries new rows, so the
ratio service/ceiling of each row of the tables compares equal work measured
minutes apart on the same machine.

    .venv/bin/python bench/ingest_bench.py                        # the full run
    .venv/bin/python bench/ingest_bench.py --prefill-rows 30000000  # and the growth check
    .venv/bin/python bench/ingest_bench.py --smoke                # a few seconds, for the tests

BENCHMARKS.md describes the sections and contains the results of a full run.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import uvloop

# The benchmark runs as a script from any directory and imports the service itself.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadgen import KeepAliveClient, Measurement, drive  # noqa: E402
from report import (  # noqa: E402
    Result,
    cpu_table,
    default_pairs,
    growth_table,
    pair_table,
    pairs,
    ratio,
    repeat_table,
    write_path_table,
)
from stack import CpuProbe, Service, describe_machine, postgres_pids, start_databases  # noqa: E402
from workload import Fleet, Work, encode_body, encode_work  # noqa: E402

import app  # noqa: E402

# Upper estimates of what the ceiling can reach on a small machine. They only
# size the pre-encoded batches of a measurement. A measurement that runs out
# of batches before its time is up ends early, and the results note it.
MAX_ROWS_PER_S = 300_000
MAX_BATCHES_PER_S = 8_000

# The service gets this many times the batches the ceiling completed, so it
# cannot run out unless it is faster than the ceiling by that factor.
SERVICE_BATCH_MARGIN = 1.5

# Batch sizes and uploader count of the experiment sections: the common case
# (a device every 10 s) and a large batch, both under full concurrency.
EXPERIMENT_BATCH_SIZES = (10, 1000)
EXPERIMENT_UPLOADERS = 32

# Devices of the run, each with a token in DEVICE_TOKENS. A full run sends
# about 70 million rows, one a second per device, so each of 256 devices
# covers about three days.
FLEET_DEVICES = 256

SERVER_VARIANTS = (("asyncio", "h11"), ("asyncio", "httptools"), ("uvloop", "h11"), ("uvloop", "httptools"))


@dataclass
class Options:
    seconds: float
    rounds: int
    warmup_batches: int
    batch_sizes: list[int]
    write_path_sizes: list[int]
    uploaders: list[int]
    pool_size: int
    sections: set[str]
    prefill_rows: int
    prefill_days: int
    prefill_devices: int
    pool_sizes: list[int]
    workers: list[int]
    server_variants: list[tuple[str, str]]
    experiment_batch_sizes: list[int]
    experiment_uploaders: int
    max_batch_samples: int
    device_prefix: str
    profile_dir: Path | None
    service_app_dir: Path | None = None


SECTIONS = ("cpu", "main", "memory", "write-path", "pool", "server", "workers", "growth")


# Write functions compared in the write-path section. The per-transaction
# staging table is the alternative design the service does not use, so it
# lives here, built from the service's own SQL.
CREATE_STAGING_PER_TRANSACTION = app.CREATE_STAGING_TABLE.replace("ON COMMIT DELETE ROWS", "ON COMMIT DROP")


async def write_rows_staging_per_transaction(pool: asyncpg.Pool, device_id: str, rows: list[tuple],
                                             timeout_s: float) -> int:
    async with pool.acquire(timeout=timeout_s) as connection, connection.transaction():
        await connection.execute(CREATE_STAGING_PER_TRANSACTION)
        await connection.copy_records_to_table("p1_staging", records=rows, columns=app.ROW_COLUMNS)
        status = await connection.execute(app.INSERT_FROM_STAGING, device_id)
    return int(status.rsplit(" ", 1)[1])


async def no_staging_table(connection: asyncpg.Connection) -> None:
    """Pool init of the per-transaction variant: its connections start without the staging table."""


# Write function, pool init and pool reset of each variant. The service's pool
# skips asyncpg's reset query (app.skip_session_reset); a reset of None is
# asyncpg's default, which sends that query on every release.
WRITE_PATHS = {
    "COPY, staging per connection": (app.copy_rows, app.prepare_connection, app.skip_session_reset),
    "COPY, staging per transaction": (write_rows_staging_per_transaction, no_staging_table, app.skip_session_reset),
    "INSERT ... unnest": (app.insert_rows, app.prepare_connection, app.skip_session_reset),
    "INSERT ... unnest, asyncpg reset query": (app.insert_rows, app.prepare_connection, None),
    "COPY, asyncpg reset query": (app.copy_rows, app.prepare_connection, None),
}


def ceiling_batches(batches: list[list[list[tuple]]]) -> list[list[tuple[str, list[tuple]]]]:
    """Turn row batches into the (device_id, rows) arguments of the write functions, before the timed part."""
    return [
        [(rows[0][0], [row[1:] for row in rows]) for rows in uploader_batches]
        for uploader_batches in batches
    ]


@dataclass
class Part:
    """One round of a measurement: the batches prepared, what the driver measured, the service's peak RSS."""

    work: Work
    measurement: Measurement
    peak_rss_kib: int | None = None


def merge_measurements(measurements: list[Measurement]) -> Measurement:
    """Add up rounds of one measurement: counts, timed seconds, latencies and CPU seconds."""
    merged = Measurement(rows_per_batch=measurements[0].rows_per_batch, uploaders=measurements[0].uploaders)
    for measurement in measurements:
        merged.batches_timed += measurement.batches_timed
        merged.seconds += measurement.seconds
        merged.rows_sent += measurement.rows_sent
        merged.inserted += measurement.inserted
        merged.errors += measurement.errors
        merged.latencies_s += measurement.latencies_s
        for group, seconds in measurement.cpu_s.items():
            merged.cpu_s[group] = merged.cpu_s.get(group, 0.0) + seconds
    return merged


class Bench:
    """The state of one run: the servers' addresses, the device fleet and the results so far."""

    def __init__(self, options: Options, dsn: str, redis_url: str, workdir: Path,
                 postgres_dir: Path | None = None, redis_pid: int | None = None):
        self.options = options
        # The CPU time of the database and Redis is known only for servers this run started.
        self.postgres_dir = postgres_dir
        self.redis_pid = redis_pid
        self.dsn = dsn
        self.redis_url = redis_url
        self.workdir = workdir
        self.results: list[Result] = []
        self.notes: list[str] = []
        self.failures: list[str] = []
        devices = max([*options.uploaders, options.experiment_uploaders, FLEET_DEVICES])
        # Far enough back that a run's samples (one a second per device) stay
        # behind the server clock, and recent enough to pass its plausibility check.
        self.start_ts = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=120)
        self.fleet = Fleet(options.device_prefix, devices, self.start_ts)
        self.connection: asyncpg.Connection | None = None
        self.services_started = 0
        self.app_digests: list[str] = []

    # Services

    def service_environment(self, pool_size: int) -> dict[str, str]:
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "DATABASE_URL": self.dsn,
            "REDIS_URL": self.redis_url,
            "DEVICE_TOKENS": self.fleet.device_tokens(),
            "DB_POOL_SIZE": str(pool_size),
            "MAX_BATCH_SAMPLES": str(self.options.max_batch_samples),
            # INFO logs a line per batch, so WARNING keeps that work out of the measurement.
            "LOG_LEVEL": "WARNING",
        }
        return environment

    def start_service(self, pool_size: int, workers: int = 1, loop: str = "auto", http: str = "auto") -> Service:
        # Other work in the same tree may change app.py during a long run, and the results then mix two versions.
        digest = hashlib.sha256(((self.options.service_app_dir or ROOT) / "app.py").read_bytes()).hexdigest()
        if self.app_digests and digest != self.app_digests[-1]:
            self.notes.append(f"app.py changed during the run, before service start {self.services_started + 1}")
        self.app_digests.append(digest)
        self.services_started += 1
        service = Service(
            self.workdir / f"service-{self.services_started}", self.service_environment(pool_size),
            workers=workers, loop=loop, http=http, app_dir=self.options.service_app_dir,
        )
        service.start()
        return service

    def stop_service(self, service: Service) -> None:
        service.stop()
        problems = service.log_problems()
        if problems:
            self.failures.append(f"service log has {len(problems)} warnings or errors, first: {problems[0]}")

    # Measurements

    def cpu_probe(self, service: Service | None = None) -> CpuProbe:
        groups = {"bench": lambda: [os.getpid()]}
        if self.postgres_dir:
            groups["postgres"] = lambda: postgres_pids(self.postgres_dir)
        if service is not None:
            groups["service"] = service.pids
            if self.redis_pid:
                groups["redis"] = lambda: [self.redis_pid]
        return CpuProbe(groups)

    def batches_per_uploader(self, batch_size: int, uploaders: int, limit: int | None = None) -> int:
        seconds = self.options.seconds
        total = min(math.ceil(seconds * MAX_ROWS_PER_S / batch_size), math.ceil(seconds * MAX_BATCHES_PER_S))
        if limit is not None:
            total = min(total, limit)
        return self.options.warmup_batches + max(2, math.ceil(total / uploaders))

    async def count_stored(self, work: Work) -> int:
        stored = 0
        for device_id, (first, last) in work.ranges.items():
            stored += await self.connection.fetchval(
                "SELECT count(*) FROM p1_samples WHERE device_id = $1 AND ts BETWEEN $2 AND $3",
                device_id, first, last,
            )
        return stored

    async def record(self, section: str, variant: str, target: str, parts: list[Part]) -> Result:
        """Merge the rounds of one measurement into a Result, check its counts and print it."""
        measurement = merge_measurements([part.measurement for part in parts])
        stored = sum([await self.count_stored(part.work) for part in parts])
        peaks = [part.peak_rss_kib for part in parts if part.peak_rss_kib]

        result = Result(
            section=section, variant=variant, target=target,
            batch_size=measurement.rows_per_batch, uploaders=measurement.uploaders,
            rows_per_s=measurement.rows_per_s, batches_per_s=measurement.batches_per_s,
            p50_ms=measurement.latency_ms(0.50), p99_ms=measurement.latency_ms(0.99),
            seconds=measurement.seconds, rows_sent=measurement.rows_sent, inserted=measurement.inserted,
            stored=stored, errors=len(measurement.errors),
            peak_rss_mib=max(peaks) / 1024 if peaks else None, cpu_s=measurement.cpu_s,
        )
        self.results.append(result)

        label = f"{section} | {variant} | {target} | batch {result.batch_size} x {result.uploaders} uploaders"
        print(
            f"  {label}: {result.rows_per_s:,.0f} rows/s, {result.batches_per_s:,.0f} batches/s, "
            f"p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, {result.seconds:.1f} s"
            + (f", peak RSS {result.peak_rss_mib:.0f} MiB" if result.peak_rss_mib else ""),
            flush=True,
        )
        if not result.counts_match:
            self.failures.append(
                f"{label}: sent {result.rows_sent}, inserted {result.inserted}, stored {result.stored}, "
                f"errors {measurement.errors[:3]}"
            )
        planned = self.options.seconds * len(parts)
        if target == "ceiling" and result.seconds < 0.8 * planned:
            self.notes.append(f"{label} ran out of batches after {result.seconds:.1f} of {planned:g} s")
        return result

    async def ceiling_part(self, batch_size: int, uploaders: int, pool_size: int, write, init, reset) -> Part:
        work = self.fleet.make_work(uploaders, batch_size, self.batches_per_uploader(batch_size, uploaders))
        timeout_s = 30.0
        # The service's pool settings (lifespan in app.py), except that every connection opens at once.
        pool = await asyncpg.create_pool(self.dsn, min_size=pool_size, max_size=pool_size, init=init, reset=reset)
        try:
            senders = [lambda batch: write(pool, batch[0], batch[1], timeout_s) for _ in range(uploaders)]
            measurement = await drive(
                senders, ceiling_batches(work.batches), batch_size, self.options.warmup_batches,
                self.options.seconds, self.cpu_probe(),
            )
        finally:
            await pool.close()
        self.fleet.rewind(work, measurement.sent_per_uploader)
        return Part(work, measurement)

    async def service_part(self, service: Service, batch_size: int, uploaders: int,
                           batch_limit: int | None = None) -> Part:
        per_uploader = self.batches_per_uploader(batch_size, uploaders, batch_limit)
        work = encode_work(self.fleet.make_work(uploaders, batch_size, per_uploader), self.fleet, "127.0.0.1")
        clients = [KeepAliveClient("127.0.0.1", service.port) for _ in range(uploaders)]
        for client in clients:
            await client.open()
        if not service.reset_peak_rss():
            self.notes.append("the kernel did not allow resetting VmHWM, so peak RSS is since the service started")
        try:
            measurement = await drive(
                [client.upload for client in clients], work.batches, batch_size,
                self.options.warmup_batches, self.options.seconds, self.cpu_probe(service),
            )
        finally:
            for client in clients:
                await client.close()
        self.fleet.rewind(work, measurement.sent_per_uploader)
        return Part(work, measurement, service.rss_kib("VmHWM"))

    async def measure_ceiling(self, section: str, variant: str, batch_size: int, uploaders: int,
                              pool_size: int, write=app.write_rows, init=app.prepare_connection,
                              reset=app.skip_session_reset) -> Result:
        parts = [
            await self.ceiling_part(batch_size, uploaders, pool_size, write, init, reset)
            for _ in range(self.options.rounds)
        ]
        return await self.record(section, variant, "ceiling", parts)

    async def measure_service(self, section: str, variant: str, service: Service, batch_size: int,
                              uploaders: int) -> Result:
        parts = [await self.service_part(service, batch_size, uploaders) for _ in range(self.options.rounds)]
        return await self.record(section, variant, "service", parts)

    async def compare_write_paths(self, batch_size: int, uploaders: int, pool_size: int) -> None:
        """Measure the ceiling of every write function, the functions taking turns round by round."""
        parts: dict[str, list[Part]] = {variant: [] for variant in WRITE_PATHS}
        for _ in range(self.options.rounds):
            for variant, (write, init, reset) in WRITE_PATHS.items():
                parts[variant].append(await self.ceiling_part(batch_size, uploaders, pool_size, write, init, reset))
        for variant, variant_parts in parts.items():
            await self.record("write path", variant, "ceiling", variant_parts)

    async def measure_pair(self, section: str, variant: str, service: Service, batch_size: int,
                           uploaders: int, pool_size: int) -> tuple[Result, Result]:
        """Measure ceiling and service in alternating rounds, so that a slow spell of the machine hits both."""
        ceiling_parts, service_parts = [], []
        for _ in range(self.options.rounds):
            part = await self.ceiling_part(batch_size, uploaders, pool_size, app.write_rows,
                                           app.prepare_connection, app.skip_session_reset)
            ceiling_parts.append(part)
            # Enough batches for the service to outrun the ceiling by SERVICE_BATCH_MARGIN.
            limit = math.ceil(part.measurement.batches_per_s * self.options.seconds * SERVICE_BATCH_MARGIN)
            service_parts.append(await self.service_part(service, batch_size, uploaders, limit + 2 * uploaders))
        ceiling = await self.record(section, variant, "ceiling", ceiling_parts)
        served = await self.record(section, variant, "service", service_parts)
        return ceiling, served

    # Sections

    def measure_cpu_stages(self) -> list[str]:
        """Time the service's per-batch CPU work in this process: decode, check, row building."""
        fleet = Fleet("cpu-", 1, self.start_ts)
        device = fleet.devices[0]
        settings = app.Settings(
            database_url="postgresql://unused", redis_url="redis://unused",
            device_tokens={device.token: device.device_id},
        )
        lines = [
            "| batch | body bytes | decode_batch µs | check_samples µs | batch_rows µs | total µs per sample |",
            "|---|---|---|---|---|---|",
        ]
        for batch_size in self.options.batch_sizes:
            body = encode_body(fleet.make_rows(device, batch_size))
            timings = [
                time_call(lambda body=body: app.decode_batch(body, settings)),
                time_on_new_samples(lambda samples: app.check_samples(samples, device.device_id, settings),
                                    body, settings),
                time_on_new_samples(app.batch_rows, body, settings),
            ]
            total = sum(timings) / batch_size
            lines.append(
                f"| {batch_size:,} | {len(body):,} | " + " | ".join(f"{value:,.1f}" for value in timings)
                + f" | {total:.2f} |"
            )
        print("\n".join(lines), flush=True)
        return lines

    async def measure_max_batch_memory(self, service: Service) -> list[str]:
        """Send maximum-size batches one at a time and report how far each raises the service's peak RSS.

        The service should be fresh: memory that CPython freed after larger
        loads stays mapped, so a warm process hides the growth.
        """
        size = self.options.max_batch_samples
        lines = ["| batch | body bytes | RSS before MiB | peak RSS MiB | growth MiB | growth / body |",
                 "|---|---|---|---|---|---|"]
        client = KeepAliveClient("127.0.0.1", service.port)
        await client.open()
        try:
            # Small batches first, so that the pool connection and the code paths are warm.
            small = encode_work(self.fleet.make_work(1, 10, 5), self.fleet, "127.0.0.1")
            for request in small.batches[0]:
                await client.upload(request)
            for _ in range(3):
                work = encode_work(self.fleet.make_work(1, size, 1), self.fleet, "127.0.0.1")
                request = work.batches[0][0]
                body_bytes = len(request) - request.index(b"\r\n\r\n") - 4
                before = service.rss_kib("VmRSS")
                service.reset_peak_rss()
                inserted = await client.upload(request)
                peak = service.rss_kib("VmHWM")
                growth = (peak - before) * 1024
                lines.append(
                    f"| {size:,} | {body_bytes:,} | {before / 1024:.1f} | {peak / 1024:.1f} | "
                    f"{growth / 2**20:.1f} | {growth / body_bytes:.1f} |"
                )
                stored = await self.count_stored(work)
                if not inserted == stored == size:
                    self.failures.append(f"maximum-size batch: sent {size}, inserted {inserted}, stored {stored}")
        finally:
            await client.close()
        print("\n".join(lines), flush=True)
        return lines

    async def prefill(self) -> str:
        """Insert pre-fill rows spread over many one-day chunks before the run's own samples."""
        options = self.options
        devices = options.prefill_devices
        rows_per_device = math.ceil(options.prefill_rows / devices)
        span_s = options.prefill_days * 86_400
        step_s = span_s / rows_per_device
        first = self.start_ts - timedelta(seconds=span_s)
        # One statement per slice of time, two at a time, because PostgreSQL runs a statement on one core.
        slices = max(2, options.prefill_days)
        per_slice = math.ceil(rows_per_device / slices)
        statement = """
            INSERT INTO p1_samples (device_id, ts, power_w, import_power_w, energy_import_kwh, energy_export_kwh)
            SELECT $1 || lpad((n % $2)::text, 4, '0'),
                   $3::timestamptz + (n / $2) * make_interval(secs => $4),
                   (n % 5000) - 1500, greatest((n % 5000) - 1500, 0), n / 1000.0, n / 2000.0
            FROM generate_series($5::bigint, $6::bigint) AS n
        """
        total = devices * rows_per_device
        queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        for index in range(slices):
            low = index * per_slice * devices
            high = min((index + 1) * per_slice * devices, total) - 1
            if low <= high:
                queue.put_nowait((low, high))
        started = time.perf_counter()

        async def insert_slices() -> None:
            connection = await asyncpg.connect(self.dsn)
            try:
                while not queue.empty():
                    low, high = queue.get_nowait()
                    await connection.execute(
                        statement, f"{options.device_prefix}fill-", devices, first, step_s, low, high,
                    )
            finally:
                await connection.close()

        await asyncio.gather(insert_slices(), insert_slices())
        inserted_s = time.perf_counter() - started
        # Leave no autovacuum or checkpoint of the pre-fill to run during the measurements.
        await self.connection.execute("VACUUM ANALYZE p1_samples")
        await self.connection.execute("CHECKPOINT")
        chunks = await self.connection.fetchval(
            "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = 'p1_samples'"
        )
        count = await self.connection.fetchval("SELECT count(*) FROM p1_samples")
        size = await self.connection.fetchval("SELECT hypertable_size('p1_samples')")
        summary = (
            f"pre-filled {total:,} rows of {devices} devices over {options.prefill_days} days "
            f"in {inserted_s:.0f} s, then VACUUM ANALYZE and CHECKPOINT ({time.perf_counter() - started:.0f} s "
            f"in all); p1_samples then held {count:,} rows in {chunks} chunks, {size / 2**30:.2f} GiB"
        )
        print(f"  {summary}", flush=True)
        return summary

    async def profile_service(self, service: Service) -> list[str]:
        """Sample the service with py-spy while it takes each experiment batch size, and summarize the stacks."""
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        lines = []
        for batch_size in self.options.experiment_batch_sizes:
            output = self.options.profile_dir / f"py-spy-batch-{batch_size}.txt"
            recorder = await asyncio.create_subprocess_exec(
                py_spy, "record", "--pid", str(service.pid), "--format", "raw", "--rate", "200", "--nonblocking",
                "--output", str(output),
                "--duration", str(math.ceil(self.options.seconds * self.options.rounds) + 2),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )
            await asyncio.sleep(0.5)
            await self.measure_service(
                "profile", "py-spy attached", service, batch_size, self.options.experiment_uploaders,
            )
            _, errors = await recorder.communicate()
            if recorder.returncode != 0 or not output.exists():
                self.failures.append(f"py-spy failed: {errors.decode(errors='replace')[-300:]}")
                continue
            lines += [f"Batch {batch_size}, {self.options.experiment_uploaders} uploaders: "
                      f"share of the service's CPU samples", ""]
            lines += summarize_profile(output)
            lines.append("")
        print("\n".join(lines), flush=True)
        return lines


def time_call(function, min_seconds: float = 0.2) -> float:
    """Return the mean time of one call in microseconds, over at least ``min_seconds``."""
    calls = 0
    started = time.perf_counter()
    while True:
        function()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return elapsed / calls * 1e6


def time_on_new_samples(function, body: bytes, settings: app.Settings, min_seconds: float = 0.2) -> float:
    """Return the mean time in microseconds of one call on samples decoded just before it.

    The service handles every sample once. An aware datetime computes its UTC
    time for its first hash and keeps the hash, so calls that reuse the same
    samples would measure a cheaper second pass.
    """
    calls = 0
    spent = 0.0
    while spent < min_seconds:
        samples = app.decode_batch(body, settings)
        started = time.perf_counter()
        function(samples)
        spent += time.perf_counter() - started
        calls += 1
    return spent / calls * 1e6


# Where a sample's innermost Python frame lies decides the layer it is charged to.
PROFILE_LAYERS = (
    ("app.py", "app.py"),
    ("asyncpg", "asyncpg"),
    ("redis", "redis client"),
    ("starlette", "starlette"),
    ("uvicorn", "uvicorn"),
    ("asyncio", "asyncio"),
)

# Stages of a request, each measured by the inclusive time of the function that does it.
PROFILE_STAGES = (
    ("uvicorn: parse the request", "HttpToolsProtocol.data_received"),
    ("uvicorn: send the response", "RequestResponseCycle.send"),
    ("app: read the body", "read_body"),
    ("app: decode_batch", "decode_batch"),
    ("app: check_samples", "check_samples"),
    ("app: batch_rows", "batch_rows"),
    ("app: run_database (task, wait)", "run_database"),
    ("app: write_rows", "write_rows"),
    ("asyncpg: pool acquire", "Pool._acquire"),
    ("asyncpg: pool release and connection reset", "PoolConnectionHolder.release"),
    ("app: invalidate_realtime (waits for its DEL)", "invalidate_realtime"),
    ("app: CacheInvalidator.flush (one DEL for the waiting keys)", "CacheInvalidator.flush"),
    ("app: ingest, in all", "ingest"),
)

FRAME_PATTERN = re.compile(r"^(?P<function>.*) \((?P<file>.*?)(?::\d+)?\)$")


def summarize_profile(path: Path) -> list[str]:
    """Return Markdown lines of the service's CPU samples by layer, by request stage and by function.

    py-spy's raw format has one line per distinct stack: frames from the
    outermost, each as "function (file:line)", separated by ';', then the
    sample count. Idle samples are not recorded, so shares are of busy time.
    """
    by_layer: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [FRAME_PATTERN.match(frame.strip()) for frame in stack.split(";") if frame.strip()]
        names = [f"{match['function']} ({match['file']})" for match in frames if match]
        if not names:
            continue
        for name in set(names):
            inclusive[name] += count
        by_function[names[-1]] += count
        layer = next((label for marker, label in PROFILE_LAYERS if marker in names[-1]), "other")
        by_layer[layer] += count
    if not total:
        return ["(no samples)"]

    def share(count: int) -> str:
        return f"{count / total:.0%}"

    lines = [f"{total:,} samples.", "", "| innermost frame in | share |", "|---|---|"]
    lines += [f"| {layer} | {share(count)} |" for layer, count in by_layer.most_common()]
    lines += ["", "| stage (inclusive) | share |", "|---|---|"]
    for label, function in PROFILE_STAGES:
        count = max((value for name, value in inclusive.items() if name.startswith(function + " (")), default=0)
        lines.append(f"| {label} | {share(count)} |")
    lines += ["", "| function (self) | share |", "|---|---|"]
    lines += [f"| `{name}` | {share(count)} |" for name, count in by_function.most_common(12)]
    return lines


async def run(options: Options, dsn: str, redis_url: str, workdir: Path, command: str,
              postgres_dir: Path | None, redis_pid: int | None) -> tuple[str, dict, bool]:
    bench = Bench(options, dsn, redis_url, workdir, postgres_dir, redis_pid)
    bench.connection = await asyncpg.connect(dsn)
    await bench.connection.execute((ROOT / "schema.sql").read_text())
    versions = {
        "postgresql": await bench.connection.fetchval("SHOW server_version"),
        "timescaledb": await bench.connection.fetchval(
            "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
        ),
        "fsync": await bench.connection.fetchval("SHOW fsync"),
        "synchronous_commit": await bench.connection.fetchval("SHOW synchronous_commit"),
        "shared_buffers": await bench.connection.fetchval("SHOW shared_buffers"),
    }
    sections: dict[str, list[str]] = {}
    started = time.perf_counter()
    sizes, pool_size = options.experiment_batch_sizes, options.pool_size
    uploaders = options.experiment_uploaders
    try:
        if "cpu" in options.sections:
            print("CPU per batch in one process", flush=True)
            sections["cpu"] = bench.measure_cpu_stages()

        service = bench.start_service(pool_size)
        try:
            if "growth" in options.sections and options.prefill_rows:
                print("Growth: the empty table", flush=True)
                for batch_size in sizes:
                    await bench.measure_pair("growth, empty table", "default", service, batch_size, uploaders,
                                             pool_size)
            if "main" in options.sections:
                print("Main: ceiling and service", flush=True)
                for batch_size in options.batch_sizes:
                    for count in options.uploaders:
                        await bench.measure_pair("main", "default", service, batch_size, count, pool_size)
            if options.profile_dir:
                print("Profile: py-spy on the service", flush=True)
                options.profile_dir.mkdir(parents=True, exist_ok=True)
                sections["profile"] = await bench.profile_service(service)
        finally:
            bench.stop_service(service)

        if "memory" in options.sections:
            print("Memory: maximum-size batches on a fresh service", flush=True)
            service = bench.start_service(pool_size)
            try:
                sections["memory"] = await bench.measure_max_batch_memory(service)
            finally:
                bench.stop_service(service)

        if "write-path" in options.sections:
            print("Write path: ceiling of each write function", flush=True)
            for batch_size in options.write_path_sizes:
                for count in options.uploaders:
                    await bench.compare_write_paths(batch_size, count, pool_size)

        if "pool" in options.sections:
            print("Pool size: DB_POOL_SIZE of the service and the ceiling's pool", flush=True)
            for size in options.pool_sizes:
                service = bench.start_service(size)
                try:
                    for batch_size in sizes:
                        await bench.measure_pair("pool", f"pool {size}", service, batch_size, uploaders, size)
                finally:
                    bench.stop_service(service)

        if "server" in options.sections:
            print("Server: uvicorn --loop and --http", flush=True)
            for loop, http in options.server_variants:
                service = bench.start_service(pool_size, loop=loop, http=http)
                try:
                    for batch_size in sizes:
                        await bench.measure_pair("server", f"{loop} + {http}", service, batch_size, uploaders,
                                                 pool_size)
                finally:
                    bench.stop_service(service)

        if "workers" in options.sections:
            print("Workers: uvicorn --workers", flush=True)
            for workers in options.workers:
                service = bench.start_service(pool_size, workers=workers)
                label = f"{workers} worker" if workers == 1 else f"{workers} workers"
                try:
                    for batch_size in sizes:
                        await bench.measure_pair("workers", label, service, batch_size, uploaders, pool_size)
                finally:
                    bench.stop_service(service)

        if "growth" in options.sections and options.prefill_rows:
            print("Growth: pre-fill, then the pre-filled table", flush=True)
            sections["prefill"] = [await bench.prefill()]
            # The empty-table rates were measured into a new chunk, so these go to a new one too. Without
            # the move they would go to the chunk that the run's other sections have filled.
            bench.fleet.move_to_next_day()
            service = bench.start_service(pool_size)
            try:
                for batch_size in sizes:
                    await bench.measure_pair("growth, pre-filled table", "default", service, batch_size,
                                             uploaders, pool_size)
            finally:
                bench.stop_service(service)
    finally:
        await bench.connection.close()

    duration_s = time.perf_counter() - started
    markdown = render(bench, options, versions, sections, command, duration_s)
    data = {
        "command": command, "machine": describe_machine(), "versions": versions, "seconds": duration_s,
        "results": [asdict(result) for result in bench.results], "failures": bench.failures, "notes": bench.notes,
    }
    return markdown, data, not bench.failures


def render(bench: Bench, options: Options, versions: dict, sections: dict[str, list[str]],
           command: str, duration_s: float) -> str:
    machine = describe_machine()
    results = bench.results
    lines = [
        "# Ingest benchmark results",
        "",
        f"- command: `{command}`, {duration_s / 60:.1f} min",
        f"- date: {machine['date']}",
        f"- machine: {machine['cpu']}, {machine['memory']} RAM, {machine['os']}, Python {machine['python']}",
        f"- database: PostgreSQL {versions['postgresql']}, TimescaleDB {versions['timescaledb']}, "
        f"fsync={versions['fsync']}, synchronous_commit={versions['synchronous_commit']}, "
        f"shared_buffers={versions['shared_buffers']}",
        f"- each measurement: {options.rounds} rounds of {options.seconds:g} s, ceiling and service taking turns, "
        f"each after {options.warmup_batches} warm-up batches per uploader; "
        f"pool of {options.pool_size} connections for service (DB_POOL_SIZE) and ceiling; "
        "service with LOG_LEVEL=WARNING and --no-access-log",
        "",
    ]
    if "cpu" in sections:
        lines += ["## CPU per batch (one process, no I/O)", "", *sections["cpu"], ""]
    if pairs(results, "main"):
        lines += ["## Service against ceiling", "", *pair_table(results, "main"), ""]
        lines += ["## CPU per batch in µs, by process group", "", *cpu_table(results, "main"), ""]
    if "memory" in sections:
        lines += ["## Maximum-size batch and RSS", "", *sections["memory"], ""]
    if write_path_table(results):
        lines += ["## Write path: ceiling of each write function (batches/s, relative to the first)", "",
                  *write_path_table(results), ""]
    for section, title in (("pool", "Pool size"), ("server", "uvicorn --loop and --http"),
                           ("workers", "uvicorn --workers")):
        if pairs(results, section):
            lines += [f"## {title}", "", *pair_table(results, section, with_variant=True), ""]
    if repeat_table(results, options.pool_size):
        lines += ["## The default configuration, measured in several sections", "",
                  *repeat_table(results, options.pool_size), ""]
    if "prefill" in sections:
        lines += ["## Growth: empty against pre-filled table", "", sections["prefill"][0], "",
                  *growth_table(results), ""]
    if "profile" in sections:
        lines += ["## Profile of the service (py-spy)", "", *sections["profile"], ""]
    lines += summary_lines(results, options.pool_size)
    if bench.notes:
        lines += ["## Notes", "", *(f"- {note}" for note in dict.fromkeys(bench.notes)), ""]
    if bench.failures:
        lines += ["## FAILURES", "", *(f"- {failure}" for failure in bench.failures), ""]
    return "\n".join(lines)


def summary_lines(results: list[Result], pool_size: int) -> list[str]:
    """Return the targets checked against the main table and against the median of the default configuration."""
    main = pairs(results, "main")
    if not main:
        return []
    repeats = default_pairs(results, pool_size)

    def median_note(batch_size: int, uploaders: int) -> str:
        values = [value for _, value in repeats.get((batch_size, uploaders), [])]
        if len(values) < 2:
            return ""
        return f" (median of {len(values)} measurements in this run: {statistics.median(values):.2f})"

    def verdict(passed: bool) -> str:
        return "met" if passed else "NOT met"

    lines = ["## Targets", ""]
    for ceiling, service in main:
        value = ratio(service, ceiling)
        if service.batch_size >= 1000:
            lines.append(f"- batch {service.batch_size:,} x {service.uploaders} uploaders, ratio >= 0.8: "
                         f"{value:.2f}, {verdict(value >= 0.8)}{median_note(service.batch_size, service.uploaders)}")
        if service.batch_size == 10 and service.uploaders >= 32:
            lines.append(f"- batch 10 x {service.uploaders} uploaders, ratio >= 0.6: {value:.2f}, "
                         f"{verdict(value >= 0.6)}{median_note(10, service.uploaders)}")
            rss = service.peak_rss_mib or 0
            lines.append(f"- service peak RSS under that load < 150 MiB: {rss:.0f} MiB, {verdict(rss < 150)}")
    lines.append("")
    return lines


def parse_sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_options(argv: list[str]) -> tuple[Options, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="timed part of each round of a measurement, in s (default 3)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of each measurement, with ceiling and service taking turns (default 2)")
    parser.add_argument("--warmup-batches", type=int, default=2,
                        help="untimed batches each uploader sends first (default 2)")
    parser.add_argument("--batch-sizes", type=parse_sizes, default=[10, 100, 1000, 5000],
                        help="samples per batch, comma-separated (default 10,100,1000,5000)")
    parser.add_argument("--write-path-sizes", type=parse_sizes, default=[10, 100, 200, 500, 1000, 5000],
                        help="samples per batch of the write-path section (default 10,100,200,500,1000,5000)")
    parser.add_argument("--uploaders", type=parse_sizes, default=[1, 32],
                        help="concurrent uploaders, comma-separated (default 1,32)")
    parser.add_argument("--pool-size", type=int, default=app.Settings.db_pool_size,
                        help=f"DB_POOL_SIZE of the service and pool size of the ceiling "
                             f"(default {app.Settings.db_pool_size}, the service's default)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"sections to run, comma-separated, from {','.join(SECTIONS)} (default all)")
    parser.add_argument("--prefill-rows", type=int, default=0,
                        help="rows to pre-fill before measuring the growth section again (default 0, which skips it)")
    parser.add_argument("--prefill-days", type=int, default=60, help="days the pre-fill spreads over (default 60)")
    parser.add_argument("--prefill-devices", type=int, default=100, help="devices of the pre-fill (default 100)")
    parser.add_argument("--pool-sizes", type=parse_sizes, default=[2, 5, 10, 32],
                        help="DB_POOL_SIZE values of the pool section (default 2,5,10,32)")
    parser.add_argument("--workers", type=parse_sizes, default=[1, 2],
                        help="uvicorn --workers values of the workers section (default 1,2)")
    parser.add_argument("--profile-dir", type=Path,
                        help="record the service with py-spy (bench/requirements.txt) and write the stacks here")
    parser.add_argument("--database-url", help="use this database instead of starting a TimescaleDB")
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--service-app-dir", type=Path,
                        help="run the service from the app.py in this directory, to measure a change to it "
                             "against the ceiling of this repository's app.py")
    parser.add_argument("--device-prefix", default="bench-", help="prefix of the device ids (default bench-)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "ingest.md",
                        help="where to write the Markdown results (default bench/results/ingest.md)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "ingest.json",
                        help="where to write every measurement as JSON (default bench/results/ingest.json)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny settings that run in seconds, to check that the benchmark still works")
    arguments = parser.parse_args(argv)

    sections = {name.strip() for name in arguments.sections.split(",") if name.strip()}
    unknown = sections - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if (arguments.database_url is None) != (arguments.redis_url is None):
        parser.error("--database-url and --redis-url go together")

    options = Options(
        seconds=arguments.seconds, rounds=arguments.rounds, warmup_batches=arguments.warmup_batches,
        batch_sizes=arguments.batch_sizes, write_path_sizes=arguments.write_path_sizes,
        uploaders=arguments.uploaders, pool_size=arguments.pool_size, sections=sections,
        prefill_rows=arguments.prefill_rows, prefill_days=arguments.prefill_days,
        prefill_devices=arguments.prefill_devices, pool_sizes=arguments.pool_sizes, workers=arguments.workers,
        server_variants=list(SERVER_VARIANTS), experiment_batch_sizes=list(EXPERIMENT_BATCH_SIZES),
        experiment_uploaders=EXPERIMENT_UPLOADERS, max_batch_samples=app.Settings.max_batch_samples,
        device_prefix=arguments.device_prefix, profile_dir=arguments.profile_dir,
        service_app_dir=arguments.service_app_dir,
    )
    if arguments.smoke:
        # Every section once with the smallest settings that still exercise its code.
        options.seconds = 0.2
        options.rounds = 1
        options.warmup_batches = 1
        options.batch_sizes = [10, 100]
        options.write_path_sizes = [10]
        options.uploaders = [1, 4]
        options.pool_size = 2
        options.prefill_rows = options.prefill_rows or 20_000
        options.prefill_days = 3
        options.prefill_devices = 4
        options.pool_sizes = [1]
        options.workers = [2]
        options.server_variants = [("asyncio", "h11")]
        options.experiment_batch_sizes = [10]
        options.experiment_uploaders = 4
        options.max_batch_samples = 1000
    return options, arguments


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def main(argv: list[str]) -> int:
    options, arguments = parse_options(argv)
    command = shlex.join(["python", "bench/ingest_bench.py", *argv])
    workdir = Path(tempfile.mkdtemp(prefix="p1-bench-"))
    postgres = redis_server = None
    try:
        if arguments.database_url:
            dsn, redis_url = arguments.database_url, arguments.redis_url
            postgres_dir = redis_pid = None
        else:
            postgres, redis_server = start_databases()
            dsn, redis_url = postgres.dsn, redis_server.url
            postgres_dir, redis_pid = postgres.data_dir, redis_server.process.pid
        markdown, data, passed = uvloop.run(run(options, dsn, redis_url, workdir, command, postgres_dir, redis_pid))
    finally:
        if redis_server:
            redis_server.stop()
        if postgres:
            postgres.stop()
            shutil.rmtree(postgres.data_dir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(markdown)
    write_atomically(arguments.output, markdown + "\n")
    write_atomically(arguments.json, json.dumps(data, indent=1) + "\n")
    print(f"\nwrote {arguments.output} and {arguments.json}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
