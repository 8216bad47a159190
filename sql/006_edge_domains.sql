-- FlatRender Edge: the schedule of custom-domain checks (CONTRACT §12).
--
-- tenant_domain_verifications records when a row was last checked, not how many checks were
-- made, and the backoff needs that count (60 s × 1.5^(n-1) after the n-th check). The proxy
-- keeps its own row per verification: the checks made so far and when the row is due again
-- (computed by proxy.core.check_schedule). No row yet: never checked, due at once.
--
-- next_check_at is also the claim: a checker moves it forward (a lease) in the statement that
-- picks the due rows, so two checkers (a `serve` and `domains check`) never check one row at
-- the same time, and a checker that dies mid-check leaves the row due again when the lease ends.

CREATE TABLE IF NOT EXISTS identity.edge_domain_checks (
    verification_id UUID PRIMARY KEY
        REFERENCES identity.tenant_domain_verifications (id) ON DELETE CASCADE,
    checks          INT NOT NULL DEFAULT 0,
    next_check_at   TIMESTAMPTZ NOT NULL
);

-- The verifier looks for unverified, unexpired rows every second.
CREATE INDEX IF NOT EXISTS idx_domain_verif_pending
    ON identity.tenant_domain_verifications (expires_at) WHERE NOT verified;
