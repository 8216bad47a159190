-- FlatRender Edge: fixes to webhook delivery and render metering (CONTRACT §11).

-- 1. Exact render metering. tenant_usage_daily's render_seconds and render_compute_sec are
--    BIGINT, and rounding each event (005) billed 0.4 s as 0 however many there were. The
--    exact per tenant-day sums live here; publish_event keeps the BIGINT columns at their
--    floor.
CREATE TABLE IF NOT EXISTS identity.edge_usage_seconds (
    tenant_id       uuid NOT NULL REFERENCES identity.tenants(id) ON DELETE CASCADE,
    usage_date      date NOT NULL,
    render_seconds  numeric NOT NULL DEFAULT 0,
    compute_seconds numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, usage_date)
);

-- 2. publish_event as in 005, metering exact sums (above).
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
    total_seconds numeric;
    total_compute numeric;
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

    -- Render metering (renders_started is counted by the edge itself, CONTRACT §13). The
    -- exact sums go to edge_usage_seconds; the BIGINT columns get what their floor gained
    -- from this event, so over a day they hold the floor of the exact sum (0.4 s three times
    -- bills 1 s, not 0). The upsert's row lock orders concurrent publishes of a tenant-day.
    IF e.type IN ('render.completed', 'render.failed') THEN
        day := (e.occurred_at AT TIME ZONE 'UTC')::date;
        INSERT INTO identity.edge_usage_seconds AS x
            (tenant_id, usage_date, render_seconds, compute_seconds)
        VALUES (e.tenant_id, day, seconds, compute)
        ON CONFLICT (tenant_id, usage_date) DO UPDATE SET
            render_seconds = x.render_seconds + EXCLUDED.render_seconds,
            compute_seconds = x.compute_seconds + EXCLUDED.compute_seconds
        RETURNING x.render_seconds, x.compute_seconds INTO total_seconds, total_compute;
        INSERT INTO identity.tenant_usage_daily AS u
            (tenant_id, usage_date, renders_completed, renders_failed, render_seconds,
             render_compute_sec)
        VALUES (e.tenant_id, day,
                CASE WHEN e.type = 'render.completed' THEN 1 ELSE 0 END,
                CASE WHEN e.type = 'render.failed' THEN 1 ELSE 0 END,
                (floor(total_seconds) - floor(total_seconds - seconds))::bigint,
                (floor(total_compute) - floor(total_compute - compute))::bigint)
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

-- 3. Waiting attempts by webhook, then time: the dispatchers find the webhooks with waiting
--    attempts by skipping through this index, and each one's earliest, without walking past
--    the backlog of a webhook at its cap (a black-holed receiver's).
CREATE INDEX IF NOT EXISTS idx_webhook_deliveries_waiting
    ON identity.tenant_webhook_deliveries (webhook_id, next_retry_at, id)
    WHERE succeeded = false AND next_retry_at IS NOT NULL;
