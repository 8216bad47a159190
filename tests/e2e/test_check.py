"""``python -m proxy check`` as an operator runs it (CONTRACT §10): ``ok`` and exit 0, or one
line per problem on stderr and exit 2, never a traceback; the stores it names are asked, and
one that does not answer costs at most ``tenancy.store_timeout_s`` + 5 s."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import uuid
from pathlib import Path

import asyncpg
import pytest

from proxy.migrate import MIGRATIONS_TABLE, discover_migrations
from tests.e2e.test_cli import GOOD, run
from tests.procs import free_port
from tests.servers import PostgresServer, RedisServer

STORE_TIMEOUT_S = 1.0


def problems(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The problem lines of a refusal: exit 2, nothing on stdout, no traceback."""
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    for line in lines:
        assert line.startswith("flatrender-edge: error: "), line
    return [line.removeprefix("flatrender-edge: error: ") for line in lines]


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", ""), result


def config(tmp_path: Path, text: str = GOOD) -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(text)
    return path


def test_a_good_file_is_ok_and_no_listener_is_opened(tmp_path: Path) -> None:
    # The file's public port is taken: serve would refuse to start, check binds nothing.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        text = GOOD.replace('listen = "127.0.0.1:8080"', f'listen = "127.0.0.1:{port}"')
        assert text != GOOD
        assert_ok(run("check", "--config", str(config(tmp_path, text))))
        # EDGE_CONFIG names the file when --config does not, as for serve
        assert_ok(run("check", env={"EDGE_CONFIG": str(tmp_path / "edge.toml")}))


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c.replace("[ratelimit]", "[ratelimit\n"), "invalid TOML"),
        (
            lambda c: c.replace("read_timeout_s = 60", "read_timout_s = 60"),
            "upstreams.render-api.read_timout_s: unknown key",
        ),
        (
            lambda c: c.replace("cache_ttl_s = 30", 'cache_ttl_s = "30s"'),
            "tenancy.cache_ttl_s: expected a positive number, got '30s'",
        ),
        (
            lambda c: c.replace('failure_mode = "open"', 'failure_mode = "sometimes"'),
            'ratelimit.failure_mode: expected "open" or "closed", got \'sometimes\'',
        ),
    ],
    ids=["syntax", "unknown key", "wrong type", "bad value"],
)
def test_each_kind_of_bad_file_is_one_line(tmp_path: Path, edit: object, expected: str) -> None:
    path = config(tmp_path, edit(GOOD))  # type: ignore[operator]
    [line] = problems(run("check", "--config", str(path)))
    assert line.startswith(f"{path}: {expected}"), line


def test_several_problems_are_one_line_each(tmp_path: Path) -> None:
    text = (
        GOOD.replace("read_timeout_s = 60", "read_timout_s = 60")
        .replace("cache_ttl_s = 30", "cache_ttl_s = -1")
        .replace('["127.0.0.1/32"]', '["10.0.0.0/33"]')
        .replace('upstream = "render-api"\nauth = "none"', 'upstream = "nope"\nauth = "none"', 1)
    )
    path = config(tmp_path, text)
    found = problems(run("check", "--config", str(path), env={"REDIS_MODE": "clustered"}))
    assert [line.split(": ")[1] for line in found] == [
        "server.trusted_proxies",
        "tenancy.cache_ttl_s",
        "upstreams.render-api.read_timout_s",
        "routes[1].upstream",
        "REDIS_MODE",
    ]
    assert all(line.startswith(f"{path}: ") for line in found)


def test_the_embedded_tenants_file_is_checked_as_serve_checks_it(tmp_path: Path) -> None:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(
        '[[tenants]]\nid = "t-1"\nslug = 7\nstatus = "Bogus"\nmonthly_render_quantity = 5\n'
    )
    text = GOOD.replace('embedded_file = "config/tenants.toml"', f'embedded_file = "{tenants}"')
    assert text != GOOD
    path = config(tmp_path, text)
    check, serve = run("check", "--config", str(path)), run("serve", "--config", str(path))
    assert problems(check) == problems(serve)
    assert problems(check) == [
        f"{tenants}: tenants[0].slug: expected a string, got 7",
        f"{tenants}: tenants[0].status: expected one of Active, Trial, Suspended, Cancelled, "
        "got 'Bogus'",
        f"{tenants}: tenants[0].monthly_render_quantity: unknown key",
    ]


def test_start_up_checks_of_serve_are_made(tmp_path: Path, migrated_dsn: str) -> None:
    """What serve refuses before it starts, beyond the file: an exporter that is not
    installed, a spool directory it could not use; check reports it the same, every line."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    spool = blocker / "spool"
    text = GOOD.replace('spool_dir = "var/spool"', f'spool_dir = "{spool}"')
    assert text != GOOD
    path = str(config(tmp_path, text))
    env = {"DATABASE_URL": migrated_dsn, "OTEL_TRACES_EXPORTER": "otlp"}
    check, serve = run("check", "--config", path, env=env), run("serve", "--config", path, env=env)
    assert problems(check) == problems(serve)
    assert problems(check) == [
        "OTEL_TRACES_EXPORTER: otlp needs opentelemetry-exporter-otlp installed",
        f"audit.spool_dir: cannot use {spool}: {blocker} is not a directory",
    ]
    # Tracing disabled: serve never asks for the exporter, and neither does check.
    env |= {"OTEL_SDK_DISABLED": "true"}
    [line] = problems(run("check", "--config", path, env=env))
    assert line.startswith("audit.spool_dir:"), line
    # Embedded mode writes no spool (rows go to audit.jsonl_path).
    assert_ok(run("check", "--config", path, env={"OTEL_SDK_DISABLED": "true"}))


def test_migrations_applied_and_unedited(tmp_path: Path, migrated_dsn: str) -> None:
    path = config(tmp_path)
    assert_ok(run("check", "--config", str(path), env={"DATABASE_URL": migrated_dsn}))

    names = [m.name for m in discover_migrations(Path("sql"))]
    first, last = names[0], names[-1]

    async def edit() -> None:
        conn = await asyncpg.connect(migrated_dsn)
        try:
            # As if sql/<last> were new since the last migrate, and sql/<first> edited after it.
            await conn.execute(f"DELETE FROM {MIGRATIONS_TABLE} WHERE name = $1", last)
            await conn.execute(
                f"UPDATE {MIGRATIONS_TABLE} SET checksum = repeat('0', 64) WHERE name = $1", first
            )
        finally:
            await conn.close()

    asyncio.run(edit())
    found = problems(run("check", "--config", str(path), env={"DATABASE_URL": migrated_dsn}))
    assert len(found) == 2, found
    assert found[0].startswith(f"migration {first} changed after it was applied"), found
    assert found[1].startswith(f"migration {last} is not applied"), found
    assert "python -m proxy migrate" in found[1]


def test_a_database_never_migrated(tmp_path: Path, postgres_server: PostgresServer) -> None:
    name = f"check_{uuid.uuid4().hex[:12]}"
    dsn = postgres_server.create_database(name)
    try:
        found = problems(run("check", "--config", str(config(tmp_path)), env={"DATABASE_URL": dsn}))
    finally:
        postgres_server.drop_database(name)
    expected = [m.name for m in discover_migrations(Path("sql"))]
    assert [line.split()[1] for line in found] == expected
    assert all("is not applied" in line for line in found)


def _timed(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    result = run(*args, env=env)
    return result, time.monotonic() - start


def test_redis_answering_stopped_and_paused(tmp_path: Path, own_redis: RedisServer) -> None:
    text = GOOD.replace(
        "cache_ttl_s = 30", f"cache_ttl_s = 30\nstore_timeout_s = {STORE_TIMEOUT_S}"
    )
    path = str(config(tmp_path, text))
    env = {"REDIS_URL": own_redis.url}
    assert_ok(run("check", "--config", path, env=env))

    # A SIGSTOPped Redis: the kernel accepts the connection, nothing ever answers.
    own_redis.pause()
    try:
        result, took = _timed("check", "--config", path, env=env)
    finally:
        own_redis.resume()
    [line] = problems(result)
    assert line.startswith(f"REDIS_URL: 127.0.0.1:{own_redis.port}: no answer within"), line
    assert took < STORE_TIMEOUT_S + 5, took

    own_redis.stop()
    result, took = _timed("check", "--config", path, env=env)
    [line] = problems(result)
    assert line.startswith(f"REDIS_URL: 127.0.0.1:{own_redis.port} does not answer"), line
    assert took < STORE_TIMEOUT_S + 5, took


def test_both_stores_dead_are_two_lines(tmp_path: Path) -> None:
    dead = free_port()  # nothing listens there: refused
    env = {
        "DATABASE_URL": f"postgresql://edge:secret-pw@127.0.0.1:{dead}/flatrender",
        "REDIS_URL": f"redis://:secret-pw@127.0.0.1:{dead}/0",
    }
    result, took = _timed("check", "--config", str(config(tmp_path)), env=env)
    found = problems(result)
    assert len(found) == 2, found
    assert found[0].startswith(f"database unreachable: 127.0.0.1:{dead}/flatrender")
    assert found[1].startswith(f"REDIS_URL: 127.0.0.1:{dead} does not answer")
    assert "secret-pw" not in result.stderr
    assert took < STORE_TIMEOUT_S + 5, took


def test_a_stalled_database_is_one_line_within_the_bound(tmp_path: Path) -> None:
    """A SIGSTOPped Postgres (a server of this test's own): the kernel accepts connections,
    nothing answers, on a new connection or on one open."""
    text = GOOD.replace(
        "cache_ttl_s = 30", f"cache_ttl_s = 30\nstore_timeout_s = {STORE_TIMEOUT_S}"
    )
    path = str(config(tmp_path, text))
    server = PostgresServer()
    try:
        server.start()
        env = {"DATABASE_URL": server.dsn}
        assert problems(run("check", "--config", path, env=env))  # reached: not migrated
        server.pause()
        try:
            result, took = _timed("check", "--config", path, env=env)
        finally:
            server.resume()
    finally:
        server.cleanup()
    [line] = problems(result)
    assert line.startswith(f"database 127.0.0.1:{server.port}/"), line
    assert "no answer within" in line, line
    assert took < STORE_TIMEOUT_S + 5, took
