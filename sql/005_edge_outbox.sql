-- FlatRender Edge: events published by the render services (a transactional outbox), their
-- fan-out into webhook deliveries, and render metering (CONTRACT §11).
--
-- A render service calls identity.publish_event() inside its own transaction: the event row,
-- one delivery per matching webhook, the usage counters and the NOTIFY that wakes the
-- dispatchers all commit or roll back together with the caller's own work.

-- 1. Events, idempotent by id: a second publish of an id changes nothing. Rows are kept for
--    webhooks.retention_days after publish_time (the dispatchers delete older ones), so an id
--    is remembered as "already published" for that long.
CREATE TABLE IF NOT EXISTS identity.edge_events (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES identity.tenants(id) ON DELETE CASCADE,
    type         text NOT NULL,
    data         jsonb NOT NULL,
    occurred_at  timestamptz NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_edge_events_published ON identity.edge_events (published_at);

-- 2. The lease of an attempt being made. A dispatcher claims a due row by moving its
--    next_retry_at to the end of the lease and writing a fresh lease_token; it records the
--    outcome only while the token is still its own (a fencing token), so a dispatcher that
--    outlived its lease cannot overwrite the attempt another one has made since.
ALTER TABLE identity.tenant_webhook_deliveries ADD COLUMN IF NOT EXISTS lease_token uuid;
-- Retention deletes finished attempts by age.
CREATE INDEX IF NOT EXISTS idx_webhook_deliveries_finished
    ON identity.tenant_webhook_deliveries (created_at) WHERE next_retry_at IS NULL;

-- 3. Event types: two or more dotted lower-case words ("render.completed").
CREATE OR REPLACE FUNCTION identity.edge_event_type_valid(event_type text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT event_type ~ '^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$'
$$;

-- A webhook's `events` entry covers a type when it is the type itself, "*", or "prefix.*"
-- with the type starting with "prefix." ("render.*" covers render.completed and
-- render.job.done, not "render"). The same rule as proxy.core.events.covers, which the tests
-- compare with this function on one table of cases.
CREATE OR REPLACE FUNCTION identity.edge_event_type_matches(patterns text[], event_type text)
RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM unnest(patterns) AS p
         WHERE p = event_type
            OR p = '*'
            OR (right(p, 2) = '.*' AND length(p) > 2
                AND left(event_type, length(p) - 1) = left(p, length(p) - 1))
    )
$$;

-- The body every attempt of a delivery sends (and the row's payload).
CREATE OR REPLACE FUNCTION identity.edge_event_payload(e identity.edge_events) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'id', e.id,
        'type', e.type,
        'timestamp', to_char(e.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'tenant_id', e.tenant_id,
        'data', e.data)
$$;

-- 4. Publish. Returns true for a new event, false for an id already published (and then does
--    nothing else). Refuses (raises) a malformed type, a data value that is not an object,
--    and render metering fields that are not non-negative numbers: a wrong bill is worse than
--    a failed publish the caller sees.
--    The parameter names are the contract's, so that named notation works; inside, they are
--    written qualified (publish_event.type) and bare names mean columns.
CREATE OR REPLACE FUNCTION identity.publish_event(
    id uuid, tenant_id uuid, type text, data jsonb, occurred_at timestamptz)
RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    event_data jsonb := coalesce(publish_event.data, '{}'::jsonb);
    event_type text := publish_event.type;
    e identity.edge_events;
    day date;
    seconds numeric := 0;
    compute numeric := 0;
    fanned integer;
BEGIN
    IF publish_event.id IS NULL OR publish_event.tenant_id IS NULL
       OR publish_event.occurred_at IS NULL THEN
        RAISE EXCEPTION 'publish_event: id, tenant_id and occurred_at are required'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF event_type IS NULL OR NOT identity.edge_event_type_valid(event_type) THEN
        RAISE EXCEPTION 'publish_event: invalid event type %', quote_nullable(event_type)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'two or more dotted lower-case words, e.g. render.completed';
    END IF;
    IF jsonb_typeof(event_data) <> 'object' THEN
        RAISE EXCEPTION 'publish_event: data must be a JSON object'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF event_type = 'render.completed' THEN
        IF event_data ? 'render_seconds' THEN
            IF jsonb_typeof(event_data -> 'render_seconds') <> 'number'
               OR (event_data ->> 'render_seconds')::numeric < 0 THEN
                RAISE EXCEPTION 'publish_event: data.render_seconds must be a non-negative number'
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
            seconds := (event_data ->> 'render_seconds')::numeric;
        END IF;
        IF event_data ? 'compute_seconds' THEN
            IF jsonb_typeof(event_data -> 'compute_seconds') <> 'number'
               OR (event_data ->> 'compute_seconds')::numeric < 0 THEN
                RAISE EXCEPTION 'publish_event: data.compute_seconds must be a non-negative number'
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
            compute := (event_data ->> 'compute_seconds')::numeric;
        END IF;
    END IF;

    -- Idempotent by id. A concurrent publish of the same id waits here for the first
    -- transaction, then finds the row and returns false.
    INSERT INTO identity.edge_events (id, tenant_id, type, data, occurred_at)
    VALUES (publish_event.id, publish_event.tenant_id, event_type, event_data,
            publish_event.occurred_at)
    ON CONFLICT (id) DO NOTHING
    RETURNING * INTO e;
    IF NOT FOUND THEN
        RETURN false;
    END IF;

    INSERT INTO identity.tenant_webhook_deliveries
        (webhook_id, tenant_id, event_type, event_id, payload, request_url, attempt, next_retry_at)
    SELECT w.id, e.tenant_id, e.type, e.id, identity.edge_event_payload(e), w.url, 1, now()
      FROM identity.tenant_webhooks w
     WHERE w.tenant_id = e.tenant_id AND w.is_active AND w.disabled_at IS NULL
       AND identity.edge_event_type_matches(w.events, e.type);
    GET DIAGNOSTICS fanned = ROW_COUNT;

    -- Render metering (renders_started is counted by the edge itself, CONTRACT §13). Whole
    -- seconds in the BIGINT columns: fractions are rounded half up per event.
    IF e.type IN ('render.completed', 'render.failed') THEN
        day := (e.occurred_at AT TIME ZONE 'UTC')::date;
        INSERT INTO identity.tenant_usage_daily AS u
            (tenant_id, usage_date, renders_completed, renders_failed, render_seconds,
             render_compute_sec)
        VALUES (e.tenant_id, day,
                CASE WHEN e.type = 'render.completed' THEN 1 ELSE 0 END,
                CASE WHEN e.type = 'render.failed' THEN 1 ELSE 0 END,
                round(seconds)::bigint, round(compute)::bigint)
        ON CONFLICT (tenant_id, usage_date) DO UPDATE SET
            renders_completed = u.renders_completed + EXCLUDED.renders_completed,
            renders_failed = u.renders_failed + EXCLUDED.renders_failed,
            render_seconds = u.render_seconds + EXCLUDED.render_seconds,
            render_compute_sec = u.render_compute_sec + EXCLUDED.render_compute_sec;
    END IF;

    -- Delivered at commit (NOTIFY is transactional; equal payloads in one transaction fold into
    -- one): the dispatchers LISTENing wake at once instead of at their next poll.
    IF fanned > 0 THEN
        PERFORM pg_notify('flatrender_edge_deliveries', '');
    END IF;
    RETURN true;
END $$;
