"""schema.sql: the hypertable, its key, and that applying it again is harmless."""

import pytest


def test_p1_samples_is_hypertable(db):
    rows = db.fetch(
        "SELECT hypertable_name FROM timescaledb_information.hypertables WHERE hypertable_name = 'p1_samples'"
    )
    assert len(rows) == 1


def test_partitioned_on_ts_by_day(db):
    row = db.fetch(
        """
        SELECT column_name, time_interval
        FROM timescaledb_information.dimensions
        WHERE hypertable_name = 'p1_samples'
        """
    )
    assert [(r["column_name"], r["time_interval"].days) for r in row] == [("ts", 1)]


def test_primary_key_is_device_and_ts(db):
    columns = db.fetch(
        """
        SELECT a.attname
        FROM pg_index i
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
        WHERE i.indrelid = 'p1_samples'::regclass AND i.indisprimary
        ORDER BY array_position(i.indkey::int2[], a.attnum)
        """
    )
    assert [column["attname"] for column in columns] == ["device_id", "ts"]


@pytest.mark.parametrize(
    ("column", "data_type", "nullable"),
    [
        ("device_id", "text", "NO"),
        ("ts", "timestamp with time zone", "NO"),
        ("power_w", "integer", "NO"),
        ("import_power_w", "integer", "NO"),
        ("energy_import_kwh", "double precision", "YES"),
        ("energy_export_kwh", "double precision", "YES"),
    ],
)
def test_column_types(db, column, data_type, nullable):
    row = db.fetch(
        "SELECT data_type, is_nullable FROM information_schema.columns "
        "WHERE table_name = 'p1_samples' AND column_name = $1",
        column,
    )
    assert [(r["data_type"], r["is_nullable"]) for r in row] == [(data_type, nullable)]


def test_schema_applies_on_apache_edition(stack, db):
    # The session's cluster runs the Apache-2 build, so schema.sql having
    # applied there proves it needs nothing of the Timescale edition.
    if stack.postgres is None:
        pytest.skip("needs the cluster that the test session started")
    assert db.fetchval("SHOW timescaledb.license") == "apache"


def test_schema_applies_twice(stack, db, device_id):
    if stack.postgres is None:
        pytest.skip("needs the cluster that the test session started")
    db.execute("INSERT INTO p1_samples VALUES ($1, now(), 1, 1, NULL, NULL)", device_id)
    stack.postgres.apply_schema()
    stack.postgres.apply_schema()
    assert db.count(device_id) == 1
    assert db.fetchval("SELECT count(*) FROM timescaledb_information.hypertables") == 1
