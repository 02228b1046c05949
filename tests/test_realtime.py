"""GET /v1/realtime: the latest sample, through the Redis cache."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import pytest
from faults import TcpProxy
from helpers import sample, series

import devstack


def test_no_samples_gives_404(client, device_id):
    response = client.get("/v1/realtime")
    assert response.status_code == 404
    assert response.json() == {"error": f"no samples stored for device {device_id!r}"}


def test_realtime_needs_token(make_client):
    response = make_client().get("/v1/realtime")
    assert response.status_code == 401


def test_miss_reads_database_and_fills_cache(client, device_id, cache):
    client.post("/v1/ingest", json={"samples": series(device_id, 5)})
    response = client.get("/v1/realtime")
    assert response.status_code == 200
    body = response.json()
    assert body["source"] == "database"
    assert body["device_id"] == device_id
    assert body["ts"] == "2024-03-01T12:00:04Z"
    assert body["power_w"] == 2
    assert body["import_power_w"] == 2
    assert body["energy_import_kwh"] == 1000.004
    assert body["energy_export_kwh"] == 500.002

    cached = json.loads(cache.get(f"realtime:{device_id}"))
    assert cached["ts"] == "2024-03-01T12:00:04Z"
    assert 0 < cache.ttl(f"realtime:{device_id}") <= 5


def test_latest_is_by_ts_not_arrival(client, device_id):
    client.post("/v1/ingest", json={"samples": [sample(device_id, "2024-03-01T12:00:10Z", power_w=10)]})
    client.post("/v1/ingest", json={"samples": [sample(device_id, "2024-03-01T12:00:05Z", power_w=5)]})
    assert client.get("/v1/realtime").json()["power_w"] == 10


def test_age_counts_from_sample_ts(client, device_id):
    ts = (datetime.now(UTC) - timedelta(seconds=30)).isoformat()
    client.post("/v1/ingest", json={"samples": [sample(device_id, ts)]})
    age_s = client.get("/v1/realtime").json()["age_s"]
    assert 29 <= age_s <= 40


def test_ingest_invalidates_cache(client, device_id):
    client.post("/v1/ingest", json={"samples": [sample(device_id, "2024-03-01T12:00:00Z", power_w=1)]})
    assert client.get("/v1/realtime").json()["power_w"] == 1
    assert client.get("/v1/realtime").json()["source"] == "cache"

    client.post("/v1/ingest", json={"samples": [sample(device_id, "2024-03-01T12:00:01Z", power_w=2)]})
    after = client.get("/v1/realtime").json()
    assert after["power_w"] == 2
    assert after["source"] == "database"


def test_cache_ttl_zero_never_caches(make_client, token, device_id, cache):
    client = make_client(cache_ttl_s=0)
    client.headers["Authorization"] = f"Bearer {token}"
    client.post("/v1/ingest", json={"samples": series(device_id, 2)})
    assert client.get("/v1/realtime").json()["source"] == "database"
    assert client.get("/v1/realtime").json()["source"] == "database"
    assert cache.exists(f"realtime:{device_id}") == 0


def test_invalid_cache_entry_ignored(client, device_id, cache):
    client.post("/v1/ingest", json={"samples": series(device_id, 2)})
    cache.set(f"realtime:{device_id}", b"{not json", ex=60)
    response = client.get("/v1/realtime")
    assert response.status_code == 200
    assert response.json()["source"] == "database"


@pytest.fixture
def proxy(stack):
    tcp_proxy = TcpProxy(urlsplit(stack.database_url).port)
    yield tcp_proxy
    tcp_proxy.close()


def test_cache_hit_needs_no_database(make_client, stack, proxy, token, device_id):
    parts = urlsplit(stack.database_url)
    through_proxy = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
    client = make_client(database_url=through_proxy, cache_ttl_s=60, db_timeout_s=1.0)
    client.headers["Authorization"] = f"Bearer {token}"
    client.post("/v1/ingest", json={"samples": series(device_id, 3)})
    assert client.get("/v1/realtime").json()["source"] == "database"

    # With the database cut off, only the cache can answer.
    proxy.cut()
    response = client.get("/v1/realtime")
    assert response.status_code == 200
    assert response.json()["source"] == "cache"
    assert response.json()["ts"] == "2024-03-01T12:00:02Z"


def test_database_down_on_miss_gives_503(make_client, stack, proxy, token, device_id):
    parts = urlsplit(stack.database_url)
    through_proxy = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
    client = make_client(database_url=through_proxy, db_timeout_s=1.0)
    client.headers["Authorization"] = f"Bearer {token}"
    proxy.cut()
    response = client.get("/v1/realtime")
    assert response.status_code == 503
    assert "retry-after" in response.headers


def test_redis_down_reads_database(make_client, token, device_id):
    client = make_client(redis_url=f"redis://127.0.0.1:{devstack.find_free_port()}/0", redis_timeout_s=0.3)
    client.headers["Authorization"] = f"Bearer {token}"
    assert client.post("/v1/ingest", json={"samples": series(device_id, 4)}).status_code == 200
    response = client.get("/v1/realtime")
    assert response.status_code == 200
    assert response.json()["source"] == "database"
    assert response.json()["power_w"] == 1
