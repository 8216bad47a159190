-- FlatRender Edge: exactly-once audit rows and monthly partitions (CONTRACT §9, issue 6).
--
-- 1. A replayed batch must change nothing: the proxy inserts with
--    ON CONFLICT (request_id, created_at) DO NOTHING and meters only the rows really inserted.
--    A unique index on a partitioned table must contain the partition key (created_at); every
--    partition, present and future, gets its own copy of the index automatically.
--    A request id alone is not unique: a client may send the same X-Request-Id twice (CONTRACT
--    §7 keeps a client's UUID), and those are two requests; a replay repeats created_at too.
--    (Not CONCURRENTLY: migrations run in a transaction. On a large existing log table, build
--    it by hand with CREATE INDEX CONCURRENTLY on each partition first.)

CREATE UNIQUE INDEX IF NOT EXISTS uq_api_logs_request
    ON identity.tenant_api_request_logs (request_id, created_at);

-- 2. The monthly partition holding `in_month` (any day of it), named like the seed's
--    tenant_api_request_logs_y2026m01 and bounded by UTC midnights. Idempotent and safe when
--    several proxies reach a new month at once: they serialise on an advisory lock, and a
--    loser of any remaining race treats "already there" as success. Used by the audit flusher
--    before writing a month it has not seen, and by `python -m proxy partitions ensure`.
--    lock_timeout: creating a partition locks the parent table; a long reader of the logs must
--    make this call fail (and be retried) rather than queue every audit insert behind it.

CREATE OR REPLACE FUNCTION identity.edge_ensure_request_log_partition(
    in_month date, OUT partition_name text, OUT created boolean)
LANGUAGE plpgsql
SET lock_timeout = '2s'
AS $$
DECLARE
    first date := date_trunc('month', in_month)::date;
BEGIN
    partition_name := format('tenant_api_request_logs_y%sm%s', to_char(first, 'YYYY'), to_char(first, 'MM'));
    created := false;
    IF to_regclass(format('identity.%I', partition_name)) IS NOT NULL THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('identity.tenant_api_request_logs'),
                                  (extract(year FROM first) * 12 + extract(month FROM first))::int);
    IF to_regclass(format('identity.%I', partition_name)) IS NOT NULL THEN
        RETURN;
    END IF;
    BEGIN
        EXECUTE format(
            'CREATE TABLE identity.%I PARTITION OF identity.tenant_api_request_logs '
            'FOR VALUES FROM (%L) TO (%L)',
            partition_name,
            first::timestamp AT TIME ZONE 'UTC',
            (first + interval '1 month')::timestamp AT TIME ZONE 'UTC');
        created := true;
    EXCEPTION
        WHEN duplicate_table OR unique_violation THEN
            NULL;  -- another session created it between our check and our CREATE
        WHEN invalid_object_definition THEN
            -- "would overlap partition": an operator's partition (another name or range)
            -- already covers this month, or part of it; rows it does not cover fail their
            -- batch, which is retried and spooled, never lost.
            NULL;
    END;
END $$;
