"""The command line as an operator meets it (CONTRACT §1): one-line errors, exit codes, migrate."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from tests.procs import ROOT, free_port
from tests.servers import PostgresServer

GOOD = (ROOT / "config" / "edge.toml").read_text()


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=ROOT,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (
            lambda c: c.replace(
                'upstream = "render-api"\nauth = "none"', 'upstream = "nope"\nauth = "none"', 1
            ),
            ("routes[1].upstream", "nope"),
        ),
        (
            lambda c: c.replace('"http://127.0.0.1:9001"', '"127.0.0.1:9001"'),
            ("upstreams.render-api.urls",),
        ),
        (lambda c: c.replace('["127.0.0.1/32"]', '["10.0.0.0/33"]'), ("server.trusted_proxies",)),
        (
            lambda c: c.replace("read_timeout_s = 60", "read_timout_s = 60"),
            ("upstreams.render-api.read_timout_s", "unknown key"),
        ),
        (lambda c: c.replace("[ratelimit]", "[ratelimit\n"), ("invalid TOML",)),
        (
            lambda c: c.replace('failure_mode = "open"', 'failure_mode = "sometimes"'),
            ("ratelimit.failure_mode",),
        ),
    ],
)
def test_bad_configuration_is_one_line_and_non_zero(
    tmp_path: Path, edit: object, needles: tuple[str, ...]
) -> None:
    config = tmp_path / "edge.toml"
    config.write_text(edit(GOOD))  # type: ignore[operator]
    assert_one_line_error(run("serve", "--config", str(config)), *needles)


def test_missing_file_and_bad_env_are_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run("serve", "--config", str(tmp_path / "none.toml")), "not found")
    assert_one_line_error(run("serve", env={"REDIS_MODE": "cluster-ish"}), "REDIS_MODE")
    assert_one_line_error(run("serve", "--listen", "nohost"), "--listen")


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = run(
            "serve", "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{free_port()}"
        )
    assert_one_line_error(result, "cannot listen")


def test_bad_arguments_exit_non_zero() -> None:
    result = run("serve", "--workers", "two")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert run("frobnicate").returncode == 2


def test_workers_on_a_metered_route_need_redis() -> None:
    """The shipped configuration meters /v1/renders: an in-process quota per worker would
    admit the quota once per process."""
    result = run(
        "serve",
        "--workers",
        "2",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--admin-listen",
        f"127.0.0.1:{free_port()}",
    )
    assert_one_line_error(result, "--workers 2", "REDIS_URL")
    assert result.returncode == 2


def test_migrate_twice_via_cli(postgres_server: PostgresServer) -> None:
    dsn = postgres_server.create_database(f"cli_{uuid.uuid4().hex[:12]}")
    first = run("migrate", env={"DATABASE_URL": dsn})
    assert first.returncode == 0, first.stderr
    assert "applied 001_prelude.sql" in first.stdout
    assert "applied 002_identity_tenants.sql" in first.stdout
    second = run("migrate", env={"DATABASE_URL": dsn})
    assert second.returncode == 0, second.stderr
    assert "nothing to apply" in second.stdout

    async def tables() -> set[str]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "select table_name from information_schema.tables where table_schema='identity'"
            )
        finally:
            await conn.close()
        return {r["table_name"] for r in rows}

    import asyncio

    names = asyncio.run(tables())
    assert {
        "tenants",
        "tenant_api_keys",
        "tenant_api_request_logs",
        "tenant_usage_daily",
        "tenant_branding",
        "tenant_settings",
        "tenant_domain_verifications",
    } <= names


def test_migrate_unreachable_database_is_one_line() -> None:
    dsn = f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/x"
    result = run("migrate", env={"DATABASE_URL": dsn})
    assert_one_line_error(result, "unreachable")
    assert "hunter2" not in result.stderr
    assert_one_line_error(run("migrate"), "DATABASE_URL")
