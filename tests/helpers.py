"""Helpers shared by the tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def sample(device_id: str, ts: str, power_w: int = 100, import_power_w: int = 100, **extra) -> dict:
    """Return a valid sample for the ingest API; keyword arguments add or replace fields."""
    return {"device_id": device_id, "ts": ts, "power_w": power_w, "import_power_w": import_power_w, **extra}


def series(device_id: str, count: int, start: str = "2024-03-01T12:00:00Z", step_s: int = 1) -> list[dict]:
    """Return ``count`` valid samples one ``step_s`` apart, with rising counters."""
    first = datetime.fromisoformat(start.replace("Z", "+00:00")).astimezone(UTC)
    return [
        sample(
            device_id,
            (first + timedelta(seconds=index * step_s)).isoformat(),
            power_w=index - count // 2,
            import_power_w=max(index - count // 2, 0),
            energy_import_kwh=1000 + index / 1000,
            energy_export_kwh=500 + index / 2000,
        )
        for index in range(count)
    ]
