"""The service under uvicorn in its own process, over real HTTP, with real meter data."""

import json
import secrets
from datetime import datetime
from pathlib import Path

import httpx
import pytest

import devstack
import p1_to_samples

DATA = Path(__file__).parent / "data"
EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture
def token():
    return secrets.token_urlsafe(32)


@pytest.fixture
def environment(stack, token, device_id):
    return {
        "DATABASE_URL": stack.database_url,
        "REDIS_URL": stack.redis_url,
        "DEVICE_TOKENS": f"{token}:{device_id}",
        "LOG_LEVEL": "INFO",
    }


@pytest.fixture
def server(environment, tmp_path):
    service = devstack.ServiceProcess(environment, log_file=tmp_path / "service.log", cwd=tmp_path)
    service.start()
    yield service
    service.stop()


def post_batches(server, token, samples, batch_size=100):
    inserted = 0
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}) as client:
        for start in range(0, len(samples), batch_size):
            response = client.post("/v1/ingest", json={"samples": samples[start : start + batch_size]})
            assert response.status_code == 200, response.text
            inserted += response.json()["inserted"]
    return inserted


def test_health_over_http(server):
    response = httpx.get(f"{server.url}/")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_batch_logged_without_token(server, token, device_id):
    samples = p1_to_samples.samples_from_series_csv(DATA / "nielsbasjes-iskra-am550-dsmr5-1s.csv", device_id)
    assert post_batches(server, token, samples[:25]) == 25
    # uvicorn shuts down gracefully, then raises SIGTERM again to exit by it.
    assert server.stop() in (0, -15)
    log = server.log()
    assert f"batch stored device={device_id} samples=25 inserted=25 duration_ms=" in log
    assert "service stopped" in log
    assert token not in log


@pytest.mark.parametrize(
    "series", ["nielsbasjes-iskra-am550-dsmr5-1s.csv", "gaborvar-hu-20230502-10s.csv"],
)
def test_real_series_arrives_intact(server, token, device_id, db, series):
    samples = p1_to_samples.samples_from_series_csv(DATA / series, device_id)
    assert post_batches(server, token, samples) == len(samples)
    # Resending everything, as an uploader that lost the responses would, stores nothing new.
    assert post_batches(server, token, samples, batch_size=250) == 0

    rows = db.rows(device_id)
    assert len(rows) == len(samples)
    for row, sent in zip(rows, samples, strict=True):
        assert row["ts"] == datetime.fromisoformat(sent["ts"])
        assert row["power_w"] == sent["power_w"]
        assert row["import_power_w"] == sent["import_power_w"]
        assert row["energy_import_kwh"] == sent["energy_import_kwh"]
        assert row["energy_export_kwh"] == sent["energy_export_kwh"]


def test_example_batch_as_in_readme(stack, tmp_path, db):
    token = secrets.token_urlsafe(32)
    environment = {
        "DATABASE_URL": stack.database_url,
        "REDIS_URL": stack.redis_url,
        "DEVICE_TOKENS": f"{token}:demo-meter",
    }
    service = devstack.ServiceProcess(environment, log_file=tmp_path / "service.log", cwd=tmp_path)
    service.start()
    try:
        response = httpx.post(
            f"{service.url}/v1/ingest",
            content=(EXAMPLES / "batch.json").read_bytes(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
    finally:
        service.stop()
    assert response.status_code == 200
    assert response.json()["received"] == 20
    batch = json.loads((EXAMPLES / "batch.json").read_text())["samples"]
    stored = db.fetchval(
        "SELECT count(*) FROM p1_samples WHERE device_id = 'demo-meter' AND ts BETWEEN $1 AND $2",
        datetime.fromisoformat(batch[0]["ts"]), datetime.fromisoformat(batch[-1]["ts"]),
    )
    assert stored == 20


def test_dotenv_file_read_environment_wins(stack, tmp_path, token, device_id):
    (tmp_path / ".env").write_text(
        f"DATABASE_URL=postgresql://nobody@127.0.0.1:1/none\nDEVICE_TOKENS={token}:{device_id}\n"
    )
    environment = {"DATABASE_URL": stack.database_url, "REDIS_URL": stack.redis_url}
    service = devstack.ServiceProcess(environment, log_file=tmp_path / "service.log", cwd=tmp_path)
    service.start()
    try:
        response = httpx.post(
            f"{service.url}/v1/ingest",
            json={"samples": [{"device_id": device_id, "ts": "2024-01-01T00:00:00Z",
                               "power_w": 1, "import_power_w": 1}]},
            headers={"Authorization": f"Bearer {token}"},
        )
    finally:
        service.stop()
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"DEVICE_TOKENS": "supersecretvalue"}, "DEVICE_TOKENS entry 1 has no ':'", id="no-colon"),
        pytest.param({"DEVICE_TOKENS": "supersecretvalue:a,supersecretvalue:b"},
                     "DEVICE_TOKENS entry 2 repeats the token of entry 1", id="duplicate"),
        pytest.param({"CACHE_TTL_S": "soon"}, "CACHE_TTL_S must be an integer from 0 to 86400", id="ttl"),
        pytest.param({"REDIS_URL": ""}, "REDIS_URL is required but not set", id="missing"),
    ],
)
def test_bad_config_stops_startup(environment, tmp_path, change, message):
    service = devstack.ServiceProcess(
        {**environment, **change}, log_file=tmp_path / "service.log", cwd=tmp_path,
    )
    service.start(wait=False)
    assert service.process.wait(timeout=30) == 2
    log = service.log()
    assert f"configuration error: {message}" in log
    assert "supersecretvalue" not in log
    assert environment["DEVICE_TOKENS"].split(":")[0] not in log
