-- Schema of the P1 ingest service. Apply it with
--   psql -v ON_ERROR_STOP=1 -f schema.sql
-- Every statement is idempotent, so applying it again changes nothing.
-- It uses only features of TimescaleDB's Apache-2 edition. Compression and
-- retention policies need the Timescale edition and live in
-- schema-timescale.sql.

CREATE EXTENSION IF NOT EXISTS timescaledb;

CREATE TABLE IF NOT EXISTS p1_samples (
    device_id         TEXT             NOT NULL,
    ts                TIMESTAMPTZ      NOT NULL,
    -- Net power in W, delivered minus returned: negative while solar panels export.
    power_w           INTEGER          NOT NULL,
    -- Power delivered to the site in W.
    import_power_w    INTEGER          NOT NULL,
    -- The meter's cumulative registers in kWh, tariffs summed; NULL when the meter sends none.
    energy_import_kwh DOUBLE PRECISION,
    energy_export_kwh DOUBLE PRECISION,
    PRIMARY KEY (device_id, ts)
);

-- One-day chunks. A meter sends up to one sample a second, 86,400 rows a
-- day, so a day of a fleet of a hundred meters is about 8.6 million rows.
-- At about 150 bytes a row with its index (measured on 107 million rows),
-- that is about 1.3 GB, small enough that the chunk being written stays in
-- the memory of a small VPS. A history query of a day touches one or two
-- chunks, and retention can drop whole days.
--
-- Every query filters on device_id, which the primary key index serves, so
-- the default index on ts alone is not created: it would only slow down
-- ingest. migrate_data lets this finish on a table that an earlier, failed
-- run created and filled before it became a hypertable.
SELECT create_hypertable(
    'p1_samples',
    by_range('ts', INTERVAL '1 day'),
    create_default_indexes => FALSE,
    if_not_exists => TRUE,
    migrate_data => TRUE
);
