"""Property-based fuzz of the ingest body: never a 5xx, and a rejected batch stores nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)
def aware_timestamps():
    """RFC 3339 timestamps from 2001 to 2025 with offsets from -14:00 to +14:00."""
    minutes = st.integers(min_value=-14 * 60, max_value=14 * 60)
    offsets = minutes.map(lambda value: timezone(timedelta(minutes=value)))
    moments = st.datetimes(min_value=datetime(2001, 1, 2), max_value=datetime(2026, 1, 1))
    return st.builds(lambda moment, zone: moment.replace(tzinfo=UTC).astimezone(zone).isoformat(), moments, offsets)


VALID_FIELDS = {
    "ts": aware_timestamps(),
    "power_w": st.integers(min_value=-(2**31), max_value=2**31 - 1),
    "import_power_w": st.integers(min_value=0, max_value=2**31 - 1),
    "energy_import_kwh": st.none() | st.floats(min_value=0, max_value=1e9),
    "energy_export_kwh": st.none() | st.floats(min_value=0, max_value=1e9),
}
INVALID_FIELDS = {
    "device_id": st.text(max_size=70) | ANY_JSON,
    "ts": st.text(max_size=30) | st.datetimes().map(datetime.isoformat) | ANY_JSON,
    "power_w": st.integers() | st.floats() | ANY_JSON,
    "import_power_w": st.integers(max_value=-1) | st.integers(min_value=2**31) | ANY_JSON,
    "energy_import_kwh": st.floats(max_value=-1e-9) | st.just(float("inf")) | ANY_JSON,
    "energy_export_kwh": st.floats(max_value=-1e-9) | st.text(max_size=5) | ANY_JSON,
}


@st.composite
def samples(draw, device_id: str):
    """A valid sample, or one whose fields are changed or removed."""
    sample = {"device_id": device_id, **{name: draw(values) for name, values in VALID_FIELDS.items()}}
    if draw(st.integers(0, 9)) < 3:
        for name in draw(st.lists(st.sampled_from(sorted(INVALID_FIELDS)), min_size=1, max_size=2, unique=True)):
            if draw(st.booleans()):
                sample[name] = draw(INVALID_FIELDS[name])
            else:
                del sample[name]
    extra = draw(st.dictionaries(st.text(min_size=1, max_size=8), ANY_JSON, max_size=2))
    return {**extra, **sample}


@st.composite
def bodies(draw, device_id: str):
    kind = draw(st.sampled_from(["batch"] * 8 + ["any-json", "bytes"]))
    if kind == "batch":
        batch = draw(st.lists(samples(device_id), max_size=6))
        return json.dumps({"samples": batch}, allow_nan=True).encode()
    if kind == "any-json":
        return json.dumps(draw(ANY_JSON), allow_nan=True).encode()
    return draw(st.binary(max_size=64))


@pytest.fixture
def fuzz_client(make_client, token):
    client = make_client()
    client.headers["Authorization"] = f"Bearer {token}"
    return client


def test_fuzzed_bodies_never_fail_server(fuzz_client, device_id, db):
    statuses = []

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(body=bodies(device_id))
    def check(body):
        before = db.count(device_id)
        response = fuzz_client.post("/v1/ingest", content=body)
        statuses.append(response.status_code)
        event(f"status {response.status_code}")
        assert response.status_code < 500, response.text
        assert response.headers["content-type"] == "application/json"
        after = db.count(device_id)
        if response.status_code == 200:
            assert after - before == response.json()["inserted"]
        else:
            assert after == before

    check()
    # The generator must reach both sides, or the property says little.
    assert statuses.count(200) >= 40
    assert statuses.count(422) >= 40
