"""Batches of new samples for the ingest benchmark.

Every device has a clock that only moves forward, one sample a second, so no
batch repeats a (device_id, ts) key and every row the benchmark sends is
really inserted, by the ceiling and by the service alike. Each measurement
takes the devices whose clocks are furthest behind, so a full run of tens of
millions of rows spreads over the fleet and no clock reaches the present.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import msgspec

# The JSON field names of a sample are the column names of p1_samples.
SAMPLE_FIELDS = ("device_id", "ts", "power_w", "import_power_w", "energy_import_kwh", "energy_export_kwh")

ONE_SECOND = timedelta(seconds=1)


@dataclass
class Device:
    device_id: str
    token: str
    next_ts: datetime


@dataclass
class Work:
    """The batches of one measurement, one list per uploader, and the time range each device covers."""

    batches: list[list]
    rows_per_batch: int
    ranges: dict[str, tuple[datetime, datetime]] = field(default_factory=dict)


class Fleet:
    """Devices with tokens and a sample clock each, starting at ``start``."""

    def __init__(self, prefix: str, count: int, start: datetime):
        self.devices = [
            Device(f"{prefix}{index:03d}", secrets.token_urlsafe(32), start) for index in range(count)
        ]
        self.by_id = {device.device_id: device for device in self.devices}

    def device_tokens(self) -> str:
        """Return the DEVICE_TOKENS value that lets every device of the fleet upload."""
        return ",".join(f"{device.token}:{device.device_id}" for device in self.devices)

    def make_rows(self, device: Device, count: int) -> list[tuple]:
        """Return ``count`` new rows of the device in p1_samples column order and advance its clock."""
        rows = []
        ts = device.next_ts
        # Counters derived from the clock, so values differ per row and rise like a meter's.
        seconds = int(ts.timestamp())
        for offset in range(count):
            tick = seconds + offset
            power_w = tick * 7919 % 6000 - 1500
            rows.append((
                device.device_id, ts, power_w, max(power_w, 0),
                1000 + (tick % 10_000_000) / 1000, 500 + (tick % 10_000_000) / 2000,
            ))
            ts += ONE_SECOND
        device.next_ts = ts
        return rows

    def rewind(self, work: Work, sent_per_uploader: list[int]) -> None:
        """Move each device's clock back to the end of the batches it sent, and shrink the ranges to match.

        Uploaders send their batches in order, so the unsent ones are the last
        of each list. Rewinding keeps pre-encoded but unsent batches from
        pushing the clocks towards the present.
        """
        for device_id, sent in zip(list(work.ranges), sent_per_uploader, strict=True):
            device = self.by_id[device_id]
            first, _ = work.ranges[device_id]
            device.next_ts = first + sent * work.rows_per_batch * ONE_SECOND
            work.ranges[device_id] = (first, device.next_ts - ONE_SECOND)

    def move_to_next_day(self) -> datetime:
        """Move every device's clock to the start of the day after the latest sample, and return that time.

        The samples after the move go to a new one-day chunk, as on an empty table.
        """
        latest = max(device.next_ts for device in self.devices)
        next_day = latest.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
        for device in self.devices:
            device.next_ts = next_day
        return next_day

    def make_work(self, uploaders: int, rows_per_batch: int, batches_per_uploader: int) -> Work:
        """Build row batches for ``uploaders`` devices, each uploader sending only its own device's rows.

        Raises RuntimeError when a batch would reach the present, which the
        service rejects as a time ahead of its clock.
        """
        work = Work(batches=[], rows_per_batch=rows_per_batch)
        devices = sorted(self.devices, key=lambda device: device.next_ts)[:uploaders]
        span = rows_per_batch * batches_per_uploader * ONE_SECOND
        if devices[-1].next_ts + span > datetime.now(UTC) - timedelta(hours=1):
            raise RuntimeError(
                f"the sample clocks of {len(self.devices)} devices reached the present; "
                "use more devices or fewer rows"
            )
        for device in devices:
            first = device.next_ts
            work.batches.append([self.make_rows(device, rows_per_batch) for _ in range(batches_per_uploader)])
            work.ranges[device.device_id] = (first, device.next_ts - ONE_SECOND)
        return work


def encode_body(rows: list[tuple]) -> bytes:
    """Return the JSON body of an upload of these rows."""
    return msgspec.json.encode({"samples": [dict(zip(SAMPLE_FIELDS, row, strict=True)) for row in rows]})


def encode_request(rows: list[tuple], token: str, host: str) -> bytes:
    """Return a complete HTTP/1.1 keep-alive POST of the rows to /v1/ingest."""
    body = encode_body(rows)
    head = (
        f"POST /v1/ingest HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


def encode_work(work: Work, fleet: Fleet, host: str) -> Work:
    """Turn row batches into pre-encoded HTTP requests, so the timed part spends no CPU on encoding."""
    tokens = {device.device_id: device.token for device in fleet.devices}
    requests = [
        [encode_request(rows, tokens[rows[0][0]], host) for rows in batches] for batches in work.batches
    ]
    return Work(batches=requests, rows_per_batch=work.rows_per_batch, ranges=work.ranges)
