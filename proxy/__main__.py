"""Command line (CONTRACT §1): ``serve`` and ``migrate``.

Every failure the operator can cause (bad arguments, bad configuration, unreachable database)
is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace

from proxy.settings import ConfigError, Settings, load_settings, parse_host_port


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flatrender-edge", description="FlatRender edge proxy")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="TOML file (default: $EDGE_CONFIG or config/edge.toml)")
    serve.add_argument("--listen", help="HOST:PORT of the public listener")
    serve.add_argument("--admin-listen", help="HOST:PORT of the admin listener")
    serve.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    sub.add_parser("migrate", help="apply sql/ to DATABASE_URL")
    return parser


def _with_overrides(settings: Settings, args: argparse.Namespace) -> Settings:
    server = settings.server
    if args.listen:
        server = replace(server, listen=parse_host_port(args.listen, "--listen"))
    if args.admin_listen:
        server = replace(server, admin_listen=parse_host_port(args.admin_listen, "--admin-listen"))
    return replace(settings, server=server)


def _serve(args: argparse.Namespace) -> int:
    from proxy.app import build_stores, serve

    if args.workers != 1:
        raise ConfigError("--workers: only 1 is supported in this version")
    settings = _with_overrides(load_settings(os.environ, args.config), args)
    stores = build_stores(settings)
    try:
        import uvloop

        uvloop.run(serve(settings, stores))
    except OSError as e:
        raise ConfigError(f"cannot listen: {e.strerror or e}") from None
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


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        return _migrate(args)
    except ConfigError as e:
        print(f"flatrender-edge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
