-- Prelude: what 002_identity_tenants.sql assumes already exists.
-- (Its header: "It assumes the schema `identity`, the extension citext and the
--  function public.tg_set_updated_at() already exist.")
-- gen_random_uuid() is built into PostgreSQL 13+, so pgcrypto is not needed.

CREATE SCHEMA IF NOT EXISTS identity;

CREATE EXTENSION IF NOT EXISTS citext;

-- BEFORE UPDATE trigger body shared by every table with an updated_at column.
CREATE OR REPLACE FUNCTION public.tg_set_updated_at() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;
