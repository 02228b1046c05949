"""Real faults between the service and its database and cache.

The service runs under uvicorn in its own process. A TCP proxy between it
and PostgreSQL is cut, frozen and restored; Redis is replaced by a port with
nothing behind it or by a socket that never answers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from faults import SilentServer, TcpProxy
from helpers import series

import devstack

DB_TIMEOUT_S = 2.0


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}"))


@pytest.fixture
def proxy(stack):
    tcp_proxy = TcpProxy(urlsplit(stack.database_url).port)
    yield tcp_proxy
    tcp_proxy.close()


@pytest.fixture
def environment(stack, proxy, token, device_id):
    return {
        "DATABASE_URL": with_port(stack.database_url, proxy.port),
        "REDIS_URL": stack.redis_url,
        "DEVICE_TOKENS": f"{token}:{device_id}",
        "DB_TIMEOUT_S": str(DB_TIMEOUT_S),
        "RETRY_AFTER_S": "1",
        "REDIS_TIMEOUT_S": "0.3",
        "LOG_LEVEL": "INFO",
    }


@pytest.fixture
def http(token):
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        yield client


def ingest(http, service, samples):
    return http.post(f"{service.url}/v1/ingest", json={"samples": samples})


def assert_retry_later(response):
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    assert 1 <= int(response.headers["retry-after"]) <= 2
    assert "retry later" in response.json()["error"]


def test_database_down_at_start_then_recovers(proxy, environment, start_service, http, device_id, db):
    proxy.cut()
    service = start_service(environment)
    assert httpx.get(f"{service.url}/").status_code == 200

    ready = httpx.get(f"{service.url}/ready")
    assert ready.status_code == 503
    assert ready.json()["database"].startswith("unavailable")

    samples = series(device_id, 10)
    started = time.monotonic()
    assert_retry_later(ingest(http, service, samples))
    assert time.monotonic() - started < DB_TIMEOUT_S + 1

    proxy.restore()
    assert httpx.get(f"{service.url}/ready").status_code == 200
    assert ingest(http, service, samples).json()["inserted"] == 10
    assert db.count(device_id) == 10


def test_connection_dropped_mid_batch_writes_nothing(proxy, environment, start_service, http, device_id, db):
    service = start_service(environment)
    assert ingest(http, service, series(device_id, 1, start="2024-01-01T00:00:00Z")).status_code == 200

    samples = series(device_id, 5000, start="2024-02-01T00:00:00Z")
    # The pooled connection is open, so the next bytes it sends are the batch's COPY data.
    proxy.cut_after(100_000)
    assert_retry_later(ingest(http, service, samples))
    assert db.count(device_id) == 1

    proxy.restore()
    response = ingest(http, service, samples)
    assert response.status_code == 200
    assert response.json()["inserted"] == 5000
    assert db.count(device_id) == 5001


def test_database_frozen_mid_batch_gives_503(proxy, environment, start_service, http, device_id, db):
    service = start_service(environment)
    assert ingest(http, service, series(device_id, 1, start="2024-01-01T00:00:00Z")).status_code == 200

    samples = series(device_id, 2000, start="2024-02-01T00:00:00Z")
    proxy.freeze()
    started = time.monotonic()
    assert_retry_later(ingest(http, service, samples))
    assert time.monotonic() - started < DB_TIMEOUT_S + 2
    assert db.count(device_id) == 1

    proxy.restore()
    deadline = time.monotonic() + 10
    response = ingest(http, service, samples)
    while response.status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.5)
        response = ingest(http, service, samples)
    assert response.status_code == 200
    assert db.count(device_id) == 2001


def test_silent_database_gives_503_quickly(environment, start_service, http, device_id):
    silent = SilentServer()
    try:
        service = start_service({**environment, "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{silent.port}/x"})
        started = time.monotonic()
        assert_retry_later(ingest(http, service, series(device_id, 3)))
        assert time.monotonic() - started < DB_TIMEOUT_S + 1
        ready = httpx.get(f"{service.url}/ready", timeout=10)
        assert ready.status_code == 503
        assert ready.json()["database"] == "timed out"
    finally:
        silent.close()


def test_redis_down_still_stores(environment, start_service, http, device_id, db):
    environment = {**environment, "REDIS_URL": f"redis://127.0.0.1:{devstack.find_free_port()}/0"}
    service = start_service(environment)
    for batch in range(5):
        start = f"2024-03-0{batch + 1}T00:00:00Z"
        response = ingest(http, service, series(device_id, 10, start=start))
        assert response.status_code == 200
    assert db.count(device_id) == 50

    ready = httpx.get(f"{service.url}/ready")
    assert ready.status_code == 200
    assert ready.json()["redis"].startswith("unavailable")

    # Five failed deletes make one warning, not five.
    assert service.log().count("Redis cache delete failed") == 1


def test_redis_hanging_bounded(environment, start_service, http, device_id, db):
    silent = SilentServer()
    try:
        service = start_service({**environment, "REDIS_URL": f"redis://127.0.0.1:{silent.port}/0"})
        started = time.monotonic()
        response = ingest(http, service, series(device_id, 10))
        assert response.status_code == 200
        assert time.monotonic() - started < 1.5
        assert db.count(device_id) == 10
    finally:
        silent.close()


def test_redis_comes_back_after_start(environment, start_service, http, device_id, cache):
    # The service starts before Redis; once Redis runs, deletes reach it.
    redis_server = devstack.RedisServer()
    service = start_service({**environment, "REDIS_URL": redis_server.url})
    assert ingest(http, service, series(device_id, 2)).status_code == 200
    redis_server.start()
    try:
        import redis

        client = redis.Redis(port=redis_server.port)
        client.set(f"realtime:{device_id}", b"stale")
        assert ingest(http, service, series(device_id, 2, start="2024-05-01T00:00:00Z")).status_code == 200
        assert client.exists(f"realtime:{device_id}") == 0
        client.close()
    finally:
        redis_server.stop()


def test_auth_failure_opens_no_database_connection(proxy, environment, start_service, device_id):
    service = start_service(environment)
    for header in ["Bearer wrong-token", "Basic abc", ""]:
        response = httpx.post(
            f"{service.url}/v1/ingest", json={"samples": series(device_id, 2)}, headers={"Authorization": header},
        )
        assert response.status_code == 401
    assert proxy.connections == 0


def raw_request(port: int, body: bytes, token: str, declared_length: int) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port))
    head = (
        f"POST /v1/ingest HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {declared_length}\r\n\r\n"
    )
    connection.sendall(head.encode() + body)
    return connection


def test_disconnect_mid_body_leaves_pool_healthy(environment, start_service, http, token, device_id, db):
    service = start_service({**environment, "DB_POOL_SIZE": "1"})
    body = httpx.Request("POST", "/", json={"samples": series(device_id, 100)}).content
    connection = raw_request(service.port, body[: len(body) // 2], token, len(body))
    time.sleep(0.2)
    connection.close()

    time.sleep(0.3)
    assert db.count(device_id) == 0
    assert ingest(http, service, series(device_id, 10, start="2024-06-01T00:00:00Z")).json()["inserted"] == 10
    assert "client disconnected while sending a batch" in service.log()


def test_disconnect_after_body_commits_or_rolls_back(environment, start_service, http, token, device_id, db):
    service = start_service({**environment, "DB_POOL_SIZE": "1"})
    samples = series(device_id, 3000)
    body = httpx.Request("POST", "/", json={"samples": samples}).content
    for _ in range(5):
        connection = raw_request(service.port, body, token, len(body))
        connection.close()
        assert db.count(device_id) in (0, 3000)

    # Retrying the batch completes it, and the one pooled connection still works.
    response = ingest(http, service, samples)
    assert response.status_code == 200
    assert db.count(device_id) == 3000
    idle_in_transaction = db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' AND datname = current_database()"
    )
    assert idle_in_transaction == 0


def test_sigterm_finishes_inflight_batch(proxy, environment, start_service, http, device_id, db):
    service = start_service(environment)
    assert ingest(http, service, series(device_id, 1, start="2024-01-01T00:00:00Z")).status_code == 200
    samples = series(device_id, 500, start="2024-02-01T00:00:00Z")

    responses = []
    proxy.freeze()
    sender = threading.Thread(target=lambda: responses.append(ingest(http, service, samples)))
    sender.start()
    time.sleep(0.5)
    os.kill(service.process.pid, signal.SIGTERM)
    time.sleep(0.2)
    proxy.thaw()
    sender.join(timeout=15)

    assert responses[0].status_code == 200
    assert responses[0].json()["inserted"] == 500
    assert service.process.wait(timeout=10) in (0, -signal.SIGTERM)
    assert db.count(device_id) == 501


def test_sigterm_exits_while_database_hangs(proxy, environment, start_service, http, device_id):
    # The default timeout, so that the 10 s bound holds for an unconfigured service.
    service = start_service({**environment, "DB_TIMEOUT_S": "5"})
    assert ingest(http, service, series(device_id, 1)).status_code == 200
    proxy.freeze()
    sender = threading.Thread(target=lambda: ingest(http, service, series(device_id, 50, start="2024-07-01T00:00:00Z")))
    sender.start()
    time.sleep(0.3)

    started = time.monotonic()
    service.process.terminate()
    service.process.wait(timeout=10)
    assert time.monotonic() - started < 10
    sender.join(timeout=15)


def test_sigterm_after_database_outage(proxy, environment, start_service, http, device_id):
    service = start_service(environment)
    assert ingest(http, service, series(device_id, 5)).status_code == 200
    proxy.cut()
    assert_retry_later(ingest(http, service, series(device_id, 5, start="2024-08-01T00:00:00Z")))
    proxy.restore()
    assert ingest(http, service, series(device_id, 5, start="2024-08-01T00:00:00Z")).status_code == 200

    started = time.monotonic()
    service.process.terminate()
    assert service.process.wait(timeout=10) in (0, -signal.SIGTERM)
    assert time.monotonic() - started < 10
    assert "service stopped" in service.log()


def test_pool_busy_gives_503(make_client, token, device_id, db):
    client = make_client(db_pool_size=1, db_timeout_s=1.0, retry_after_s=1)
    client.headers["Authorization"] = f"Bearer {token}"
    assert client.post("/v1/ingest", json={"samples": series(device_id, 1)}).status_code == 200

    later = {"samples": series(device_id, 5, start="2024-05-01T00:00:00Z")}
    pool = client.app.state.pool
    held = client.portal.call(pool.acquire)
    try:
        started = time.monotonic()
        assert_retry_later(client.post("/v1/ingest", json=later))
        assert time.monotonic() - started < 2.5
    finally:
        client.portal.call(pool.release, held)
    assert db.count(device_id) == 1
    assert client.post("/v1/ingest", json=later).status_code == 200


def test_unexpected_error_gives_json_500(make_client, token, device_id, monkeypatch, caplog):
    import app as service

    def explode(samples):
        raise RuntimeError("boom in batch_rows")

    monkeypatch.setattr(service, "batch_rows", explode)
    client = make_client()
    client.headers["Authorization"] = f"Bearer {token}"
    response = client.post("/v1/ingest", json={"samples": series(device_id, 2)})
    assert response.status_code == 500
    assert response.json() == {"error": "internal server error"}
    assert "boom" not in response.text
    record = next(record for record in caplog.records if record.getMessage().startswith("unexpected error"))
    assert device_id in record.getMessage()
    assert record.exc_info[0] is RuntimeError


TERMINATE_SERVICE_SESSIONS = """
SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'p1-terminated'
"""


def test_terminated_sessions_give_503_not_500(stack, environment, start_service, http, device_id, db):
    database_url = f"{stack.database_url}?application_name=p1-terminated"
    service = start_service({**environment, "DATABASE_URL": database_url, "DB_POOL_SIZE": "4"})
    stop = threading.Event()

    async def terminate_sessions_until_stopped():
        connection = await asyncpg.connect(stack.database_url)
        try:
            while not stop.is_set():
                await connection.execute(TERMINATE_SERVICE_SESSIONS)
                await asyncio.sleep(0.02)
        finally:
            await connection.close()

    def terminate_sessions():
        asyncio.run(terminate_sessions_until_stopped())

    killer = threading.Thread(target=terminate_sessions)
    batches = [series(device_id, size, start=f"2024-09-{day:02d}T00:00:00Z") for day, size in
               zip(range(1, 29), [10, 500] * 14, strict=True)]
    statuses = []
    killer.start()
    try:
        for batch in batches:
            statuses.append(ingest(http, service, batch).status_code)
    finally:
        stop.set()
        killer.join(timeout=10)

    assert set(statuses) <= {200, 503}
    assert statuses.count(503) > 0
    for batch, status in zip(batches, statuses, strict=True):
        if status == 503:
            assert ingest(http, service, batch).status_code == 200
    assert db.count(device_id) == sum(len(batch) for batch in batches)
