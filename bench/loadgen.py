"""Concurrent uploaders for the ingest benchmark: a minimal HTTP/1.1 client and a timed driver.

The load generator shares the machine's cores with the service and the
database, so it does as little as it can. Requests are pre-encoded bytes,
each uploader keeps one keep-alive connection, and a response is read by its
Content-Length without a general HTTP parser.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

INSERTED_PATTERN = re.compile(rb'"inserted":(\d+)')


class HttpError(Exception):
    """A response other than 200 from the service."""


class KeepAliveClient:
    """One HTTP/1.1 connection that sends pre-encoded requests and reads responses with a Content-Length."""

    def __init__(self, host: str, port: int):
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass

    async def request(self, data: bytes) -> tuple[int, bytes]:
        """Send one request and return the status code and the response body."""
        self.writer.write(data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        start = head.lower().find(b"content-length:")
        if start < 0:
            raise HttpError(f"response without Content-Length: {head[:200]!r}")
        end = head.find(b"\r\n", start)
        body = await self.reader.readexactly(int(head[start + 15 : end]))
        return status, body

    async def upload(self, data: bytes) -> int:
        """Send one ingest request and return the inserted count. Raises HttpError on a non-200 status."""
        status, body = await self.request(data)
        if status != 200:
            raise HttpError(f"HTTP {status}: {body[:300]!r}")
        return int(INSERTED_PATTERN.search(body).group(1))


@dataclass
class Measurement:
    """Counts, latencies and timed seconds of one driver run."""

    rows_per_batch: int
    uploaders: int
    batches_timed: int = 0
    seconds: float = 0.0
    rows_sent: int = 0
    inserted: int = 0
    errors: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    # Batches each uploader sent, warm-up included; the rest of its batches were never sent.
    sent_per_uploader: list[int] = field(default_factory=list)
    # CPU seconds per group of processes in the timed part, from the probe.
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def rows_timed(self) -> int:
        return self.batches_timed * self.rows_per_batch

    @property
    def rows_per_s(self) -> float:
        return self.rows_timed / self.seconds if self.seconds else 0.0

    @property
    def batches_per_s(self) -> float:
        return self.batches_timed / self.seconds if self.seconds else 0.0

    def latency_ms(self, quantile: float) -> float:
        """Return the latency at ``quantile`` (0 to 1) in milliseconds, nearest rank."""
        if not self.latencies_s:
            return 0.0
        ordered = sorted(self.latencies_s)
        index = min(len(ordered) - 1, max(0, round(quantile * len(ordered)) - 1))
        return ordered[index] * 1000


Send = Callable[[object], Awaitable[int]]


async def drive(senders: list[Send], batches: list[list], rows_per_batch: int,
                warmup_batches: int, seconds: float, probe=None) -> Measurement:
    """Run one uploader per sender over its own list of batches and time the part after warm-up.

    Each uploader first sends ``warmup_batches`` batches untimed, so that pool
    connections are open and statements prepared. Then all start together and
    send batch after batch until ``seconds`` have passed or their batches run
    out. The timed part ends when the last batch in flight completes. A
    probe, if given, has its start() and stop() called around the timed part.
    """
    measurement = Measurement(rows_per_batch=rows_per_batch, uploaders=len(senders),
                              sent_per_uploader=[0] * len(senders))
    barrier = asyncio.Barrier(len(senders) + 1)
    deadline = 0.0

    async def uploader(index: int, send: Send, own_batches: list) -> None:
        warmup, timed = own_batches[:warmup_batches], own_batches[warmup_batches:]
        for batch in warmup:
            await send_one(send, batch, timed_start=None)
        measurement.sent_per_uploader[index] = len(warmup)
        await barrier.wait()
        await barrier.wait()
        for batch in timed:
            if time.perf_counter() >= deadline:
                break
            measurement.sent_per_uploader[index] += 1
            await send_one(send, batch, timed_start=time.perf_counter())

    async def send_one(send: Send, batch, timed_start: float | None) -> None:
        measurement.rows_sent += rows_per_batch
        try:
            inserted = await send(batch)
        except (HttpError, OSError, asyncio.IncompleteReadError) as error:
            measurement.errors.append(f"{type(error).__name__}: {error}")
            return
        # Added after the await: `measurement.inserted += await ...` would read the total before
        # the await and lose the updates of the uploaders that completed meanwhile.
        measurement.inserted += inserted
        if timed_start is not None:
            measurement.latencies_s.append(time.perf_counter() - timed_start)
            measurement.batches_timed += 1

    tasks = [
        asyncio.create_task(uploader(index, send, own))
        for index, (send, own) in enumerate(zip(senders, batches, strict=True))
    ]
    await barrier.wait()
    if probe is not None:
        probe.start()
    started = time.perf_counter()
    deadline = started + seconds
    await barrier.wait()
    await asyncio.gather(*tasks)
    measurement.seconds = time.perf_counter() - started
    if probe is not None:
        probe.stop()
        measurement.cpu_s = probe.spent
    return measurement
