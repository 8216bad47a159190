"""``events publish`` and ``webhooks run|enable|replay`` (CONTRACT §11).

Arguments are checked before the database is touched (nothing half-written); every refusal is
a ``ConfigError``, which the CLI prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import asyncpg
import orjson

from proxy.core.events import valid_type
from proxy.settings import ConfigError, load_settings, parse_host_port

_T = TypeVar("_T")


class OnDatabase(Protocol):
    def __call__(self, dsn: str, work: Callable[[asyncpg.Connection], Awaitable[_T]]) -> _T: ...


def add_commands(sub: Any) -> None:
    """Register the sub-commands on the main parser's ``add_subparsers()`` object."""
    events = sub.add_parser("events", help="events for the tenants' webhooks")
    events_sub = events.add_subparsers(dest="events_command", metavar="publish", required=True)
    publish = events_sub.add_parser("publish", help="publish an event (as a render service does)")
    publish.add_argument("--tenant", required=True, help="tenant slug")
    publish.add_argument("--type", required=True, help="e.g. render.completed")
    publish.add_argument("--data", default="{}", help="a JSON object (default {})")
    publish.add_argument("--id", help="event id (UUID; default: a new one)")
    hooks = sub.add_parser("webhooks", help="the webhook dispatcher and its operations")
    hooks_sub = hooks.add_subparsers(dest="webhooks_command", required=True)
    run = hooks_sub.add_parser("run", help="run a dispatcher alone until SIGTERM")
    run.add_argument("--config", help="TOML file (default: $EDGE_CONFIG or config/edge.toml)")
    run.add_argument("--admin-listen", help="HOST:PORT serving /metrics and /healthz")
    enable = hooks_sub.add_parser("enable", help="re-enable a disabled webhook")
    enable.add_argument("webhook_id", metavar="WEBHOOK_ID")
    replay = hooks_sub.add_parser("replay", help="deliver an event again")
    replay.add_argument("--event", required=True, metavar="EVENT_ID")
    replay.add_argument("--webhook", metavar="WEBHOOK_ID")


def _uuid(value: str, what: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ConfigError(f"{what}: not a UUID: {value!r}") from None


def _dsn(command: str) -> str:
    dsn = os.environ.get("DATABASE_URL")
    if not dsn:
        raise ConfigError(f"DATABASE_URL: required by {command}")
    return dsn


def run(args: argparse.Namespace, on_database: OnDatabase) -> int:
    """Run ``events ...`` or ``webhooks ...``; ``on_database`` is the CLI's one way of doing a
    command's work on a connection of its own, every failure mapped to one line."""
    if args.command == "events":
        return _events(args, on_database)
    return _webhooks(args, on_database)


def _events(args: argparse.Namespace, on_database: OnDatabase) -> int:
    from proxy.webhooks.store import publish

    if not valid_type(args.type):
        raise ConfigError(
            f"--type: expected two or more dotted lower-case words "
            f"(e.g. render.completed), got {args.type!r}"
        )
    try:
        data = orjson.loads(args.data)
    except orjson.JSONDecodeError:
        raise ConfigError(f"--data: not JSON: {args.data!r}") from None
    if not isinstance(data, dict):
        raise ConfigError("--data: must be a JSON object")
    event_id = _uuid(args.id, "--id") if args.id else str(uuid.uuid4())
    dsn = _dsn("events publish")
    new = on_database(
        dsn,
        lambda c: publish(
            c, args.tenant, args.type, orjson.dumps(data).decode(), event_id, datetime.now(UTC)
        ),
    )
    print(json.dumps({"id": event_id, "new": new}))
    return 0


def _webhooks(args: argparse.Namespace, on_database: OnDatabase) -> int:
    from proxy.webhooks.store import enable, replay

    if args.webhooks_command == "run":
        return _run(args)
    if args.webhooks_command == "enable":
        webhook_id = _uuid(args.webhook_id, "WEBHOOK_ID")
        on_database(_dsn("webhooks enable"), lambda c: enable(c, webhook_id))
        print(json.dumps({"id": webhook_id, "enabled": True}))
        return 0
    event_id = _uuid(args.event, "--event")
    hook = _uuid(args.webhook, "--webhook") if args.webhook else None
    made = on_database(_dsn("webhooks replay"), lambda c: replay(c, event_id, hook))
    print(json.dumps({"event": event_id, "deliveries": made}))
    return 0


def _run(args: argparse.Namespace) -> int:
    import uvloop

    from proxy.logs import start_logging
    from proxy.webhooks.runner import run_alone

    admin = parse_host_port(args.admin_listen, "--admin-listen") if args.admin_listen else None
    settings = load_settings(os.environ, args.config)
    if settings.database_url is None:
        raise ConfigError("DATABASE_URL: required by webhooks run")
    listener = start_logging()
    try:
        uvloop.run(run_alone(settings, admin))
    finally:
        listener.stop()
    return 0
