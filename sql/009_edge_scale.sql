-- FlatRender Edge: room on each page for the rows the proxy updates over and over.
--
-- tenant_api_keys gets a usage update per active key per audit.usage_flush_interval_s, and
-- tenant_usage_daily one per (tenant, day) per audit batch. Neither update touches an indexed
-- column, so Postgres can make it a heap-only tuple (HOT: no new index entries, the old
-- version pruned in place), but only when the new version fits on the same page. At the
-- default fillfactor of 100 a page is full after the bulk of its rows were inserted, and most
-- updates then move to another page and write every index again.
--
-- The setting applies to pages written from now on; an existing table's full pages gain room
-- as their rows are updated and pruned (VACUUM FULL or pg_repack rewrite them at once).

ALTER TABLE identity.tenant_api_keys SET (fillfactor = 80);
ALTER TABLE identity.tenant_usage_daily SET (fillfactor = 70);
