"""Many concurrent, overlapping batches from one device and from many, over real HTTP."""

from __future__ import annotations

import asyncio
import random
import secrets

import httpx
import pytest
from helpers import series

import devstack

DEVICES = 8
BATCHES_PER_DEVICE = 30
BATCH_SIZE = 60
CONCURRENCY = 32


@pytest.fixture
def fleet():
    return {secrets.token_urlsafe(32): f"test-load-{secrets.token_hex(4)}-{index}" for index in range(DEVICES)}


@pytest.fixture
def server(stack, tmp_path, fleet):
    environment = {
        "DATABASE_URL": stack.database_url,
        "REDIS_URL": stack.redis_url,
        "DEVICE_TOKENS": ",".join(f"{token}:{device}" for token, device in fleet.items()),
        "DB_POOL_SIZE": "8",
        "LOG_LEVEL": "WARNING",
    }
    service = devstack.ServiceProcess(environment, log_file=tmp_path / "service.log", cwd=tmp_path)
    service.start()
    yield service
    service.stop()


def overlapping_batches(device_id: str, rng: random.Random) -> list[list[dict]]:
    """Batches whose windows overlap by half, in shuffled order, with samples shuffled inside.

    Shuffled samples make concurrent transactions meet the same keys in
    different orders, the pattern that deadlocks when inserts are not sorted.
    """
    samples = series(device_id, BATCHES_PER_DEVICE * BATCH_SIZE // 2 + BATCH_SIZE // 2)
    step = BATCH_SIZE // 2
    batches = [samples[start : start + BATCH_SIZE] for start in range(0, len(samples) - step, step)]
    for batch in batches:
        rng.shuffle(batch)
    return batches


async def send_all(url: str, requests: list[tuple[str, list[dict]]]) -> list[httpx.Response]:
    limit = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def send(token, batch):
            async with limit:
                response = await client.post(
                    "/v1/ingest", json={"samples": batch}, headers={"Authorization": f"Bearer {token}"},
                )
                return response, batch[0]["device_id"]

        return await asyncio.gather(*(send(token, batch) for token, batch in requests))


def test_concurrent_overlapping_batches_store_each_row_once(server, fleet, db):
    rng = random.Random(7)
    requests = []
    expected = {}
    for token, device in fleet.items():
        batches = overlapping_batches(device, rng)
        expected[device] = len({entry["ts"] for batch in batches for entry in batch})
        # Every batch goes twice, as an uploader that timed out would resend it.
        requests += [(token, batch) for batch in batches] * 2
    rng.shuffle(requests)

    results = asyncio.run(send_all(server.url, requests))

    statuses = sorted({response.status_code for response, _ in results})
    assert statuses == [200], server.log()[-3000:]
    inserted = dict.fromkeys(fleet.values(), 0)
    for response, device in results:
        inserted[device] += response.json()["inserted"]
    for device, count in expected.items():
        assert inserted[device] == count
        assert db.count(device) == count
    assert "deadlock" not in server.log().lower()
