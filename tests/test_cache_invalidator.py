"""CacheInvalidator: many keys to one Redis DEL, and no key satisfied by a DEL sent before it arrived."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from redis.asyncio import Redis

import app as service
import devstack


def make_state(redis_url: str) -> SimpleNamespace:
    settings = service.Settings(database_url="postgresql://unused", redis_url=redis_url, device_tokens={})
    return SimpleNamespace(
        settings=settings,
        redis=Redis.from_url(redis_url, socket_connect_timeout=settings.redis_timeout_s),
        redis_warnings=service.RepeatFilter(),
    )


def record_deletes(state: SimpleNamespace, delay_s: float) -> list[tuple[str, ...]]:
    """Record the keys of each DEL and hold each one in flight for ``delay_s``."""
    calls: list[tuple[str, ...]] = []
    delete = state.redis.delete

    async def slow_delete(*keys):
        calls.append(keys)
        await asyncio.sleep(delay_s)
        return await delete(*keys)

    state.redis.delete = slow_delete
    return calls


def test_concurrent_deletes_share_del(stack):
    async def run():
        state = make_state(stack.redis_url)
        keys = [f"realtime:test-share-{index}" for index in range(21)]
        await state.redis.mset(dict.fromkeys(keys, b"cached"))
        calls = record_deletes(state, 0.05)
        invalidator = service.CacheInvalidator(state)
        first = asyncio.ensure_future(invalidator.delete(keys[0]))
        await asyncio.sleep(0.01)
        # These arrive while the first DEL is in flight, so they wait and go out together.
        await asyncio.gather(*(invalidator.delete(key) for key in keys[1:]))
        await first
        remaining = await state.redis.exists(*keys)
        await state.redis.aclose()
        return calls, keys, remaining

    calls, keys, remaining = asyncio.run(run())
    assert calls[0] == (keys[0],)
    assert sorted(calls[1]) == sorted(keys[1:])
    assert len(calls) == 2
    assert remaining == 0


def test_key_during_flight_waits_for_next_del(stack):
    async def run():
        state = make_state(stack.redis_url)
        key = "realtime:test-in-flight"
        calls = record_deletes(state, 0.1)
        invalidator = service.CacheInvalidator(state)
        first = asyncio.ensure_future(invalidator.delete(key))
        await asyncio.sleep(0.03)
        # A reader fills the cache after the first DEL was sent, then the second batch commits.
        await state.redis.set(key, b"view before the second batch")
        await invalidator.delete(key)
        exists_after_second = await state.redis.exists(key)
        await first
        await state.redis.aclose()
        return calls, exists_after_second

    calls, exists_after_second = asyncio.run(run())
    assert calls == [("realtime:test-in-flight",), ("realtime:test-in-flight",)]
    assert exists_after_second == 0


@pytest.mark.parametrize("server", ["nothing", "silent"])
def test_redis_failure_releases_waiters(server):
    from faults import SilentServer

    silent = SilentServer() if server == "silent" else None
    port = silent.port if silent else devstack.find_free_port()

    async def run():
        state = make_state(f"redis://127.0.0.1:{port}/0")
        invalidator = service.CacheInvalidator(state)
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(asyncio.gather(*(invalidator.delete(f"realtime:k{index}") for index in range(5))), 5)
        elapsed = asyncio.get_running_loop().time() - started
        await state.redis.aclose()
        return elapsed, invalidator.flusher

    try:
        elapsed, flusher = asyncio.run(run())
    finally:
        if silent:
            silent.close()
    # Two DELs at most, each bounded by REDIS_TIMEOUT_S (0.5 s).
    assert elapsed < 1.5
    assert flusher is None
