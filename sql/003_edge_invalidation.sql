-- FlatRender Edge: cache invalidation by LISTEN/NOTIFY (CONTRACT §3: a change to a tenant, key,
-- branding or settings row reaches every running proxy within 1 s).
--
-- Every change notifies channel 'flatrender_edge' after commit (NOTIFY is transactional) with
-- a small JSON payload naming exactly what a proxy must evict: the tenant id and the old AND new
-- slug / custom domain / key prefix, so a host or key that was unknown and becomes known is
-- evicted from the negative cache too. TRUNCATE sends {"all": true}: flush everything.
-- The payload never carries secrets (key hashes, webhook secrets).

CREATE OR REPLACE FUNCTION identity.edge_notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    o jsonb := CASE WHEN TG_OP IN ('UPDATE', 'DELETE') THEN to_jsonb(OLD) END;
    n jsonb := CASE WHEN TG_OP IN ('INSERT', 'UPDATE') THEN to_jsonb(NEW) END;
    r jsonb := COALESCE(n, o);
    tid uuid;
    slugs text[] := '{}';
    domains text[] := '{}';
    prefixes text[] := '{}';
BEGIN
    -- The proxy's own batched usage writes (usage_count, last_used_at, last_used_ip, and the
    -- updated_at they bump) change nothing a proxy caches: notifying them would evict every
    -- active key once per flush and turn the cache into a query per key per flush.
    IF TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'tenant_api_keys'
       AND o - '{usage_count,last_used_at,last_used_ip,updated_at}'::text[]
         = n - '{usage_count,last_used_at,last_used_ip,updated_at}'::text[] THEN
        RETURN NULL;
    END IF;
    IF TG_TABLE_NAME = 'tenants' THEN
        tid := (r ->> 'id')::uuid;
        slugs := ARRAY[o ->> 'slug', n ->> 'slug'];
        domains := ARRAY[o ->> 'custom_domain', n ->> 'custom_domain'];
    ELSIF TG_TABLE_NAME = 'tenant_domain_verifications' THEN
        tid := (r ->> 'tenant_id')::uuid;
        domains := ARRAY[o ->> 'domain', n ->> 'domain'];
    ELSE
        tid := (r ->> 'tenant_id')::uuid;
        -- Branding, settings and keys are cached with their tenant under its slug and domain.
        SELECT array_agg(t.slug::text), array_agg(t.custom_domain::text)
          INTO slugs, domains
          FROM identity.tenants t WHERE t.id = tid;
        IF TG_TABLE_NAME = 'tenant_api_keys' THEN
            prefixes := ARRAY[o ->> 'key_prefix', n ->> 'key_prefix'];
        END IF;
    END IF;
    PERFORM pg_notify('flatrender_edge', jsonb_build_object(
        'table', TG_TABLE_NAME,
        'tenant_id', tid,
        'slugs', (SELECT coalesce(jsonb_agg(DISTINCT lower(s)), '[]') FROM unnest(slugs) s WHERE s IS NOT NULL),
        'domains', (SELECT coalesce(jsonb_agg(DISTINCT lower(d)), '[]') FROM unnest(domains) d WHERE d IS NOT NULL),
        'prefixes', (SELECT coalesce(jsonb_agg(DISTINCT p), '[]') FROM unnest(prefixes) p WHERE p IS NOT NULL)
    )::text);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION identity.edge_notify_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('flatrender_edge', jsonb_build_object('table', TG_TABLE_NAME, 'all', true)::text);
    RETURN NULL;
END $$;

DO $$
DECLARE
    tbl text;
BEGIN
    FOREACH tbl IN ARRAY ARRAY['tenants', 'tenant_branding', 'tenant_settings',
                               'tenant_api_keys', 'tenant_domain_verifications'] LOOP
        EXECUTE format('CREATE TRIGGER edge_notify_change AFTER INSERT OR UPDATE OR DELETE ON identity.%I '
                       'FOR EACH ROW EXECUTE FUNCTION identity.edge_notify_change()', tbl);
        EXECUTE format('CREATE TRIGGER edge_notify_truncate AFTER TRUNCATE ON identity.%I '
                       'FOR EACH STATEMENT EXECUTE FUNCTION identity.edge_notify_truncate()', tbl);
    END LOOP;
END $$;
