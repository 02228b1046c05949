"""GET /v1/history, checked against aggregates computed here from the raw samples.

The reference below works on the samples as sent, with Python's zoneinfo
and Decimal, and shares no code or SQL with the service.
"""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from helpers import sample

import p1_to_samples

DATA = Path(__file__).parent / "data"
AMSTERDAM = ZoneInfo("Europe/Amsterdam")
WIDTHS = {"1m": 60, "5m": 300, "15m": 900, "1h": 3600}


def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts)


def bucket_start(ts: datetime, bucket: str, zone: ZoneInfo) -> datetime:
    """Start of the local-clock bucket of ``ts``, as an aware datetime in ``zone``'s offset at that moment."""
    local = ts.astimezone(zone)
    if bucket == "1d":
        return datetime.combine(local.date(), time(0), tzinfo=zone)
    width = WIDTHS[bucket]
    seconds = local.hour * 3600 + local.minute * 60 + local.second
    # Subtract in UTC: arithmetic on a ZoneInfo datetime works on the wall clock
    # and loses the fold that tells the two passes of a repeated hour apart.
    floored = ts.astimezone(UTC) - timedelta(seconds=seconds % width, microseconds=local.microsecond)
    return floored.astimezone(zone)


def expected_history(stored: list[dict], start: datetime, end: datetime, bucket: str, zone: ZoneInfo) -> list[dict]:
    """Aggregate ``stored`` (every sample of the device) the way the API promises."""
    stored = sorted(stored, key=lambda entry: parse(entry["ts"]))
    in_range = [entry for entry in stored if start <= parse(entry["ts"]) < end]
    # Keys are UTC instants: aware datetimes that share a ZoneInfo compare by wall
    # clock, which would merge the two passes of a repeated hour.
    def key_of(ts: str) -> datetime:
        return bucket_start(parse(ts), bucket, zone).astimezone(UTC)

    groups: dict[datetime, list[dict]] = {}
    for entry in in_range:
        groups.setdefault(key_of(entry["ts"]), []).append(entry)

    energy = {field: {} for field in ("energy_import_kwh", "energy_export_kwh")}
    for field, per_bucket in energy.items():
        previous = None
        for entry in plausible_readings(stored, field):
            if parse(entry["ts"]) >= end:
                break
            value = Decimal(str(entry[field]))
            if parse(entry["ts"]) >= start:
                key = key_of(entry["ts"])
                step = Decimal(0) if previous is None else (value if value < previous else value - previous)
                per_bucket[key] = per_bucket.get(key, Decimal(0)) + step
            previous = value

    result = []
    for key in sorted(groups):
        entries = groups[key]
        power = [entry["power_w"] for entry in entries]
        result.append({
            "start": bucket_start(parse(entries[0]["ts"]), bucket, zone).isoformat(),
            "samples": len(entries),
            "power_w_avg": sum(power) / len(power),
            "power_w_min": min(power),
            "power_w_max": max(power),
            "import_power_w_avg": sum(entry["import_power_w"] for entry in entries) / len(entries),
            "energy_import_kwh": energy["energy_import_kwh"].get(key),
            "energy_export_kwh": energy["energy_export_kwh"].get(key),
        })
    return result


def plausible_readings(stored: list[dict], field: str) -> list[dict]:
    """The samples with a reading of ``field``, without single readings outside the span of two ordered neighbours."""
    readings = [entry for entry in stored if entry.get(field) is not None]
    kept = []
    for index, entry in enumerate(readings):
        if 0 < index < len(readings) - 1:
            before, after = readings[index - 1][field], readings[index + 1][field]
            if before <= after and not before <= entry[field] <= after:
                continue
        kept.append(entry)
    return kept


def assert_buckets_match(actual: list[dict], expected: list[dict]) -> None:
    assert [entry["start"] for entry in actual] == [entry["start"] for entry in expected]
    for got, want in zip(actual, expected, strict=True):
        assert got["samples"] == want["samples"], got["start"]
        assert got["power_w_avg"] == pytest.approx(want["power_w_avg"], abs=1e-3), got["start"]
        assert got["power_w_min"] == want["power_w_min"], got["start"]
        assert got["power_w_max"] == want["power_w_max"], got["start"]
        assert got["import_power_w_avg"] == pytest.approx(want["import_power_w_avg"], abs=1e-3), got["start"]
        for field in ("energy_import_kwh", "energy_export_kwh"):
            if want[field] is None:
                assert got[field] is None, (got["start"], field)
            else:
                assert got[field] == pytest.approx(float(want[field]), abs=1e-9), (got["start"], field)


def get_history(client, start: str, end: str, bucket: str, tz: str = "Europe/Amsterdam"):
    return client.get("/v1/history", params={"from": start, "to": end, "bucket": bucket, "tz": tz})


def store(client, samples: list[dict]) -> None:
    for first in range(0, len(samples), 1000):
        response = client.post("/v1/ingest", json={"samples": samples[first : first + 1000]})
        assert response.status_code == 200, response.text


@pytest.fixture
def iskra(client, device_id):
    samples = p1_to_samples.samples_from_series_csv(DATA / "nielsbasjes-iskra-am550-dsmr5-1s.csv", device_id)
    store(client, samples)
    return samples


@pytest.fixture
def gaborvar(client, device_id):
    samples = p1_to_samples.samples_from_series_csv(DATA / "gaborvar-hu-20230502-10s.csv", device_id)
    store(client, samples)
    return samples


@pytest.mark.parametrize("bucket", ["1m", "5m", "15m", "1h", "1d"])
def test_real_1s_series_each_bucket(client, iskra, bucket):
    start, end = "2019-03-24T15:00:00+01:00", "2019-03-24T16:00:00+01:00"
    response = get_history(client, start, end, bucket)
    assert response.status_code == 200
    expected = expected_history(iskra, parse(start), parse(end), bucket, AMSTERDAM)
    assert_buckets_match(response.json()["buckets"], expected)
    assert response.json()["totals"]["samples"] == 566


@pytest.mark.parametrize("bucket", ["1m", "5m", "15m", "1h", "1d"])
def test_real_10s_series_across_midnight(client, gaborvar, bucket):
    start, end = "2023-05-02T21:55:00+02:00", "2023-05-03T00:40:00+02:00"
    response = get_history(client, start, end, bucket, "Europe/Budapest")
    assert response.status_code == 200
    expected = expected_history(gaborvar, parse(start), parse(end), bucket, ZoneInfo("Europe/Budapest"))
    assert_buckets_match(response.json()["buckets"], expected)


def test_real_series_buckets_add_up_to_counter_change(client, gaborvar):
    start, end = "2023-05-02T22:00:00+02:00", "2023-05-03T00:00:00+02:00"
    body = get_history(client, start, end, "15m").json()
    readings = [entry for entry in gaborvar if parse(entry["ts"]) < parse(end)]
    before = [entry for entry in readings if parse(entry["ts"]) < parse(start)][-1]
    change = Decimal(str(readings[-1]["energy_import_kwh"])) - Decimal(str(before["energy_import_kwh"]))
    assert body["totals"]["energy_import_kwh"] == pytest.approx(float(change), abs=1e-9)
    assert sum(entry["energy_import_kwh"] for entry in body["buckets"]) == pytest.approx(float(change), abs=1e-9)


def test_adjacent_ranges_add_up(client, gaborvar):
    whole = get_history(client, "2023-05-02T21:00:00+02:00", "2023-05-03T02:00:00+02:00", "1h").json()
    first = get_history(client, "2023-05-02T21:00:00+02:00", "2023-05-02T23:30:00+02:00", "1h").json()
    second = get_history(client, "2023-05-02T23:30:00+02:00", "2023-05-03T02:00:00+02:00", "1h").json()
    total = first["totals"]["energy_import_kwh"] + second["totals"]["energy_import_kwh"]
    assert total == pytest.approx(whole["totals"]["energy_import_kwh"], abs=1e-9)


def minute_series(device_id: str, start: datetime, end: datetime) -> list[dict]:
    """One sample a minute from start to end, counters rising 0.001 kWh a minute."""
    # Aware datetimes with a ZoneInfo add timedeltas on the wall clock, so step in UTC.
    samples = []
    moment = start.astimezone(UTC)
    index = 0
    while moment < end:
        samples.append(sample(
            device_id, moment.isoformat(), power_w=60 + index % 7, import_power_w=60 + index % 7,
            energy_import_kwh=round(100 + index * 0.001, 3), energy_export_kwh=0.0,
        ))
        moment += timedelta(minutes=1)
        index += 1
    return samples


@pytest.mark.parametrize(
    ("day", "hours"),
    [pytest.param("2024-03-31", 23, id="spring-23h"), pytest.param("2024-10-27", 25, id="autumn-25h")],
)
def test_dst_day_lasts_local_midnight_to_midnight(client, device_id, day, hours):
    local_start = datetime.fromisoformat(day).replace(tzinfo=AMSTERDAM)
    local_end = (local_start + timedelta(days=1, hours=12)).replace(hour=0)
    samples = minute_series(device_id, local_start - timedelta(hours=3), local_end + timedelta(hours=3))
    store(client, samples)

    response = get_history(client, local_start.isoformat(), local_end.isoformat(), "1d")
    buckets = response.json()["buckets"]
    assert [entry["start"] for entry in buckets] == [local_start.isoformat()]
    assert buckets[0]["samples"] == hours * 60
    assert buckets[0]["energy_import_kwh"] == pytest.approx(hours * 60 * 0.001, abs=1e-9)
    expected = expected_history(samples, local_start, local_end, "1d", AMSTERDAM)
    assert_buckets_match(buckets, expected)


def test_dst_spring_hours(client, device_id):
    start = datetime(2024, 3, 31, tzinfo=AMSTERDAM)
    samples = minute_series(device_id, start, start.astimezone(UTC) + timedelta(hours=5))
    store(client, samples)
    end = start.astimezone(UTC) + timedelta(hours=5)
    buckets = get_history(client, start.isoformat(), end.isoformat(), "1h").json()["buckets"]
    assert [entry["start"] for entry in buckets] == [
        "2024-03-31T00:00:00+01:00",
        "2024-03-31T01:00:00+01:00",
        "2024-03-31T03:00:00+02:00",
        "2024-03-31T04:00:00+02:00",
        "2024-03-31T05:00:00+02:00",
    ]
    assert [entry["samples"] for entry in buckets] == [60, 60, 60, 60, 60]


def test_dst_autumn_repeated_hour_twice(client, device_id):
    start = datetime(2024, 10, 27, tzinfo=AMSTERDAM)
    end = datetime(2024, 10, 27, 5, tzinfo=AMSTERDAM)
    samples = minute_series(device_id, start, end)
    store(client, samples)
    buckets = get_history(client, start.isoformat(), end.isoformat(), "1h").json()["buckets"]
    assert [entry["start"] for entry in buckets] == [
        "2024-10-27T00:00:00+02:00",
        "2024-10-27T01:00:00+02:00",
        "2024-10-27T02:00:00+02:00",
        "2024-10-27T02:00:00+01:00",
        "2024-10-27T03:00:00+01:00",
        "2024-10-27T04:00:00+01:00",
    ]
    assert [entry["samples"] for entry in buckets] == [60] * 6
    assert_buckets_match(buckets, expected_history(samples, start, end, "1h", AMSTERDAM))


@pytest.mark.parametrize("bucket", ["15m", "1h"])
def test_half_hour_zone_buckets(client, device_id, bucket):
    zone = ZoneInfo("Asia/Kolkata")
    start = datetime(2024, 6, 1, 9, 0, tzinfo=UTC)
    samples = minute_series(device_id, start, start + timedelta(hours=3))
    store(client, samples)
    response = get_history(client, start.isoformat(), (start + timedelta(hours=3)).isoformat(), bucket, zone.key)
    expected = expected_history(samples, start, start + timedelta(hours=3), bucket, zone)
    # 09:00Z is 14:30 in Kolkata, so the first hour bucket starts at 14:00 local time.
    first_start = {"15m": "2024-06-01T14:30:00+05:30", "1h": "2024-06-01T14:00:00+05:30"}[bucket]
    assert response.json()["buckets"][0]["start"] == first_start
    assert_buckets_match(response.json()["buckets"], expected)


def test_counter_reset_counts_from_zero(client, device_id):
    values = [100.0, 100.5, 101.0, 0.2, 0.7]
    samples = [
        sample(device_id, f"2024-05-01T10:0{index}:00Z", energy_import_kwh=value, energy_export_kwh=None)
        for index, value in enumerate(values)
    ]
    store(client, samples)
    body = get_history(client, "2024-05-01T10:00:00Z", "2024-05-01T11:00:00Z", "1m").json()
    assert [entry["energy_import_kwh"] for entry in body["buckets"]] == pytest.approx([0, 0.5, 0.5, 0.2, 0.5])
    assert body["totals"]["energy_import_kwh"] == pytest.approx(1.7)
    assert body["totals"]["energy_export_kwh"] is None


def test_damaged_reading_ignored(client, device_id):
    # The middle telegram lost its tariff 2 line, so its summed counter dropped for one reading.
    values = [29681.851, 16366.259, 29681.853, 29681.860]
    samples = [
        sample(device_id, f"2024-05-01T10:00:0{index * 5}Z", energy_import_kwh=value)
        for index, value in enumerate(values[:2])
    ] + [
        sample(device_id, "2024-05-01T10:00:10Z", energy_import_kwh=values[2]),
        sample(device_id, "2024-05-01T11:30:00Z", energy_import_kwh=values[3]),
    ]
    store(client, samples)
    body = get_history(client, "2024-05-01T10:00:00Z", "2024-05-01T11:00:00Z", "1h", "UTC").json()
    assert body["totals"]["energy_import_kwh"] == pytest.approx(0.002, abs=1e-9)
    assert_buckets_match(
        body["buckets"], expected_history(samples, parse(body["from"]), parse(body["to"]), "1h", ZoneInfo("UTC")),
    )


def test_damaged_last_reading_ignored_once_next_arrives(client, device_id):
    store(client, [
        sample(device_id, "2024-05-01T10:00:00Z", energy_import_kwh=500.0),
        sample(device_id, "2024-05-01T10:59:00Z", energy_import_kwh=5.0),
    ])
    window = ("2024-05-01T10:00:00Z", "2024-05-01T11:00:00Z", "1h", "UTC")
    # Alone, the drop looks like a replaced meter that counted 5 kWh.
    assert get_history(client, *window).json()["totals"]["energy_import_kwh"] == pytest.approx(5.0)
    store(client, [sample(device_id, "2024-05-01T11:01:00Z", energy_import_kwh=500.2)])
    assert get_history(client, *window).json()["totals"]["energy_import_kwh"] == pytest.approx(0.0)


def test_gap_omits_empty_buckets(client, device_id):
    morning = minute_series(device_id, datetime(2024, 5, 2, 8, tzinfo=UTC), datetime(2024, 5, 2, 9, tzinfo=UTC))
    evening = minute_series(device_id, datetime(2024, 5, 2, 12, tzinfo=UTC), datetime(2024, 5, 2, 13, tzinfo=UTC))
    for index, entry in enumerate(evening):
        entry["energy_import_kwh"] = round(200 + index * 0.001, 3)
    store(client, morning + evening)

    body = get_history(client, "2024-05-02T08:00:00Z", "2024-05-02T14:00:00Z", "1h", "UTC").json()
    assert body["empty_buckets"] == "omitted"
    assert [entry["start"] for entry in body["buckets"]] == ["2024-05-02T08:00:00+00:00", "2024-05-02T12:00:00+00:00"]
    # The energy used during the gap is booked in the bucket where the gap ends.
    assert body["buckets"][1]["energy_import_kwh"] == pytest.approx(200.059 - 100.059, abs=1e-9)
    expected = expected_history(morning + evening, parse(body["from"]), parse(body["to"]), "1h", ZoneInfo("UTC"))
    assert_buckets_match(body["buckets"], expected)


def test_samples_without_counters(client, device_id):
    samples = minute_series(device_id, datetime(2024, 5, 3, 8, tzinfo=UTC), datetime(2024, 5, 3, 9, tzinfo=UTC))
    for entry in samples[10:40]:
        entry["energy_import_kwh"] = None
    store(client, samples)
    body = get_history(client, "2024-05-03T08:00:00Z", "2024-05-03T09:00:00Z", "15m", "UTC").json()
    expected = expected_history(samples, parse(body["from"]), parse(body["to"]), "15m", ZoneInfo("UTC"))
    assert_buckets_match(body["buckets"], expected)
    assert body["totals"]["energy_import_kwh"] == pytest.approx(0.059, abs=1e-9)


def test_range_before_first_sample_is_empty(client, device_id):
    store(client, minute_series(device_id, datetime(2024, 5, 4, tzinfo=UTC), datetime(2024, 5, 4, 1, tzinfo=UTC)))
    body = get_history(client, "2024-05-01T00:00:00Z", "2024-05-02T00:00:00Z", "1h").json()
    assert body["buckets"] == []
    assert body["totals"] == {"samples": 0, "energy_import_kwh": None, "energy_export_kwh": None}


def test_only_own_device_counted(client, make_client, settings, device_id):
    store(client, minute_series(device_id, datetime(2024, 5, 5, tzinfo=UTC), datetime(2024, 5, 5, 1, tzinfo=UTC)))
    other_token = next(token for token, device in settings.device_tokens.items() if device != device_id)
    other = make_client()
    other.headers["Authorization"] = f"Bearer {other_token}"
    body = get_history(other, "2024-05-05T00:00:00Z", "2024-05-06T00:00:00Z", "1h").json()
    assert body["buckets"] == []


def test_unencoded_plus_offset_accepted(client, device_id):
    response = client.get("/v1/history?from=2024-05-01T00:00:00+02:00&to=2024-05-02T00:00:00+02:00&bucket=1h")
    assert response.status_code == 200
    assert response.json()["from"] == "2024-05-01T00:00:00+02:00"


def test_default_bucket_and_zone(client):
    body = client.get("/v1/history", params={"from": "2024-05-01T00:00:00Z", "to": "2024-05-02T00:00:00Z"}).json()
    assert body["bucket"] == "1h"
    assert body["tz"] == "Europe/Amsterdam"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        pytest.param({"to": "2024-05-02T00:00:00Z"}, "from", id="from-missing"),
        pytest.param({"from": "2024-05-01T00:00:00Z"}, "to", id="to-missing"),
        pytest.param({"from": "2024-05-01T00:00:00", "to": "2024-05-02T00:00:00Z"}, "from", id="from-naive"),
        pytest.param({"from": "2024-05-01T00:00:00Z", "to": "2024-05-02"}, "to", id="to-date-only"),
        pytest.param({"from": "yesterday", "to": "2024-05-02T00:00:00Z"}, "from", id="from-text"),
        pytest.param({"from": "2024-05-02T00:00:00Z", "to": "2024-05-02T00:00:00Z"}, "to", id="from-equals-to"),
        pytest.param({"from": "2024-05-03T00:00:00Z", "to": "2024-05-02T00:00:00Z"}, "to", id="from-after-to"),
        pytest.param(
            {"from": "2024-05-01T00:00:00Z", "to": "2024-05-02T00:00:00Z", "bucket": "2h"}, "bucket",
            id="bucket-unknown",
        ),
        pytest.param(
            {"from": "2024-05-01T00:00:00Z", "to": "2024-05-02T00:00:00Z", "tz": "Mars/Olympus"}, "tz",
            id="tz-unknown",
        ),
        pytest.param(
            {"from": "2024-05-01T00:00:00Z", "to": "2024-05-02T00:00:00Z", "tz": "../../etc/passwd"}, "tz",
            id="tz-path",
        ),
        pytest.param(
            {"from": "2024-01-01T00:00:00Z", "to": "2024-02-01T00:00:00Z", "bucket": "1m"}, "bucket",
            id="too-many-buckets",
        ),
        pytest.param(
            {"from": "0001-01-01T00:00:00+14:00", "to": "0001-01-01T12:00:00+14:00"}, "from", id="from-year-1",
        ),
        pytest.param(
            {"from": "2024-05-01T00:00:00Z", "to": "9999-12-31T23:00:00-12:00", "bucket": "1d"}, "to",
            id="to-year-9999",
        ),
        pytest.param({"from": "2024-05-01T00:00:00Z", "to": "2024-05-02T00:00:00Z", "tz": "x" * 5000}, "tz",
                     id="tz-very-long"),
        pytest.param({"from": "2024-05-01T00:00:00Z", "to": "2024-05-02T00:00:00Z", "tz": "localtime"}, "tz",
                     id="tz-localtime"),
        pytest.param({"from": "2024-05-01T00:00:00Z", "to": "2024-05-02T00:00:00Z", "tz": "Factory"}, "tz",
                     id="tz-factory"),
        pytest.param({"from": "2024-05-01T00:00:00Z", "to": "2024-05-02T00:00:00Z", "tz": "right/UTC"}, "tz",
                     id="tz-leap-seconds"),
        pytest.param({"from": "2024-05-01T00:00:00Z", "to": "2024-05-02T00:00:00Z", "tz": ""}, "tz", id="tz-empty"),
        pytest.param(
            [("from", "2024-05-01T00:00:00Z"), ("from", "2024-05-03T00:00:00Z"), ("to", "2024-05-02T00:00:00Z")],
            "from", id="from-repeated",
        ),
    ],
)
def test_bad_query_gives_422(client, params, field):
    response = client.get("/v1/history", params=params)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == field
    assert response.json()["error"].startswith(field)


def test_unencoded_plus_in_zone_accepted(client):
    response = client.get("/v1/history?from=2024-05-01T00:00:00Z&to=2024-05-02T00:00:00Z&tz=Etc/GMT+5")
    assert response.status_code == 200
    assert response.json()["tz"] == "Etc/GMT+5"


def test_max_buckets_allowed(client):
    response = client.get(
        "/v1/history", params={"from": "2024-01-01T00:00:00Z", "to": "2024-01-07T00:00:00Z", "bucket": "1m"},
    )
    assert response.status_code == 200
