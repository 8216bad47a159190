"""``make loadtest``: realistic reseller traffic (loadtests/locustfile.py) against a local stack.

Starts a throwaway Postgres (schema applied with ``proxy.migrate.apply_migrations``) and Redis
(``tests.servers``), the echo upstream and the proxy in database mode with ``REDIS_URL``; seeds
several tenants (custom domains and slugs, allowed origins, embed branding) with several keys
each (different rpm; some meant to be driven over their limit) plus a revoked key; runs locust
headless for a bounded time; then checks, and exits non-zero when a check fails:

- the client side (``loadcheck.check`` over locust's per-key counts): no 5xx, no request without
  an answer, every over-limit key got 429s and no more admissions than its bucket allows over the
  time it was used, no 429 before a burst was spent, rate-limit headers carry the key's rpm, no
  bad key admitted;
- the server side (the audit rows the proxy wrote, read after it drained on SIGTERM): no 5xx
  row, and per key no more admitted rows than ``rpm + rpm/60 x`` the whole run.

Reports go to ``var/loadtest/`` (locust's CSV files and HTML report, the plan, the per-key
results, the proxy's log). Traffic goes to 127.0.0.1 only.

    .venv/bin/python loadtests/loadtest.py [--duration 30] [--users 50] [--spawn-rate 25]
                                           [--workers 1] [--out var/loadtest]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import shutil
import string
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtests"))

from loadcheck import RunStats, check  # noqa: E402

PLATFORM = "flatrender.test"
ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class TenantSpec:
    slug: str
    status: str
    custom_domain: str | None
    allowed_origins: tuple[str, ...]
    studio_origins: tuple[str, ...]  # what the studio embeds send (all allowed)
    normal_rpm: tuple[int, ...]  # keys used well within their limit
    over_rpm: tuple[int, ...]  # keys driven over their limit


TENANTS = (
    TenantSpec(
        "acme",
        "Active",
        "videos.acme.test",
        ("https://studio.acme.test", "https://*.acme.test"),
        ("https://studio.acme.test", "https://app.acme.test"),
        (3000, 12000, 60000),
        (60,),
    ),
    TenantSpec(
        "globex",
        "Active",
        "render.globex.test",
        ("https://studio.globex.test",),
        ("https://studio.globex.test",),
        (6000, 30000),
        (30,),
    ),
    TenantSpec(
        "initech",
        "Trial",
        None,
        ("https://initech.test", "https://www.initech.test"),
        ("https://initech.test", "https://www.initech.test"),
        (3600, 24000),
        (),
    ),
    TenantSpec(
        "umbrella",
        "Active",
        "media.umbrella.test",
        ("https://app.umbrella.test",),
        ("https://app.umbrella.test", "https://media.umbrella.test"),  # its own custom domain
        (4800, 100000),
        (120, 300),
    ),
    TenantSpec(
        "hooli",
        "Active",
        None,
        ("https://studio.hooli.test",),
        ("https://studio.hooli.test",),
        (9000, 18000),
        (),
    ),
)


def mint(env: str = "live") -> str:
    return f"fr_{env}_" + "".join(secrets.choice(ALPHABET) for _ in range(40))


def tenant_id(slug: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{slug}.loadtest"))


def build_plan() -> dict[str, Any]:
    """Tenants, keys (fresh secrets) and bad keys; JSON-ready, read by the locustfile."""
    tenants, keys = [], []
    for t in TENANTS:
        hosts = [h for h in (t.custom_domain, f"{t.slug}.{PLATFORM}") if h]
        tenants.append(
            {
                "slug": t.slug,
                "id": tenant_id(t.slug),
                "status": t.status,
                "custom_domain": t.custom_domain,
                "allowed_origins": list(t.allowed_origins),
                "origins": list(t.studio_origins),
                "hosts": hosts,
            }
        )
        for over, rpms in ((False, t.normal_rpm), (True, t.over_rpm)):
            for rpm in rpms:
                name = f"{t.slug}-{'over' if over else 'key'}-{rpm}"
                keys.append(
                    {
                        "name": name,
                        "id": str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{name}.loadtest")),
                        "tenant": t.slug,
                        "key": mint(),
                        "rpm": rpm,
                        "over_limit": over,
                    }
                )
    first = keys[0]
    revoked = mint()
    bad = [
        {"why": "unknown key", "key": mint(), "host_tenant": "acme", "expect": 401},
        {"why": "unknown test key", "key": mint("test"), "host_tenant": "hooli", "expect": 401},
        {
            "why": "real prefix, wrong secret",
            "key": first["key"][:12] + "".join(secrets.choice(ALPHABET) for _ in range(36)),
            "host_tenant": first["tenant"],
            "expect": 401,
        },
        {"why": "revoked key", "key": revoked, "host_tenant": "globex", "expect": 401},
        {"why": "no key", "key": "", "host_tenant": "initech", "expect": 401},
        {"why": "malformed key", "key": "not-a-key", "host_tenant": "umbrella", "expect": 401},
        {
            "why": "another tenant's key",
            "key": first["key"],
            "host_tenant": next(t.slug for t in TENANTS if t.slug != first["tenant"]),
            "expect": 403,
        },
    ]
    return {
        "platform_domain": PLATFORM,
        "tenants": tenants,
        "keys": keys,
        "bad_keys": bad,
        "revoked_key": {"tenant": "globex", "key": revoked},
    }


async def seed(dsn: str, plan: dict[str, Any]) -> None:
    import asyncpg

    from proxy.migrate import apply_migrations

    await apply_migrations(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        ids = {t["slug"]: t["id"] for t in plan["tenants"]}
        for t in plan["tenants"]:
            await conn.execute(
                "INSERT INTO identity.tenants (id, slug, name, status, custom_domain,"
                " domain_verified, allowed_origins, trial_ends_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, now() + interval '30 days')",
                t["id"],
                t["slug"],
                t["slug"].title(),
                t["status"],
                t["custom_domain"],
                t["custom_domain"] is not None,
                t["allowed_origins"],
            )
            await conn.execute(
                "INSERT INTO identity.tenant_branding (tenant_id, embed_enabled,"
                " embed_allowed_hosts) VALUES ($1, true, $2)",
                t["id"],
                t["origins"],
            )
        rows = [
            (k["id"], ids[k["tenant"]], k["name"], k["key"], k["rpm"], None) for k in plan["keys"]
        ]
        rev = plan["revoked_key"]
        rows.append((str(uuid.uuid4()), ids[rev["tenant"]], "revoked", rev["key"], 600, "now"))
        for key_id, tid, name, key, rpm, revoked_at in rows:
            await conn.execute(
                "INSERT INTO identity.tenant_api_keys (id, tenant_id, name, key_prefix, key_hash,"
                " last4, scopes, rate_limit_rpm, revoked_at, is_active)"
                " VALUES ($1, $2, $3, $4, $5, $6, '{renders:*}', $7,"
                " CASE WHEN $8::text IS NULL THEN NULL ELSE now() END, $8::text IS NULL)",
                key_id,
                tid,
                name,
                key[:12],
                hashlib.sha256(key.encode()).hexdigest(),
                key[-4:],
                rpm,
                revoked_at,
            )
    finally:
        await conn.close()


async def audit_by_key(dsn: str) -> tuple[dict[str, dict[int, int]], dict[int, int]]:
    """Audit rows as {api_key_id: {status: count}} and {status: count} over every row."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT api_key_id::text AS key_id, status_code, count(*) AS n"
            " FROM identity.tenant_api_request_logs GROUP BY 1, 2"
        )
    finally:
        await conn.close()
    per_key: dict[str, dict[int, int]] = {}
    statuses: dict[int, int] = {}
    for r in rows:
        statuses[r["status_code"]] = statuses.get(r["status_code"], 0) + r["n"]
        if r["key_id"]:
            per_key.setdefault(r["key_id"], {})[r["status_code"]] = r["n"]
    return per_key, statuses


def audit_failures(
    plan: dict[str, Any],
    per_key: dict[str, dict[int, int]],
    statuses: dict[int, int],
    run_s: float,
) -> list[str]:
    """The server-side checks over the audit rows (``run_s``: from locust's start to its exit,
    which contains every request of the run)."""
    failures = []
    server_errors = {s: n for s, n in sorted(statuses.items()) if s >= 500}
    if server_errors:
        failures.append(f"audit: {sum(server_errors.values())} rows with a 5xx: {server_errors}")
    for k in plan["keys"]:
        rows = per_key.get(k["id"], {})
        admitted = sum(n for s, n in rows.items() if s not in (401, 403, 429))
        allowance = k["rpm"] + k["rpm"] / 60.0 * run_s
        if admitted > allowance:
            failures.append(
                f"audit: key {k['name']} (rpm {k['rpm']}) has {admitted} admitted rows in a "
                f"{run_s:.1f} s run, more than its bucket allows ({allowance:.1f})"
            )
    return failures


def proxy_log_summary(path: Path) -> str:
    """How many access-log lines, and the other lines at WARNING or above (start-up aside)."""
    if not path.exists():
        return "missing"
    access, notable = 0, []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            access += 1
        elif any(w in line for w in (" ERROR ", " CRITICAL ", "Traceback")):
            notable.append(line)
    tail = "".join(f"\n    {line[:200]}" for line in notable[:5])
    return f"{access} access-log lines, {len(notable)} error lines{tail}"


def write_config(path: Path, upstream: str, spool: Path) -> None:
    path.write_text(
        f'[server]\nmax_body_bytes = 10485760\n[tenancy]\nplatform_domains = ["{PLATFORM}"]\n'
        f'[audit]\nspool_dir = "{spool}"\n'
        f'[upstreams.render-api]\nurls = ["{upstream}"]\n'
        '[[routes]]\nprefix = "/v1/renders"\nupstream = "render-api"\nauth = "api_key"\n'
        'audit = true\nscopes = { GET = "renders:read", POST = "renders:create",'
        ' DELETE = "renders:delete" }\n'
        '[[routes]]\nprefix = "/embed/"\nupstream = "render-api"\nauth = "none"\nembed = true\n'
    )


def report(plan: dict[str, Any], run: RunStats, per_key: dict[str, dict[int, int]]) -> None:
    print(f"\n  statuses seen by locust: {dict(sorted(run.statuses.items()))}")
    print(f"  bad-key requests: {run.bad_key_requests}, admitted: {run.bad_key_admitted}")
    print(
        f"  {'key':<20} {'rpm':>7} {'sent':>6} {'admitted':>8} {'429':>6} "
        f"{'span s':>7} {'allowed':>8} {'audit adm.':>10}"
    )
    for k in plan["keys"]:
        s = run.keys[k["name"]]
        audited = sum(n for st, n in per_key.get(k["id"], {}).items() if st not in (401, 403, 429))
        print(
            f"  {k['name']:<20} {k['rpm']:>7} {s.sent:>6} {s.admitted:>8} {s.limited:>6} "
            f"{s.span_s:>7.1f} {s.allowance():>8.0f} {audited:>10}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=int(os.environ.get("DURATION", "30")))
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--spawn-rate", type=float, default=25.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "loadtest")
    args = parser.parse_args()
    if not 1 <= args.duration <= 3600:
        parser.error("--duration is seconds, 1 to 3600")
    if shutil.which("locust", path=str(Path(sys.executable).parent)) is None:
        sys.exit("loadtest: locust is missing: .venv/bin/pip install -e '.[load]'")

    from tests.procs import start_echo, start_proxy, stop
    from tests.servers import PostgresServer, RedisServer

    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        if old.is_file():
            old.unlink()
    plan = build_plan()
    plan_file, results_file = out / "plan.json", out / "results.json"
    plan_file.write_text(json.dumps(plan, indent=1))
    tmp = Path(tempfile.mkdtemp(prefix="edge-loadtest-"))
    pg, rd = PostgresServer(), RedisServer()
    echo = proxy = None
    try:
        pg.start()
        rd.start()
        dsn = pg.create_database("loadtest")
        asyncio.run(seed(dsn, plan))
        echo = start_echo()
        config = tmp / "edge.toml"
        write_config(config, echo.url, tmp / "spool")
        proxy = start_proxy(
            config,
            env={"DATABASE_URL": dsn, "REDIS_URL": rd.url},
            args=("--workers", str(args.workers)) if args.workers > 1 else (),
        )
        print(
            f"loadtest: proxy {proxy.url} (database mode, Redis limiter, {args.workers} worker(s))"
            f", {len(plan['tenants'])} tenants, {len(plan['keys'])} keys "
            f"({sum(k['over_limit'] for k in plan['keys'])} driven over their limit), "
            f"{len(plan['bad_keys'])} kinds of bad key; {args.users} users for {args.duration} s",
            flush=True,
        )
        cmd = [
            str(Path(sys.executable).parent / "locust"),
            "-f",
            str(ROOT / "loadtests" / "locustfile.py"),
            "--headless",
            "--users",
            str(args.users),
            "--spawn-rate",
            str(args.spawn_rate),
            "--run-time",
            f"{args.duration}s",
            "--host",
            proxy.url,
            "--csv",
            str(out / "loadtest"),
            "--html",
            str(out / "report.html"),
            "--only-summary",
            "--loglevel",
            "INFO",
        ]
        env = {**os.environ, "LOADTEST_PLAN": str(plan_file), "LOADTEST_RESULTS": str(results_file)}
        started = time.monotonic()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=args.duration + 120).returncode
        except subprocess.TimeoutExpired:
            rc = -1
        run_s = time.monotonic() - started
        (out / "proxy.log").write_text(proxy.output())  # SIGTERM: the audit queue is drained
        per_key, statuses = asyncio.run(audit_by_key(dsn))
    finally:
        for p in (proxy.proc if proxy else None, echo.proc if echo else None):
            if p is not None:
                stop(p)
        pg.cleanup()
        rd.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

    failures: list[str] = []
    if rc == -1:
        failures.append(f"locust did not finish within {args.duration + 120} s")
    if not results_file.exists():
        failures.append("locust wrote no results (see its output above)")
        run = RunStats()
    else:
        run = RunStats.from_json(json.loads(results_file.read_text()))
        report(plan, run, per_key)
        failures += check(run)
    print(f"  audit rows by status: {dict(sorted(statuses.items()))}")
    print(f"  proxy log: {proxy_log_summary(out / 'proxy.log')}")
    failures += audit_failures(plan, per_key, statuses, run_s)
    if rc not in (0, -1) and not failures:
        failures.append(f"locust exited {rc}: unexpected responses, see {out / 'report.html'}")
    for failure in failures:
        print(f"FAIL {failure}")
    if not failures:
        print(
            "PASS no 5xx; every over-limit key got 429s within its rpm; no bad key admitted "
            f"(reports in {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out})"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
