"""The two write paths: one INSERT ... unnest statement for small batches, COPY through the staging table for large."""

import asyncio
import json
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from helpers import sample, series

import app as service

WRITE_FUNCTIONS = {"insert_rows": service.insert_rows, "copy_rows": service.copy_rows}

# One batch size on each side of the threshold, so the endpoint takes each path once.
PATH_SIZES = {
    "insert_rows": service.MAX_ROWS_PER_INSERT,
    "copy_rows": service.MAX_ROWS_PER_INSERT + 1,
}


def make_rows(count: int, start: datetime = datetime(2024, 3, 1, tzinfo=UTC)) -> list[tuple]:
    """Return rows in ROW_COLUMNS order, with negative, zero, fractional and NULL values among them."""
    return [
        (
            start + timedelta(seconds=index, microseconds=index * 250),
            index - count // 2,
            max(index - count // 2, 0),
            None if index % 3 == 0 else 6627.966 + index / 1000,
            None if index % 4 == 0 else 12.5 + index / 8,
        )
        for index in range(count)
    ]


def write(stack, function, device_id: str, *batches: list[tuple]) -> list[int]:
    """Write each batch with the service's pool settings and one connection, and return the inserted counts."""

    async def run() -> list[int]:
        pool = await asyncpg.create_pool(
            stack.database_url, min_size=1, max_size=1,
            init=service.prepare_connection, reset=service.skip_session_reset,
        )
        try:
            return [await function(pool, device_id, rows, 5.0) for rows in batches]
        finally:
            await pool.close()

    return asyncio.run(run())


def stored_rows(db, device_id: str) -> list[tuple]:
    """Return the device's stored rows in ROW_COLUMNS order."""
    return [tuple(row.values())[1:] for row in db.rows(device_id)]


@pytest.mark.parametrize("name", WRITE_FUNCTIONS)
@pytest.mark.parametrize("count", [1, 10, 250])
def test_write_function_stores_exact_values(stack, db, device_id, name, count):
    rows = make_rows(count)
    assert write(stack, WRITE_FUNCTIONS[name], device_id, rows) == [count]
    assert stored_rows(db, device_id) == rows


@pytest.mark.parametrize("name", WRITE_FUNCTIONS)
def test_write_function_counts_only_new_rows(stack, db, device_id, name):
    rows = make_rows(30)
    changed = [(row[0], 999, 999, 1.0, 2.0) for row in rows[10:20]]
    assert write(stack, WRITE_FUNCTIONS[name], device_id, rows[:20], changed + rows[20:], rows) == [20, 10, 0]
    assert stored_rows(db, device_id) == rows


@pytest.mark.parametrize("name", WRITE_FUNCTIONS)
def test_write_function_stores_all_or_nothing(stack, db, device_id, name):
    rows = make_rows(20)
    # power_w is NOT NULL, so the last row fails inside the database after the others were sent.
    rows[-1] = (rows[-1][0], None, *rows[-1][2:])
    with pytest.raises(asyncpg.NotNullViolationError):
        write(stack, WRITE_FUNCTIONS[name], device_id, rows)
    assert db.count(device_id) == 0


def test_write_function_empty_batch(stack, device_id):
    assert write(stack, service.insert_rows, device_id, []) == [0]


def test_write_rows_chooses_path_by_size(stack, db, device_id, monkeypatch):
    calls = []
    for name, function in WRITE_FUNCTIONS.items():
        async def spy(pool, device, rows, timeout_s, name=name, function=function):
            calls.append((name, len(rows)))
            return await function(pool, device, rows, timeout_s)
        monkeypatch.setattr(service, name, spy)

    small = make_rows(service.MAX_ROWS_PER_INSERT)
    large = make_rows(service.MAX_ROWS_PER_INSERT + 1, start=datetime(2024, 3, 2, tzinfo=UTC))
    assert write(stack, service.write_rows, device_id, small, large) == [len(small), len(large)]
    assert calls == [("insert_rows", len(small)), ("copy_rows", len(large))]
    assert db.count(device_id) == len(small) + len(large)


@pytest.mark.parametrize("path", PATH_SIZES)
def test_ingest_path_stores_exact_values(client, device_id, db, path):
    samples = series(device_id, PATH_SIZES[path])
    response = client.post("/v1/ingest", json={"samples": samples})
    assert response.json() == {"inserted": len(samples), "received": len(samples)}

    rows = db.rows(device_id)
    assert [row["ts"] for row in rows] == [datetime.fromisoformat(s["ts"]) for s in samples]
    assert [row["power_w"] for row in rows] == [s["power_w"] for s in samples]
    assert [row["import_power_w"] for row in rows] == [s["import_power_w"] for s in samples]
    assert [row["energy_import_kwh"] for row in rows] == [s["energy_import_kwh"] for s in samples]
    assert [row["energy_export_kwh"] for row in rows] == [s["energy_export_kwh"] for s in samples]


@pytest.mark.parametrize("path", PATH_SIZES)
def test_ingest_path_first_duplicate_wins(client, device_id, db, path):
    samples = series(device_id, PATH_SIZES[path])
    # The same instant as the first sample, written with another offset, and a repeat of the last one.
    first_again = sample(device_id, "2024-03-01T13:00:00+01:00", power_w=-7, import_power_w=7)
    last_again = {**samples[-1], "power_w": 12345, "import_power_w": 12345}
    body = {"samples": [*samples[:-1], first_again, samples[-1], last_again]}
    response = client.post("/v1/ingest", json=body)
    assert response.json() == {"inserted": len(samples), "received": len(samples) + 2}

    rows = db.rows(device_id)
    assert len(rows) == len(samples)
    assert rows[0]["power_w"] == samples[0]["power_w"]
    assert rows[-1]["power_w"] == samples[-1]["power_w"]


@pytest.mark.parametrize("path", PATH_SIZES)
def test_ingest_path_counts_only_new_rows(client, device_id, db, path):
    samples = series(device_id, PATH_SIZES[path] + 10)
    assert client.post("/v1/ingest", json={"samples": samples[:10]}).json()["inserted"] == 10
    response = client.post("/v1/ingest", json={"samples": samples[:-10]})
    assert response.json() == {"inserted": len(samples) - 20, "received": len(samples) - 10}
    assert db.count(device_id) == len(samples) - 10


def test_batch_rows_first_wins():
    samples = service.decode_batch(
        json.dumps({"samples": [
            sample("d", "2024-03-01T12:00:02Z", power_w=2),
            sample("d", "2024-03-01T12:00:00Z", power_w=0),
            sample("d", "2024-03-01T13:00:02+01:00", power_w=99),
            sample("d", "2024-03-01T12:00:01Z", power_w=1),
        ]}).encode(),
        service.Settings(database_url="postgresql://x", redis_url="redis://x", device_tokens={}),
    )
    assert [row[1] for row in service.batch_rows(samples)] == [2, 0, 1]


@pytest.mark.parametrize(
    ("stamps", "expected"),
    [
        (["12:00:00Z", "12:00:01Z", "12:00:02Z"], [0, 1, 2]),
        (["12:00:00Z", "13:00:00+01:00", "12:00:01Z"], [0, 2]),
        (["12:00:01Z", "12:00:01Z"], [0]),
        (["12:00:02Z", "12:00:01Z", "12:00:00Z"], [0, 1, 2]),
    ],
    ids=["in order", "same instant in another offset", "repeated", "newest first"],
)
def test_batch_rows_one_row_per_timestamp(stamps, expected):
    body = {"samples": [sample("d", f"2024-03-01T{stamp}", power_w=index) for index, stamp in enumerate(stamps)]}
    samples = service.decode_batch(
        json.dumps(body).encode(),
        service.Settings(database_url="postgresql://x", redis_url="redis://x", device_tokens={}),
    )
    assert [row[1] for row in service.batch_rows(samples)] == expected


@pytest.mark.parametrize("name", WRITE_FUNCTIONS)
def test_opposite_orders_never_deadlock(stack, db, device_id, name):
    # Two uploads of the same rows, one in reverse order, as a device that
    # sends its backlog newest first while its retry of the same rows is in
    # flight. Unsorted inserts deadlock here in most rounds.
    size = PATH_SIZES[name]

    async def run() -> list:
        pool = await asyncpg.create_pool(
            stack.database_url, min_size=2, max_size=2,
            init=service.prepare_connection, reset=service.skip_session_reset,
        )
        results = []
        try:
            for round_number in range(10):
                rows = make_rows(size, start=datetime(2024, 4, 1, tzinfo=UTC) + timedelta(hours=round_number))
                results += await asyncio.gather(
                    WRITE_FUNCTIONS[name](pool, device_id, rows, 10.0),
                    WRITE_FUNCTIONS[name](pool, device_id, rows[::-1], 10.0),
                    return_exceptions=True,
                )
        finally:
            await pool.close()
        return results

    results = asyncio.run(run())
    assert [result for result in results if isinstance(result, BaseException)] == []
    assert sum(results) == 10 * size
    assert db.count(device_id) == 10 * size
