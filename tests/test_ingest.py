"""POST /v1/ingest against the real TimescaleDB and Redis."""

import gzip
from datetime import UTC, datetime

import pytest
from helpers import sample, series


def post(client, samples, **kwargs):
    return client.post("/v1/ingest", json={"samples": samples}, **kwargs)


def test_batch_stores_exact_values(client, device_id, db):
    samples = [
        sample(device_id, "2024-03-01T12:00:00Z", power_w=-1520, import_power_w=0,
               energy_import_kwh=6627.966, energy_export_kwh=12.5),
        sample(device_id, "2024-03-01T13:00:01.250+01:00", power_w=2474, import_power_w=2474,
               energy_import_kwh=6627.974),
        sample(device_id, "2024-03-01T12:00:02-05:30", power_w=0, import_power_w=0, energy_export_kwh=None),
    ]
    response = post(client, samples)
    assert response.status_code == 200
    assert response.json() == {"inserted": 3, "received": 3}

    rows = db.rows(device_id)
    assert [row["ts"] for row in rows] == [
        datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC),
        datetime(2024, 3, 1, 12, 0, 1, 250000, tzinfo=UTC),
        datetime(2024, 3, 1, 17, 30, 2, tzinfo=UTC),
    ]
    assert [row["power_w"] for row in rows] == [-1520, 2474, 0]
    assert [row["import_power_w"] for row in rows] == [0, 2474, 0]
    assert [row["energy_import_kwh"] for row in rows] == [6627.966, 6627.974, None]
    assert [row["energy_export_kwh"] for row in rows] == [12.5, None, None]
    assert {row["device_id"] for row in rows} == {device_id}


def test_same_batch_twice_inserts_zero(client, device_id, db):
    samples = series(device_id, 50)
    assert post(client, samples).json()["inserted"] == 50
    second = post(client, samples)
    assert second.status_code == 200
    assert second.json()["inserted"] == 0
    assert db.count(device_id) == 50


def test_half_overlapping_batch_inserts_new_half(client, device_id, db):
    samples = series(device_id, 40)
    assert post(client, samples[:20]).json()["inserted"] == 20
    assert post(client, samples[10:30]).json()["inserted"] == 10
    assert db.count(device_id) == 30


def test_duplicate_in_batch_counts_once_first_wins(client, device_id, db):
    samples = [
        sample(device_id, "2024-03-01T12:00:00Z", power_w=111, import_power_w=111),
        sample(device_id, "2024-03-01T13:00:00+01:00", power_w=222, import_power_w=222),
        sample(device_id, "2024-03-01T12:00:01Z", power_w=333, import_power_w=333),
    ]
    response = post(client, samples)
    assert response.json() == {"inserted": 2, "received": 3}
    assert [row["power_w"] for row in db.rows(device_id)] == [111, 333]


def test_stored_value_wins_over_retry(client, device_id, db):
    post(client, [sample(device_id, "2024-03-01T12:00:00Z", power_w=111, import_power_w=111)])
    response = post(client, [sample(device_id, "2024-03-01T12:00:00Z", power_w=999, import_power_w=999)])
    assert response.json()["inserted"] == 0
    assert [row["power_w"] for row in db.rows(device_id)] == [111]


def test_device_mismatch_gives_403_writes_nothing(client, device_id, db):
    samples = [sample(device_id, "2024-03-01T12:00:00Z"), sample("someone-else", "2024-03-01T12:00:01Z")]
    response = post(client, samples)
    assert response.status_code == 403
    assert response.json()["errors"] == [
        {"index": 1, "field": "device_id", "message": f"Expected {device_id!r}, the token's device"},
    ]
    assert db.count(device_id) == 0
    assert db.count("someone-else") == 0


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        pytest.param({"ts": None}, "ts", "Expected `datetime`, got `null`", id="ts-null"),
        pytest.param({"power_w": "12"}, "power_w", "Expected `int`, got `str`", id="power-string"),
        pytest.param({"power_w": 1.5}, "power_w", "Expected `int`, got `float`", id="power-float"),
        pytest.param({"ts": "2024-03-01T12:00:00"}, "ts", "Expected `datetime` with a timezone component",
                     id="naive-ts"),
        pytest.param({"ts": "yesterday"}, "ts", "Invalid RFC3339 encoded datetime", id="ts-text"),
        pytest.param({"power_w": 2**31}, "power_w", "Expected `int` <= 2147483647", id="power-too-big"),
        pytest.param({"power_w": -(2**31) - 1}, "power_w", "Expected `int` >= -2147483648", id="power-too-small"),
        pytest.param({"import_power_w": 2**31}, "import_power_w", "Expected `int` <= 2147483647",
                     id="import-too-big"),
        pytest.param({"energy_import_kwh": "1.5"}, "energy_import_kwh", "Expected `float | null`, got `str`",
                     id="energy-string"),
    ],
)
def test_invalid_field_gives_422_writes_nothing(client, device_id, db, change, field, message):
    samples = series(device_id, 3)
    samples[2] = {**samples[2], **change}
    response = post(client, samples)
    assert response.status_code == 422
    assert response.json()["errors"] == [{"index": 2, "field": field, "message": message}]
    assert db.count(device_id) == 0


@pytest.mark.parametrize("field", ["device_id", "ts", "power_w", "import_power_w"])
def test_missing_field_gives_422(client, device_id, db, field):
    samples = series(device_id, 2)
    del samples[1][field]
    response = post(client, samples)
    assert response.status_code == 422
    assert response.json()["errors"] == [
        {"index": 1, "field": field, "message": f"Object missing required field `{field}`"},
    ]
    assert db.count(device_id) == 0


def test_optional_counters_may_be_absent(client, device_id, db):
    response = post(client, [sample(device_id, "2024-03-01T12:00:00Z")])
    assert response.status_code == 200
    row = db.rows(device_id)[0]
    assert row["energy_import_kwh"] is None
    assert row["energy_export_kwh"] is None


def test_unknown_fields_ignored(client, device_id, db):
    body = {
        "firmware": "2.1",
        "samples": [sample(device_id, "2024-03-01T12:00:00Z", voltage_l1_v=231.4, tariff=2)],
    }
    response = client.post("/v1/ingest", json=body)
    assert response.status_code == 200
    assert db.count(device_id) == 1


def test_body_not_json_gives_422(client):
    response = client.post("/v1/ingest", content=b"samples=1")
    assert response.status_code == 422
    assert response.json()["error"].startswith("request body is not valid JSON")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param(b"{}", "samples", id="no-samples"),
        pytest.param(b'{"samples": {}}', "samples", id="samples-object"),
        pytest.param(b"[]", None, id="array"),
    ],
)
def test_wrong_shape_gives_422(client, body, field):
    response = client.post("/v1/ingest", content=body)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == field


def test_gzip_body_accepted(client, device_id, db):
    import json

    body = gzip.compress(json.dumps({"samples": series(device_id, 30)}).encode())
    response = client.post("/v1/ingest", content=body, headers={"Content-Encoding": "gzip"})
    assert response.status_code == 200
    assert response.json()["inserted"] == 30
    assert db.count(device_id) == 30


def test_ingest_deletes_realtime_key_only(client, device_id, cache):
    cache.set(f"realtime:{device_id}", b"stale")
    cache.set(f"realtime:{device_id}-other", b"keep")
    cache.set(f"history:{device_id}", b"keep")
    response = post(client, series(device_id, 2))
    assert response.status_code == 200
    assert cache.exists(f"realtime:{device_id}") == 0
    assert cache.get(f"realtime:{device_id}-other") == b"keep"
    assert cache.get(f"history:{device_id}") == b"keep"


def test_rejected_batch_keeps_realtime_key(client, device_id, cache):
    cache.set(f"realtime:{device_id}", b"cached")
    samples = series(device_id, 2)
    samples[1]["power_w"] = "x"
    assert post(client, samples).status_code == 422
    assert cache.get(f"realtime:{device_id}") == b"cached"


def test_staging_rows_never_reach_next_batch(make_client, token, device_id, db):
    # One pooled connection serves every request, so a leak would show up.
    client = make_client(db_pool_size=1)
    client.headers["Authorization"] = f"Bearer {token}"
    first = series(device_id, 5, start="2024-03-01T00:00:00Z")
    bad = series(device_id, 5, start="2024-03-02T00:00:00Z")
    bad[4]["device_id"] = device_id + "-other"
    second = series(device_id, 5, start="2024-03-03T00:00:00Z")

    assert post(client, first).json()["inserted"] == 5
    assert post(client, bad).status_code == 403
    assert post(client, second).json()["inserted"] == 5
    assert post(client, first).json()["inserted"] == 0
    assert db.count(device_id) == 10
