"""The command line of CONTRACT §1 and §10: serve, check, migrate, partitions ensure,
keys create|revoke|rotate, domains add|check (§12).

Every failure the operator can cause (bad arguments, bad configuration, unreachable database)
is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import asyncpg

from proxy.settings import ConfigError, Settings, load_settings, parse_host_port

_T = TypeVar("_T")

if TYPE_CHECKING:
    from proxy.domains.challenge import Method
    from proxy.worker_metrics import WorkerSet


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line like ours (CONTRACT §1), not usage + error.
    Sub-command parsers are made of the same class, so they inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flatrender-edge", description="FlatRender edge proxy")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="TOML file (default: $EDGE_CONFIG or config/edge.toml)")
    serve.add_argument("--listen", help="HOST:PORT of the public listener")
    serve.add_argument("--admin-listen", help="HOST:PORT of the admin listener")
    serve.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    check = sub.add_parser(
        "check", help="validate the configuration as serve would, and the stores it names"
    )
    check.add_argument("--config", help="TOML file (default: $EDGE_CONFIG or config/edge.toml)")
    sub.add_parser("migrate", help="apply sql/ to DATABASE_URL")
    partitions = sub.add_parser("partitions", help="monthly partitions of the audit log")
    partitions_sub = partitions.add_subparsers(
        dest="partitions_command", metavar="ensure", required=True
    )
    ensure = partitions_sub.add_parser(
        "ensure", help="create this month's partition and the next N months'"
    )
    # Read as text and checked by us: argparse's own type errors print two lines (usage too).
    ensure.add_argument("--months-ahead", metavar="N", default=str(MONTHS_AHEAD_DEFAULT))
    keys = sub.add_parser("keys", help="mint or revoke API keys in DATABASE_URL")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="mint a key; prints it once as JSON")
    create.add_argument("--tenant", required=True, help="tenant slug")
    create.add_argument("--name", required=True)
    create.add_argument("--scope", action="append", default=[], help="repeatable")
    create.add_argument("--rpm", type=int, default=600, help="requests per minute")
    create.add_argument("--test", action="store_true", help="an fr_test_ key")
    create.add_argument("--allow-ip", action="append", default=None, help="CIDR, repeatable")
    create.add_argument("--expires", help="ISO 8601 time with a UTC offset")
    revoke = keys_sub.add_parser("revoke", help="revoke a key everywhere within a second")
    revoke.add_argument("key_id", metavar="KEY_ID")
    revoke.add_argument("--reason")
    rotate = keys_sub.add_parser("rotate", help="mint a successor; the old key lives --grace more")
    rotate.add_argument("key_id", metavar="KEY_ID")
    rotate.add_argument("--grace", default="24h", help="90s, 15m, 24h, 7d or 0 (at most 30d)")
    _domains_parser(sub)
    from proxy.webhooks.cli import add_commands as add_webhook_commands

    add_webhook_commands(sub)
    return parser


def _domains_parser(sub: Any) -> None:
    domains = sub.add_parser("domains", help="custom-domain verification (database mode)")
    domains_sub = domains.add_subparsers(dest="domains_command", required=True)
    add = domains_sub.add_parser("add", help="set a tenant's custom domain and open a challenge")
    add.add_argument("--tenant", required=True, help="tenant slug")
    add.add_argument("--domain", required=True)
    add.add_argument("--method", choices=("http", "dns"), default="http")
    add.add_argument("--replace", action="store_true", help="replace a verified custom domain")
    add.add_argument("--config", help="TOML file (default: $EDGE_CONFIG or config/edge.toml)")
    check = domains_sub.add_parser("check", help="check the due challenges now, once")
    check.add_argument("--domain", help="this domain's pending challenges, whatever their schedule")
    check.add_argument("--config", help="TOML file (default: $EDGE_CONFIG or config/edge.toml)")


def _with_overrides(settings: Settings, args: argparse.Namespace) -> Settings:
    server = settings.server
    if args.listen:
        server = replace(server, listen=parse_host_port(args.listen, "--listen"))
    if args.admin_listen:
        server = replace(server, admin_listen=parse_host_port(args.admin_listen, "--admin-listen"))
    return replace(settings, server=server)


def _check_bindable(settings: Settings) -> None:
    """Fail with one line before forking workers, not with N tracebacks after."""
    import socket

    for key, hp in (
        ("--listen", settings.server.listen),
        ("--admin-listen", settings.server.admin_listen),
    ):
        family = socket.AF_INET6 if ":" in hp.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind((hp.host, hp.port))
            except OSError as e:
                raise ConfigError(f"{key}: cannot listen on {hp}: {e.strerror or e}") from None


def _validated(config: str | None) -> Settings:
    """The configuration as ``serve`` takes it, and ``check`` checks it: the file and the
    environment, then what serve needs before it starts (the stores' own configuration such
    as the embedded tenants file, the span exporter, the audit spool), every problem at once."""
    from proxy.app import build_stores
    from proxy.audit.spool import spool_dir_problem
    from proxy.telemetry import span_exporter

    settings = load_settings(os.environ, config)
    problems: list[str] = []
    for validate in (lambda: build_stores(settings), lambda: span_exporter(settings.telemetry)):
        try:
            validate()
        except ConfigError as e:
            problems.extend(e.problems)
    if settings.database_url is not None:  # the spool holds audit rows Postgres did not take
        problems.extend(filter(None, [spool_dir_problem(settings.audit.spool_dir)]))
    if problems:
        raise ConfigError(*problems)
    return settings


def _check_workers(settings: Settings, workers: int) -> None:
    """Each worker keeps its own quota counts without Redis: a metered route would then admit
    a tenant's quota once per worker."""
    metered = any(route.meter == "renders" for route in settings.routes)
    if workers > 1 and settings.redis_url is None and metered:
        raise ConfigError(
            f'--workers {workers}: a metered route (meter = "renders") needs REDIS_URL'
            " to count the quota exactly across processes"
        )


def _serve(args: argparse.Namespace) -> int:
    from proxy.app import build_stores, serve
    from proxy.supervisor import run_workers
    from proxy.worker_metrics import WorkerSet

    if args.workers < 1:
        raise ConfigError(f"--workers: must be at least 1, got {args.workers}")

    def load() -> Settings:  # at each SIGHUP: refused (ConfigError) like a bad start-up
        fresh = _with_overrides(load_settings(os.environ, args.config), args)
        _check_workers(fresh, args.workers)
        return fresh

    settings = _with_overrides(_validated(args.config), args)
    _check_workers(settings, args.workers)
    _check_bindable(settings)

    def worker(workers: WorkerSet | None = None) -> int:
        import uvloop

        from proxy.logs import start_logging

        listener = start_logging()  # per process: a thread does not survive a fork
        try:
            uvloop.run(serve(settings, build_stores(settings), load, workers))
        except OSError as e:
            print(f"flatrender-edge: error: cannot listen: {e.strerror or e}", file=sys.stderr)
            return 2
        finally:
            listener.stop()
        return 0

    if args.workers == 1:
        return worker()
    # Where each worker serves its own /metrics to its siblings (proxy.worker_metrics).
    directory = Path(tempfile.mkdtemp(prefix="flatrender-edge-workers-"))
    try:
        return run_workers(
            args.workers, lambda index: worker(WorkerSet(directory, index, args.workers))
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _check(args: argparse.Namespace) -> int:
    from proxy.check import store_problems

    problems = asyncio.run(store_problems(_validated(args.config)))
    if problems:
        raise ConfigError(*problems)
    print("ok")
    return 0


def _migrate(_args: argparse.Namespace) -> int:
    from proxy.migrate import MigrationError, apply_migrations

    dsn = os.environ.get("DATABASE_URL")
    if not dsn:
        raise ConfigError("DATABASE_URL: required by migrate")
    try:
        applied = asyncio.run(apply_migrations(dsn))
    except MigrationError as e:
        raise ConfigError(str(e)) from None
    for name in applied:
        print(f"applied {name}")
    if not applied:
        print("nothing to apply")
    return 0


MONTHS_AHEAD_DEFAULT = 3
MONTHS_AHEAD_MAX = 120  # ten years: a typo must not create thousands of tables


def _partitions(args: argparse.Namespace) -> int:
    from proxy.audit.partitions import Partition, ensure_partition, month_of, months_from

    text = args.months_ahead.strip()
    if not text.isdigit() or int(text) > MONTHS_AHEAD_MAX:
        raise ConfigError(
            f"--months-ahead: expected a whole number from 0 to {MONTHS_AHEAD_MAX}, "
            f"got {args.months_ahead!r}"
        )
    dsn = os.environ.get("DATABASE_URL")
    if not dsn:
        raise ConfigError("DATABASE_URL: required by partitions")
    months = months_from(month_of(datetime.now(UTC)), int(text))

    async def ensure(conn: asyncpg.Connection) -> list[Partition]:
        return [await ensure_partition(conn, m) for m in months]

    made = _on_database(dsn, ensure)
    for p in made:
        print(f"{'created' if p.created else 'exists'} identity.{p.name}")
    return 0


def _create_args(args: argparse.Namespace) -> dict[str, Any]:
    """Validate everything before touching the database: nothing half-written."""
    from proxy.core.apikeys import valid_scope

    if not args.name.strip():
        raise ConfigError("--name: must not be empty")
    for scope in args.scope:
        if not valid_scope(scope):
            raise ConfigError(f"--scope: expected resource:action, resource:* or *, got {scope!r}")
    if args.rpm <= 0:
        raise ConfigError(f"--rpm: must be a positive integer, got {args.rpm}")
    allowed = None
    if args.allow_ip is not None:
        try:
            allowed = [str(ipaddress.ip_network(c, strict=False)) for c in args.allow_ip]
        except ValueError as e:
            raise ConfigError(f"--allow-ip: {e}") from None
    expires = None
    if args.expires:
        try:
            expires = datetime.fromisoformat(args.expires)
        except ValueError:
            raise ConfigError(f"--expires: not an ISO 8601 time: {args.expires!r}") from None
        if expires.tzinfo is None:
            raise ConfigError("--expires: needs a UTC offset (e.g. 2027-01-01T00:00:00Z)")
        if expires <= datetime.now(UTC):
            raise ConfigError("--expires: is in the past")
    return {
        "tenant_slug": args.tenant,
        "name": args.name,
        "environment": "test" if args.test else "live",
        "scopes": args.scope,
        "rpm": args.rpm,
        "allowed_ips": allowed,
        "expires_at": expires,
    }


GRACE_MAX_S = 30 * 86400  # CONTRACT §5


def _grace(text: str) -> timedelta:
    from proxy.core.durations import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError as e:
        raise ConfigError(f"--grace: {e}") from None
    if seconds > GRACE_MAX_S:
        raise ConfigError(f"--grace: at most 30d, got {text!r}")
    return timedelta(seconds=seconds)


def _keys(args: argparse.Namespace) -> int:
    from proxy.stores.keyadmin import create_key, revoke_key, rotate_key

    dsn = os.environ.get("DATABASE_URL")
    if not dsn:
        raise ConfigError("DATABASE_URL: required by keys")
    if args.keys_command == "create":
        fields = _create_args(args)
    else:
        try:
            key_id = str(uuid.UUID(args.key_id))
        except ValueError:
            raise ConfigError(f"KEY_ID: not a UUID: {args.key_id!r}") from None
        if args.keys_command == "rotate":
            grace = _grace(args.grace)

    async def run(conn: asyncpg.Connection) -> dict[str, object]:
        if args.keys_command in ("create", "rotate"):
            if args.keys_command == "create":
                new = await create_key(conn, **fields)
            else:
                new = await rotate_key(conn, key_id, grace, datetime.now(UTC))
            return {
                "id": new.id,
                "key": new.key,
                "key_prefix": new.key_prefix,
                "last4": new.last4,
            }
        revoked_at = await revoke_key(conn, key_id, args.reason)
        return {"id": key_id, "revoked_at": revoked_at.isoformat()}

    result = _on_database(dsn, run)
    print(json.dumps(result))
    return 0


def _domains(args: argparse.Namespace) -> int:
    from proxy.core.hosts import BadHost, normalize_host
    from proxy.domains.rules import domain_refusal

    settings = load_settings(os.environ, args.config)
    if settings.database_url is None:
        raise ConfigError("DATABASE_URL: required by domains")
    domain = None
    if args.domain is not None:
        try:
            domain = normalize_host(args.domain)
        except BadHost:
            raise ConfigError(f"--domain: not a host name: {args.domain!r}") from None
    if args.domains_command == "add":
        assert domain is not None  # required by the parser
        refusal = domain_refusal(domain, settings.tenancy.platform_domains)
        if refusal is not None:
            raise ConfigError(f"--domain: {refusal}")
        lines = _on_database(
            settings.database_url, lambda conn: _domains_add(conn, args, domain, settings)
        )
    else:
        lines = _on_database(
            settings.database_url, lambda conn: _domains_check(conn, domain, settings)
        )
    for line in lines:
        print(json.dumps(line))
    return 0


async def _domains_add(
    conn: asyncpg.Connection, args: argparse.Namespace, domain: str, settings: Settings
) -> list[dict[str, object]]:
    from proxy.domains.challenge import instructions, new_token
    from proxy.domains.store import DomainStore

    method: Method = "DNS_TXT" if args.method == "dns" else "HTTP_FILE"
    now = datetime.now(UTC)
    added = await DomainStore(conn).add(
        tenant_slug=args.tenant,
        domain=domain,
        method=method,
        token=new_token(),
        expires_at=now + timedelta(seconds=settings.domains.challenge_ttl_s),
        replace=args.replace,
    )
    return [
        {
            "id": added.id,
            "domain": added.domain,
            "method": added.method,
            "token": added.token,
            "expires_at": added.expires_at.isoformat(),
            "instructions": instructions(added.domain, added.method, added.token),
        }
    ]


async def _domains_check(
    conn: asyncpg.Connection, domain: str | None, settings: Settings
) -> list[dict[str, object]]:
    from proxy.domains.service import open_checker
    from proxy.domains.store import DomainStore
    from proxy.domains.verifier import CheckCounters, run_pass

    async with open_checker(settings.domains) as checker:
        reports = await run_pass(
            DomainStore(conn),
            checker,
            lambda: datetime.now(UTC),
            settings.tenancy.platform_domains,
            CheckCounters(),
            domain,
        )
    return [r.as_json() for r in reports]


def _on_database(dsn: str, work: Callable[[asyncpg.Connection], Awaitable[_T]]) -> _T:
    """``work`` on one connection of its own; every failure is one line (CONTRACT §1)."""
    from proxy.domains.store import DomainRefused
    from proxy.migrate import MigrationError, close_connection, open_connection
    from proxy.stores.keyadmin import KeyAdminError
    from proxy.webhooks.store import AdminError

    async def run() -> _T:
        conn = await open_connection(dsn)
        try:
            return await work(conn)
        finally:
            await close_connection(conn)

    try:
        return asyncio.run(run())
    except (MigrationError, KeyAdminError, DomainRefused, AdminError) as e:
        raise ConfigError(str(e)) from None
    except (
        asyncpg.InvalidSchemaNameError,
        asyncpg.UndefinedFunctionError,
        asyncpg.UndefinedTableError,
    ):
        raise ConfigError("database not migrated: run `python -m proxy migrate` first") from None
    except asyncpg.PostgresError as e:
        raise ConfigError(f"database refused: {' '.join(str(e).split())}") from None
    except (OSError, TimeoutError, asyncpg.InterfaceError) as e:
        raise ConfigError(f"database connection lost: {type(e).__name__}") from None


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "check":
            return _check(args)
        if args.command == "keys":
            return _keys(args)
        if args.command == "partitions":
            return _partitions(args)
        if args.command == "domains":
            return _domains(args)
        if args.command in ("events", "webhooks"):
            from proxy.webhooks import cli

            return cli.run(args, _on_database)
        return _migrate(args)
    except ConfigError as e:
        for problem in e.problems:
            print(f"flatrender-edge: error: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
