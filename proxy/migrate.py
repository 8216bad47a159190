"""Apply the numbered SQL files in ``sql/`` to a Postgres database (``python -m proxy migrate``).

Why hand-written rather than alembic, yoyo or sqitch: the schema is plain SQL, part of it a
byte-for-byte copy of another team's document (``002_identity_tenants.sql``), and all we need is
"apply each new file once, in order, atomically, and say so clearly when something is wrong".
That is about a hundred lines on the asyncpg driver the proxy already uses, with no second
migration vocabulary (revisions, down-migrations, its own config file) for operators to learn.

The rules, and why:

* Files are named ``NNN_name.sql`` and applied in numeric order; anything else in the directory is
  ignored, two files with the same number are an error (their order would be a coin toss).
* Each file runs in ONE transaction together with the row that records it in
  ``public.edge_schema_migrations``, so a failing file leaves nothing half-applied and is retried
  whole next time (Postgres has transactional DDL; a file must therefore not COMMIT itself or use
  ``CREATE INDEX CONCURRENTLY``).
* A session advisory lock serialises concurrent runs (several replicas starting at once): the
  second run waits, then finds everything recorded and applies nothing.
* An applied file whose sha256 changed is an error, not a silent skip: the database would no
  longer be what the repository says it is. Change the schema with a new file instead.
* ``RESET ALL`` after each file: a file may ``SET search_path`` (002 does) and a committed ``SET``
  outlives its transaction, so without it every later file would run with that path.
* Every failure becomes :class:`MigrationError` with a one-line message that names the database as
  ``host:port/dbname`` (never the password) or the failing file, so the CLI prints one line and
  exits non-zero instead of showing a traceback.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import asyncpg

__all__ = [
    "DEFAULT_SQL_DIR",
    "MIGRATIONS_TABLE",
    "Migration",
    "MigrationError",
    "apply_migrations",
    "close_connection",
    "describe_dsn",
    "discover_migrations",
    "migration_problems",
    "open_connection",
]

DEFAULT_SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
MIGRATIONS_TABLE = "public.edge_schema_migrations"

# Any constant shared by every `migrate` run works; this one is b"edgemigr" read as a bigint.
_LOCK_KEY = 0x656467656D696772

_FILE_NAME = re.compile(r"^(?P<number>\d+)_.+\.sql$")

_CREATE_TABLE = f"""
CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (
    name       text PRIMARY KEY,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
_SELECT_APPLIED = f"SELECT name, checksum FROM {MIGRATIONS_TABLE}"
_INSERT_APPLIED = f"INSERT INTO {MIGRATIONS_TABLE} (name, checksum) VALUES ($1, $2)"


class MigrationError(Exception):
    """A migration could not be applied; ``str()`` is one line fit for an operator."""


@dataclass(frozen=True, slots=True)
class Migration:
    number: int
    name: str
    sql: str
    checksum: str  # lower-case hex sha256 of the file's bytes


def discover_migrations(sql_dir: Path) -> list[Migration]:
    """The ``NNN_*.sql`` files of ``sql_dir`` in numeric order."""
    try:
        paths = [p for p in sql_dir.iterdir() if p.is_file() and _FILE_NAME.match(p.name)]
    except OSError as exc:
        raise MigrationError(f"cannot read migrations directory {sql_dir}: {_reason(exc)}") from exc
    found: list[Migration] = []
    for path in paths:
        match = _FILE_NAME.match(path.name)
        assert match is not None  # filtered above
        try:
            raw = path.read_bytes()
            sql = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise MigrationError(f"cannot read migration {path.name}: {_reason(exc)}") from exc
        found.append(
            Migration(
                number=int(match["number"]),
                name=path.name,
                sql=sql,
                checksum=hashlib.sha256(raw).hexdigest(),
            )
        )
    found.sort(key=lambda m: (m.number, m.name))
    for before, after in itertools.pairwise(found):
        if before.number == after.number:
            raise MigrationError(
                f"migrations {before.name} and {after.name} share the number {before.number}"
            )
    return found


def describe_dsn(dsn: str) -> str:
    """``host:port/dbname`` of a ``postgresql://`` DSN, for messages: never the user or password."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or "localhost"
        port = parts.port or 5432
    except ValueError:
        return "<unparsable DSN>"
    if ":" in host:
        host = f"[{host}]"
    database = unquote(parts.path.lstrip("/")) or unquote(parts.username or "") or "postgres"
    return f"{host}:{port}/{database}"


async def apply_migrations(
    dsn: str,
    sql_dir: Path | None = None,
    *,
    # Not an overall deadline (what ASYNC109 assumes): it bounds only connecting, so a caller's
    # asyncio.timeout() would be no substitute; a long migration must not be cut off halfway.
    timeout: float = 10.0,  # noqa: ASYNC109
) -> list[str]:
    """Apply every migration of ``sql_dir`` not yet recorded; return the names applied, in order.

    ``timeout`` bounds connecting (an unreachable database fails within it); the migrations
    themselves, and waiting for a concurrent run's lock, are not time-limited.
    A second run returns ``[]`` and changes nothing.
    """
    migrations = discover_migrations(DEFAULT_SQL_DIR if sql_dir is None else sql_dir)
    where = describe_dsn(dsn)
    password = _password(dsn)
    conn = await _connect(dsn, where, password, timeout)
    applied_now: list[str] = []
    current: Migration | None = None
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        await conn.execute(_CREATE_TABLE)
        recorded = {r["name"]: r["checksum"] for r in await conn.fetch(_SELECT_APPLIED)}
        _check_unchanged(migrations, recorded)
        for migration in migrations:
            if migration.name in recorded:
                continue
            current = migration
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(_INSERT_APPLIED, migration.name, migration.checksum)
            applied_now.append(migration.name)
            current = None
            await conn.execute("RESET ALL")
    except asyncpg.PostgresError as exc:
        if current is not None:
            detail = _pg_reason(exc, current.sql)
            raise MigrationError(
                _scrub(f"migration {current.name} failed: {detail}", password)
            ) from exc
        raise MigrationError(
            _scrub(f"cannot record migrations in {where}: {_pg_reason(exc, None)}", password)
        ) from exc
    except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
        during = f" during {current.name}" if current is not None else ""
        raise MigrationError(
            _scrub(f"database connection to {where} lost{during}: {_reason(exc)}", password)
        ) from exc
    finally:
        await _close(conn)
    return applied_now


async def _connect(
    dsn: str, where: str, password: str, connect_timeout: float
) -> asyncpg.Connection:
    try:
        conn: asyncpg.Connection = await asyncpg.connect(dsn, timeout=connect_timeout)
    except TimeoutError as exc:
        raise MigrationError(
            f"database unreachable: {where}: no answer within {connect_timeout:g}s"
        ) from exc
    except OSError as exc:
        raise MigrationError(
            _scrub(f"database unreachable: {where}: {_reason(exc)}", password)
        ) from exc
    except asyncpg.PostgresError as exc:
        message = f"cannot connect to database {where}: {_pg_reason(exc, None)}"
        raise MigrationError(_scrub(message, password)) from exc
    except ValueError as exc:  # includes asyncpg.ClientConfigurationError: a malformed DSN
        raise MigrationError(_scrub(f"invalid database URL: {_reason(exc)}", password)) from exc
    except asyncpg.InterfaceError as exc:
        message = f"cannot connect to database {where}: {_reason(exc)}"
        raise MigrationError(_scrub(message, password)) from exc
    return conn


async def open_connection(dsn: str, *, connect_timeout: float = 10.0) -> asyncpg.Connection:
    """Connect for a one-off command; failures are ``MigrationError`` with one clean line."""
    return await _connect(dsn, describe_dsn(dsn), _password(dsn), connect_timeout)


async def close_connection(conn: asyncpg.Connection) -> None:
    await _close(conn)


async def _close(conn: asyncpg.Connection) -> None:
    """Close politely (which also drops the advisory lock); abort if the server is gone."""
    try:
        await conn.close(timeout=2)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        conn.terminate()


def _check_unchanged(migrations: list[Migration], recorded: dict[str, str]) -> None:
    edited = _edited(migrations, recorded)
    if edited:
        raise MigrationError(edited[0])


def _edited(migrations: list[Migration], recorded: dict[str, str]) -> list[str]:
    return [
        f"migration {m.name} changed after it was applied "
        f"(sha256 {recorded[m.name][:12]}... recorded, {m.checksum[:12]}... on disk); "
        "add a new migration instead of editing an applied one"
        for m in migrations
        if recorded.get(m.name, m.checksum) != m.checksum
    ]


async def migration_problems(
    dsn: str,
    sql_dir: Path | None = None,
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - bounds connecting only, as in apply_migrations
) -> list[str]:
    """What ``migrate`` would find wrong or still to do, changing nothing: one line for each
    migration not applied and for each applied one edited since (``python -m proxy check``).
    An unreachable database is a ``MigrationError``."""
    migrations = discover_migrations(DEFAULT_SQL_DIR if sql_dir is None else sql_dir)
    where = describe_dsn(dsn)
    password = _password(dsn)
    conn = await _connect(dsn, where, password, timeout)
    try:
        table = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", MIGRATIONS_TABLE)
        rows = await conn.fetch(_SELECT_APPLIED) if table else []
    except asyncpg.PostgresError as exc:
        message = f"cannot read the migrations of {where}: {_pg_reason(exc, None)}"
        raise MigrationError(_scrub(message, password)) from exc
    except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
        message = f"database connection to {where} lost: {_reason(exc)}"
        raise MigrationError(_scrub(message, password)) from exc
    finally:
        await _close(conn)
    recorded = {r["name"]: r["checksum"] for r in rows}
    pending = [
        f"migration {m.name} is not applied to {where}: run `python -m proxy migrate`"
        for m in migrations
        if m.name not in recorded
    ]
    return _edited(migrations, recorded) + pending


def _pg_reason(exc: asyncpg.PostgresError, sql: str | None) -> str:
    """The server's message, with the line of the failing statement when the server gave one."""
    message = str(getattr(exc, "message", None) or exc)
    where: list[str] = []
    position = getattr(exc, "position", None)
    if sql is not None and position:
        try:
            offset = int(position) - 1
        except ValueError:
            offset = -1
        if 0 <= offset <= len(sql):
            where.append(f"line {sql.count(chr(10), 0, offset) + 1}")
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate:
        where.append(f"SQLSTATE {sqlstate}")
    suffix = f" ({', '.join(where)})" if where else ""
    return _one_line(message) + suffix


def _reason(exc: BaseException) -> str:
    return _one_line(str(exc)) or type(exc).__name__


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _password(dsn: str) -> str:
    try:
        return unquote(urlsplit(dsn).password or "")
    except ValueError:
        return ""


def _scrub(message: str, password: str) -> str:
    """Belt and braces: no driver message may carry the DSN's password to a terminal or log."""
    # A very short password would mangle ordinary words and is not worth hiding that way.
    return message.replace(password, "***") if len(password) >= 4 else message
