"""Bad requests to POST /v1/ingest: each gets its status, a JSON body, and stores nothing."""

from __future__ import annotations

import gzip
import json
import socket
import time
import zlib
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from helpers import sample, series

MAX_BODY_BYTES = 64 * 1024
MAX_BATCH_SAMPLES = 50


@pytest.fixture
def limited_client(make_client, token):
    client = make_client(max_body_bytes=MAX_BODY_BYTES, max_batch_samples=MAX_BATCH_SAMPLES, max_clock_skew_s=300)
    client.headers["Authorization"] = f"Bearer {token}"
    return client


def encode(samples: list[dict]) -> bytes:
    return json.dumps({"samples": samples}).encode()


def future_ts(seconds: int) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def one_sample_body(owner: str, **change) -> bytes:
    """Encode a batch of three samples of ``owner`` whose middle one gets ``change``."""
    samples = series(owner, 3)
    samples[1] = {**samples[1], **change}
    return encode(samples)


# Each case builds (body, extra headers) from the device id, and names the status and the field at fault.
CASES = [
    pytest.param(
        lambda d: (b"x" * (MAX_BODY_BYTES + 1), {}), 413, None, id="body-over-limit",
    ),
    pytest.param(
        lambda d: (encode(series(d, MAX_BATCH_SAMPLES + 1)), {}), 413, None, id="too-many-samples",
    ),
    pytest.param(
        lambda d: (gzip.compress(b" " * (MAX_BODY_BYTES * 20)), {"Content-Encoding": "gzip"}), 413, None,
        id="gzip-bomb",
    ),
    pytest.param(
        lambda d: (b"\x1f\x8b\x08\x00garbage", {"Content-Encoding": "gzip"}), 400, None, id="gzip-invalid",
    ),
    pytest.param(
        lambda d: (gzip.compress(encode(series(d, 5)))[:-12], {"Content-Encoding": "gzip"}), 400, None,
        id="gzip-truncated",
    ),
    pytest.param(
        lambda d: (zlib.compress(encode(series(d, 5))), {"Content-Encoding": "deflate"}), 415, None, id="deflate",
    ),
    pytest.param(lambda d: (encode(series(d, 5)), {"Content-Encoding": "br"}), 415, None, id="brotli"),
    pytest.param(lambda d: (b"", {}), 422, None, id="empty-body"),
    pytest.param(lambda d: (b'{"samples": [', {}), 422, None, id="truncated-json"),
    pytest.param(lambda d: (b"\xff\xfe{}", {}), 422, None, id="not-utf8"),
    pytest.param(lambda d: (b'{"samples": []}', {}), 422, "samples", id="no-samples"),
    pytest.param(lambda d: (b'{"samples": null}', {}), 422, "samples", id="samples-null"),
    pytest.param(lambda d: (b'{"samples": [1, 2]}', {}), 422, None, id="samples-not-objects"),
    pytest.param(lambda d: (one_sample_body(d, import_power_w=-1), {}), 422, "import_power_w", id="import-negative"),
    pytest.param(
        lambda d: (one_sample_body(d, energy_import_kwh=-0.001), {}), 422, "energy_import_kwh",
        id="energy-import-negative",
    ),
    pytest.param(
        lambda d: (one_sample_body(d, energy_export_kwh=-5), {}), 422, "energy_export_kwh",
        id="energy-export-negative",
    ),
    pytest.param(
        lambda d: (encode(series(d, 3)).replace(b'"power_w": 0', b'"power_w": 1e999'), {}), 422, "power_w",
        id="power-infinite",
    ),
    pytest.param(
        lambda d: (encode(series(d, 3)).replace(b'"energy_import_kwh": 1000.001', b'"energy_import_kwh": 1e999'), {}),
        422, "energy_import_kwh", id="energy-infinite",
    ),
    pytest.param(
        lambda d: (encode(series(d, 3)).replace(b'"energy_import_kwh": 1000.001', b'"energy_import_kwh": NaN'), {}),
        422, None, id="energy-nan",
    ),
    pytest.param(lambda d: (one_sample_body(d, ts=future_ts(3600)), {}), 422, "ts", id="ts-future"),
    pytest.param(lambda d: (one_sample_body(d, ts="2000-01-01T00:00:07+01:00"), {}), 422, "ts", id="ts-meter-default"),
    pytest.param(lambda d: (one_sample_body(d, ts="1970-01-01T00:00:00Z"), {}), 422, "ts", id="ts-epoch"),
    pytest.param(lambda d: (one_sample_body(d, ts="2024-13-01T00:00:00Z"), {}), 422, "ts", id="ts-month-13"),
    pytest.param(lambda d: (one_sample_body(d, ts=1709294400), {}), 422, "ts", id="ts-number"),
    pytest.param(lambda d: (one_sample_body(d, device_id=""), {}), 422, "device_id", id="device-empty"),
    pytest.param(lambda d: (one_sample_body(d, device_id="d" * 65), {}), 422, "device_id", id="device-too-long"),
    pytest.param(lambda d: (one_sample_body(d, device_id="dev ice"), {}), 422, "device_id", id="device-space"),
    pytest.param(lambda d: (one_sample_body(d, device_id="dev/ice"), {}), 422, "device_id", id="device-slash"),
    pytest.param(lambda d: (one_sample_body(d, device_id="dévice"), {}), 422, "device_id", id="device-unicode"),
    pytest.param(lambda d: (one_sample_body(d, device_id=7), {}), 422, "device_id", id="device-number"),
    pytest.param(lambda d: (one_sample_body(d, device_id=d + "\n"), {}), 422, "device_id", id="device-newline"),
    pytest.param(lambda d: (one_sample_body(d, power_w=True), {}), 422, "power_w", id="power-bool"),
    pytest.param(
        lambda d: (one_sample_body(d, energy_import_kwh=1e10), {}), 422, "energy_import_kwh", id="energy-above-1twh",
    ),
    pytest.param(
        lambda d: (encode(series(d, 2)).replace(b'"power_w": -1', b'"power_w": -1, "x": ' + b"[" * 2000 + b"]" * 2000),
                   {}),
        422, None, id="deeply-nested",
    ),
    pytest.param(
        lambda d: (encode(series(d, 2)).replace(d.encode(), b"\xff", 1), {}), 422, None, id="invalid-utf8-in-sample",
    ),
    pytest.param(
        lambda d: (gzip.compress(gzip.compress(encode(series(d, 2)))), {"Content-Encoding": "gzip, gzip"}), 415, None,
        id="gzip-twice",
    ),
    pytest.param(
        lambda d: (gzip.compress(encode(series(d, 2))) + b"garbage", {"Content-Encoding": "gzip"}), 400, None,
        id="gzip-trailing-garbage",
    ),
]


@pytest.mark.parametrize(("build", "status", "field"), CASES)
def test_bad_request_rejected(limited_client, device_id, db, cache, build, status, field):
    cache.set(f"realtime:{device_id}", b"cached")
    body, headers = build(device_id)
    response = limited_client.post("/v1/ingest", content=body, headers=headers)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]
    if field is not None:
        assert field in {entry["field"] for entry in response.json()["errors"]}
    assert db.count(device_id) == 0
    assert cache.get(f"realtime:{device_id}") == b"cached"


def test_413_names_the_limit(limited_client):
    response = limited_client.post("/v1/ingest", content=b"x" * (MAX_BODY_BYTES + 1))
    assert response.json() == {
        "error": f"request body is larger than {MAX_BODY_BYTES} bytes", "max_body_bytes": MAX_BODY_BYTES,
    }


def service_environment(stack, token: str, device_id: str, **settings: str) -> dict[str, str]:
    """Return the environment of a service for the test's device, with settings added or replaced."""
    environment = {
        "DATABASE_URL": stack.database_url,
        "REDIS_URL": stack.redis_url,
        "DEVICE_TOKENS": f"{token}:{device_id}",
    }
    return {**environment, **settings}


@pytest.fixture
def limited_server(stack, start_service, token, device_id):
    return start_service(service_environment(stack, token, device_id, MAX_BODY_BYTES=str(MAX_BODY_BYTES)))


def send_head(port: int, token: str, framing: str) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=5)
    connection.sendall(
        f"POST /v1/ingest HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n{framing}\r\n\r\n".encode()
    )
    return connection


def test_413_chunked_body_stops_reading(limited_server, token):
    connection = send_head(limited_server.port, token, "Transfer-Encoding: chunked")
    # Five 16 KiB chunks pass the 64 KiB limit. The body never ends, so only a
    # server that stops at the limit can answer.
    for _ in range(5):
        connection.sendall(b"4000\r\n" + b"x" * 16384 + b"\r\n")
    status_line = connection.recv(4096).split(b"\r\n", 1)[0]
    connection.close()
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large"


def test_413_declared_length_answered_before_body(limited_server, token):
    connection = send_head(limited_server.port, token, f"Content-Length: {MAX_BODY_BYTES + 1}")
    status_line = connection.recv(4096).split(b"\r\n", 1)[0]
    connection.close()
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large"


def test_413_batch_names_sample_limit(limited_client, device_id):
    response = limited_client.post("/v1/ingest", content=encode(series(device_id, MAX_BATCH_SAMPLES + 1)))
    assert response.json()["max_batch_samples"] == MAX_BATCH_SAMPLES


def test_gzip_concatenated_members_accepted(limited_client, device_id, db):
    text = encode(series(device_id, 20))
    body = gzip.compress(text[:100]) + gzip.compress(text[100:])
    response = limited_client.post("/v1/ingest", content=body, headers={"Content-Encoding": "gzip"})
    assert response.status_code == 200
    assert db.count(device_id) == 20


@pytest.mark.parametrize(
    ("encoding", "suffix"),
    [
        pytest.param("x-gzip", b"", id="x-gzip"),
        pytest.param("GZIP", b"", id="upper-case"),
        pytest.param("identity, gzip", b"", id="with-identity"),
        pytest.param("gzip", b"\0" * 512, id="zero-padding"),
    ],
)
def test_gzip_variants_accepted(limited_client, device_id, db, encoding, suffix):
    body = gzip.compress(encode(series(device_id, 4))) + suffix
    response = limited_client.post("/v1/ingest", content=body, headers={"Content-Encoding": encoding})
    assert response.status_code == 200
    assert db.count(device_id) == 4


def test_identity_encoding_accepted(limited_client, device_id):
    response = limited_client.post(
        "/v1/ingest", content=encode(series(device_id, 2)), headers={"Content-Encoding": "identity"},
    )
    assert response.status_code == 200


def test_negative_power_accepted(limited_client, device_id, db):
    body = encode([sample(device_id, "2024-06-01T12:00:00Z", power_w=-4200, import_power_w=0)])
    assert limited_client.post("/v1/ingest", content=body).status_code == 200
    assert db.rows(device_id)[0]["power_w"] == -4200


def test_ts_within_skew_accepted(limited_client, device_id):
    body = encode([sample(device_id, future_ts(200))])
    assert limited_client.post("/v1/ingest", content=body).status_code == 200


def test_422_lists_every_invalid_sample(limited_client, device_id, db):
    samples = series(device_id, 10)
    samples[2]["power_w"] = "high"
    samples[5]["ts"] = "2024-03-01T12:00:05"
    samples[7]["import_power_w"] = -3
    del samples[9]["ts"]
    response = limited_client.post("/v1/ingest", content=encode(samples))
    assert response.status_code == 422
    body = response.json()
    assert [(entry["index"], entry["field"]) for entry in body["errors"]] == [
        (2, "power_w"), (5, "ts"), (7, "import_power_w"), (9, "ts"),
    ]
    assert body["invalid_samples"] == 4
    assert body["errors_truncated"] is False
    assert body["error"] == "invalid batch: 4 of 10 samples are invalid; nothing was stored"
    assert db.count(device_id) == 0


def test_422_lists_decode_and_time_errors(limited_client, device_id):
    samples = series(device_id, 4)
    samples[0]["power_w"] = "high"
    samples[3]["ts"] = "2000-01-01T00:00:00Z"
    response = limited_client.post("/v1/ingest", content=encode(samples))
    assert [(entry["index"], entry["field"]) for entry in response.json()["errors"]] == [(0, "power_w"), (3, "ts")]


def test_422_error_list_capped(make_client, token, device_id):
    client = make_client()
    client.headers["Authorization"] = f"Bearer {token}"
    samples = series(device_id, 250)
    for entry in samples:
        entry["power_w"] = "x"
    body = client.post("/v1/ingest", content=encode(samples)).json()
    assert len(body["errors"]) == 100
    assert body["invalid_samples"] == 250
    assert body["errors_truncated"] is True


def test_unknown_path_gives_json_404(make_client):
    response = make_client().get("/nope")
    assert response.status_code == 404
    assert response.json() == {"error": "Not Found"}


def test_unknown_v1_path_gives_json_404(client):
    response = client.get("/v1/nope")
    assert response.status_code == 404
    assert response.json() == {"error": "Not Found"}


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/ingest"), ("PUT", "/v1/ingest"), ("POST", "/")])
def test_wrong_method_gives_json_405(client, method, path):
    response = client.request(method, path)
    assert response.status_code == 405
    assert response.json() == {"error": "Method Not Allowed"}
    assert "allow" in response.headers


def test_slow_body_gets_408(stack, start_service, token, device_id):
    service = start_service(service_environment(stack, token, device_id, BODY_TIMEOUT_S="1"))
    connection = send_head(service.port, token, "Content-Length: 1000")
    connection.sendall(b'{"samples": [')
    status_line = connection.recv(4096).split(b"\r\n", 1)[0]
    connection.close()
    assert status_line == b"HTTP/1.1 408 Request Timeout"


def test_requests_per_device_limited(stack, start_service, token, device_id):
    tokens = f"{token}:{device_id},{token}x:{device_id}-other"
    service = start_service(
        service_environment(stack, token, device_id, DEVICE_TOKENS=tokens, MAX_REQUESTS_PER_DEVICE="2")
    )

    # Two uploads of the device hang in their bodies, so a third request of the device gets 429.
    hanging_uploads = [send_head(service.port, token, "Content-Length: 1000") for _ in range(2)]
    time.sleep(0.3)
    third = httpx.get(f"{service.url}/v1/realtime", headers={"Authorization": f"Bearer {token}"})
    other = httpx.get(f"{service.url}/v1/realtime", headers={"Authorization": f"Bearer {token}x"})
    for connection in hanging_uploads:
        connection.close()
    time.sleep(0.3)
    after = httpx.get(f"{service.url}/v1/realtime", headers={"Authorization": f"Bearer {token}"})

    assert third.status_code == 429
    assert third.headers["retry-after"] == "1"
    assert other.status_code == 404
    assert after.status_code == 404
