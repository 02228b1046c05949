-- Optional compression and retention policies for p1_samples.
--
-- They need the Timescale edition of TimescaleDB (the timescale/timescaledb
-- images without -oss, license "timescale"); the Apache edition rejects them,
-- and this file then stops before it changes anything. Apply it after
-- schema.sql, once, by hand:
--
--   psql -v ON_ERROR_STOP=1 -v compress_after='7 days' -v drop_after='730 days' \
--       -f schema-timescale.sql
--
-- Both variables are optional and default to the values above. Applying it
-- again keeps existing policies: to change an interval, remove the policy
-- first (see docs/operations.md).

\if :{?compress_after}
\else
    \set compress_after '7 days'
\endif
\if :{?drop_after}
\else
    \set drop_after '730 days'
\endif

DO $$
BEGIN
    IF current_setting('timescaledb.license') <> 'timescale' THEN
        RAISE EXCEPTION 'schema-timescale.sql needs the Timescale edition of TimescaleDB, but this server runs the % edition',
            current_setting('timescaledb.license')
            USING HINT = 'Use a timescale/timescaledb image without -oss in its tag, or skip these optional policies.';
    END IF;
END
$$;

-- Compressed chunks are stored per device, newest first, which is how the
-- realtime and history queries read them. An upload older than
-- compress_after still succeeds but has to write into a compressed chunk,
-- which is slower, so compress_after should exceed the longest backlog an
-- edge device keeps.
ALTER TABLE p1_samples SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'device_id',
    timescaledb.compress_orderby = 'ts DESC'
);

SELECT add_compression_policy('p1_samples', compress_after => :'compress_after'::interval, if_not_exists => TRUE);

-- Dropping a chunk deletes its samples for good: nothing aggregates them
-- first.
SELECT add_retention_policy('p1_samples', drop_after => :'drop_after'::interval, if_not_exists => TRUE);
