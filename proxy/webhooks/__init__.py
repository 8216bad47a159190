"""Webhook delivery (CONTRACT §11): the dispatcher (claim, send, record), Standard Webhooks
signing, the destination (SSRF) policy, and the Postgres store they share."""
