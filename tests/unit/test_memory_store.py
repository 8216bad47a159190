"""proxy.stores.memory.load_embedded: the embedded tenants file, validated up front."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from proxy.core.apikeys import ApiKey, find_match, parse_key
from proxy.core.tenancy import DEFAULT_TENANT_ID, Branding
from proxy.settings import ConfigError
from proxy.stores.memory import MemoryKeyStore, MemoryTenantStore, load_embedded

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "config" / "tenants.toml"
ACME_ID = "6f1c1f9e-8a51-4d7e-9a44-2b7c0d9c1a01"

TENANT = """
[[tenants]]
id = "6f1c1f9e-8a51-4d7e-9a44-2b7c0d9c1a01"
slug = "acme"
"""
KEY_HASH = hashlib.sha256(b"fr_live_" + b"a" * 40).hexdigest()
KEY = f"""
[[keys]]
id = "key-1"
tenant = "acme"
key_prefix = "fr_live_aaaa"
key_hash = "{KEY_HASH}"
"""


def _documented_keys() -> list[str]:
    """The demo keys the file's header comment publishes (and the README uses)."""
    header = SHIPPED.read_text().split("[[", 1)[0]
    return re.findall(r"#\s+\w+:\s+(fr_(?:live|test)_[0-9A-Za-z]+)", header)


def _load(tmp_path: Path, text: str) -> tuple[MemoryTenantStore, MemoryKeyStore]:
    path = tmp_path / "tenants.toml"
    path.write_text(text)
    return load_embedded(path)


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- the shipped file


def test_shipped_tenants_file_loads() -> None:
    tenants, keys = load_embedded(SHIPPED)

    async def lookups() -> None:
        default = await tenants.by_id(DEFAULT_TENANT_ID)
        assert default is not None and default.slug == "flatrender" and default.status == "Active"
        acme = await tenants.by_slug("acme")
        assert acme is not None and acme.id == ACME_ID
        assert await tenants.by_slug("ACME") == acme
        assert await tenants.by_custom_domain("videos.acme.test") == acme
        assert acme.domain_verified
        assert acme.allowed_origins == ("https://www.acme.test", "https://*.acme.test")
        assert acme.branding == Branding(True, ("https://www.acme.test",))
        assert default.branding is None
        assert await tenants.by_slug("nobody") is None
        assert await tenants.by_custom_domain("flatrender.test") is None
        # exactly two tenants: nothing else answers by id
        assert {t.id for t in (default, acme)} == {DEFAULT_TENANT_ID, ACME_ID}

        documented = _documented_keys()
        assert len(documented) == 2
        found: list[ApiKey] = []
        for raw in documented:
            parsed = parse_key(raw)
            assert parsed is not None, raw
            candidates = await keys.by_prefix(parsed.prefix)
            assert len(candidates) == 1
            match = find_match(parsed.hash, candidates)
            assert match is not None, f"{raw} does not match its documented hash"
            assert match.environment == parsed.environment
            assert match.tenant_id == ACME_ID
            found.append(match)
        live, test = sorted(found, key=lambda k: k.environment)
        assert (live.environment, live.scopes, live.rate_limit_rpm) == ("live", ("renders:*",), 60)
        assert (test.environment, test.scopes, test.rate_limit_rpm) == (
            "test",
            ("renders:read",),
            30,
        )
        assert live.allowed_ips is None and live.is_active and live.expires_at is None
        assert await keys.by_prefix("fr_live_Nope") == ()

    asyncio.run(lookups())


def test_shipped_file_holds_exactly_two_tenants_and_two_keys() -> None:
    text = SHIPPED.read_text()
    assert text.count("[[tenants]]") == 2 and text.count("[[keys]]") == 2


# --------------------------------------------------------------------------- good entries


def test_full_key_entry(tmp_path: Path) -> None:
    _, keys = _load(
        tmp_path,
        TENANT
        + KEY
        + """
scopes = ["renders:read", "projects:*"]
allowed_ips = ["192.0.2.0/24", "2001:db8::1"]
rate_limit_rpm = 120
is_active = false
expires_at = 2030-01-01T00:00:00Z
revoked_at = "2026-01-01T12:00:00+01:00"
""",
    )
    (key,) = asyncio.run(keys.by_prefix("fr_live_aaaa"))
    assert key.key_hash == KEY_HASH and key.environment == "live"
    assert key.scopes == ("renders:read", "projects:*")
    assert key.allowed_ips == (
        ipaddress.ip_network("192.0.2.0/24"),
        ipaddress.ip_network("2001:db8::1/128"),
    )
    assert key.rate_limit_rpm == 120 and not key.is_active
    assert key.expires_at == datetime(2030, 1, 1, tzinfo=UTC)
    assert key.revoked_at == datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=1)))


def test_key_hash_is_stored_lower_case(tmp_path: Path) -> None:
    _, keys = _load(tmp_path, TENANT + KEY.replace(KEY_HASH, KEY_HASH.upper()))
    (key,) = asyncio.run(keys.by_prefix("fr_live_aaaa"))
    assert key.key_hash == KEY_HASH


def test_empty_allowed_ips_means_nobody_and_absent_means_anybody(tmp_path: Path) -> None:
    _, keys = _load(tmp_path, TENANT + KEY + "allowed_ips = []\n")
    (key,) = asyncio.run(keys.by_prefix("fr_live_aaaa"))
    assert key.allowed_ips == ()
    _, keys = _load(tmp_path, TENANT + KEY)
    (key,) = asyncio.run(keys.by_prefix("fr_live_aaaa"))
    assert key.allowed_ips is None and key.rate_limit_rpm == 600


def test_trial_tenant_with_offset_timestamp(tmp_path: Path) -> None:
    tenants, _ = _load(
        tmp_path, TENANT + 'status = "Trial"\ntrial_ends_at = 2026-04-01T00:00:00-05:00\n'
    )
    acme = asyncio.run(tenants.by_slug("acme"))
    assert acme is not None and acme.status == "Trial"
    assert acme.trial_ends_at == datetime(2026, 4, 1, 5, tzinfo=UTC)


def test_empty_file_is_no_tenants(tmp_path: Path) -> None:
    tenants, keys = _load(tmp_path, "")
    assert asyncio.run(tenants.by_id(DEFAULT_TENANT_ID)) is None
    assert asyncio.run(keys.by_prefix("fr_live_aaaa")) == ()


# --------------------------------------------------------------------------- bad entries


@pytest.mark.parametrize(
    ("text", "where"),
    [
        # keys
        (TENANT + KEY.replace('tenant = "acme"', 'tenant = "globex"'), "keys[0].tenant"),
        (TENANT + KEY.replace('tenant = "acme"', ""), "keys[0].tenant"),
        (TENANT + KEY.replace(KEY_HASH, KEY_HASH[:-1]), "keys[0].key_hash"),
        (TENANT + KEY.replace(KEY_HASH, KEY_HASH[:-1] + "g"), "keys[0].key_hash"),
        (TENANT + KEY.replace(KEY_HASH, "sha256:" + KEY_HASH[7:]), "keys[0].key_hash"),
        (TENANT + KEY.replace("fr_live_aaaa", "fr_live_aaa"), "keys[0].key_prefix"),
        (TENANT + KEY.replace("fr_live_aaaa", "fr_live_aaaaa"), "keys[0].key_prefix"),
        (TENANT + KEY.replace("fr_live_aaaa", "fr_prod_aaaa"), "keys[0].key_prefix"),
        (TENANT + KEY.replace("fr_live_aaaa", "sk_live_aaaa"), "keys[0].key_prefix"),
        (TENANT + KEY.replace('id = "key-1"', "id = 1"), "keys[0].id"),
        (TENANT + KEY + 'allowed_ips = ["10.0.0.0/33"]\n', "keys[0].allowed_ips"),
        (TENANT + KEY + 'allowed_ips = ["office"]\n', "keys[0].allowed_ips"),
        (TENANT + KEY + 'allowed_ips = "10.0.0.0/8"\n', "keys[0].allowed_ips"),
        (TENANT + KEY + "allowed_ips = [5]\n", "keys[0].allowed_ips"),
        (TENANT + KEY + 'scopes = "renders:read"\n', "keys[0].scopes"),
        (TENANT + KEY + "scopes = [1]\n", "keys[0].scopes"),
        (TENANT + KEY + "expires_at = 2030-01-01T00:00:00\n", "keys[0].expires_at"),
        (TENANT + KEY + 'expires_at = "2030-01-01"\n', "keys[0].expires_at"),
        (TENANT + KEY + 'expires_at = "next year"\n', "keys[0].expires_at"),
        (TENANT + KEY + "expires_at = 2030-01-01\n", "keys[0].expires_at"),
        (TENANT + KEY + 'revoked_at = "2026-01-01T00:00:00"\n', "keys[0].revoked_at"),
        (TENANT + KEY + 'rate_limit_rpm = "60"\n', "keys[0].rate_limit_rpm"),
        (TENANT + KEY + "rate_limit_rpm = 0\n", "keys[0].rate_limit_rpm"),
        (TENANT + KEY + "rate_limit_rpm = -1\n", "keys[0].rate_limit_rpm"),
        (TENANT + KEY + "rate_limit_rpm = true\n", "keys[0].rate_limit_rpm"),
        (TENANT + KEY + KEY.replace("key-1", "key-2") + "scopes = [true]\n", "keys[1].scopes"),
        # tenants
        (TENANT.replace('slug = "acme"', ""), "tenants[0].slug"),
        (TENANT.replace('id = "6f1c1f9e-8a51-4d7e-9a44-2b7c0d9c1a01"', ""), "tenants[0].id"),
        (TENANT + 'status = "active"\n', "tenants[0].status"),
        (TENANT + 'status = "Deleted"\n', "tenants[0].status"),
        (TENANT + "status = 1\n", "tenants[0].status"),
        (TENANT + "trial_ends_at = 2026-04-01T00:00:00\n", "tenants[0].trial_ends_at"),
        (TENANT + 'trial_ends_at = "2026-04-01T00:00:00"\n', "tenants[0].trial_ends_at"),
        (TENANT + 'domain_verified = "yes"\n', "tenants[0].domain_verified"),
        (TENANT + "custom_domain = 1\n", "tenants[0].custom_domain"),
        (TENANT + 'allowed_origins = "https://a.test"\n', "tenants[0].allowed_origins"),
        (TENANT + "allowed_origins = [1]\n", "tenants[0].allowed_origins"),
        (TENANT + 'branding = "on"\n', "tenants[0].branding"),
        (
            TENANT + 'branding = { embed_allowed_hosts = "https://a.test" }\n',
            "tenants[0].branding.embed_allowed_hosts",
        ),
        (TENANT + TENANT.replace('"acme"', "7"), "tenants[1].slug"),
        # the arrays themselves
        ('[tenants]\nid = "x"\nslug = "x"\n', "tenants"),
        ("tenants = [1, 2]\n", "tenants"),
        ("keys = 3\n" + TENANT, "keys"),
    ],
)
def test_bad_entry_names_it(tmp_path: Path, text: str, where: str) -> None:
    message = _error(tmp_path, text)
    path = tmp_path / "tenants.toml"
    assert message.startswith(f"{path}: {where}:"), message


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    message = _error(tmp_path, "[[tenants]\n")
    assert message.startswith(f"{tmp_path / 'tenants.toml'}: invalid TOML")


def test_missing_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^tenancy\.embedded_file: .*nope\.toml not found"):
        load_embedded(tmp_path / "nope.toml")


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^tenancy\.embedded_file: cannot read"):
        load_embedded(tmp_path)  # a directory


def _problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "tenants.toml"
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    prefix = f"{path}: "
    assert all(p.startswith(prefix) for p in caught.value.problems), caught.value.problems
    return [p.removeprefix(prefix) for p in caught.value.problems]


def test_every_problem_of_the_file_at_once(tmp_path: Path) -> None:
    text = (
        TENANT.replace('slug = "acme"', "slug = 7")
        + 'status = "Bogus"\nmonthly_render_quantity = 5\n'
        + TENANT.replace("0000", "1111").replace('"acme"', '"globex"')
        + "monthly_render_qty = -1\n"
        + KEY.replace('tenant = "acme"', 'tenant = "initech"')
        + "rate_limit_rpm = 0\n"
    )
    assert _problems(tmp_path, text) == [
        "tenants[0].slug: expected a string, got 7",
        "tenants[0].status: expected one of Active, Trial, Suspended, Cancelled, got 'Bogus'",
        "tenants[0].monthly_render_quantity: unknown key",
        "tenants[1].monthly_render_qty: expected a non-negative integer, got -1",
        "keys[0].tenant: unknown tenant slug 'initech'",
        "keys[0].rate_limit_rpm: expected a positive integer, got 0",
    ]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        # a typo of monthly_render_qty would otherwise leave the tenant without a quota
        (TENANT + "monthly_render_quantity = 5\n", "tenants[0].monthly_render_quantity"),
        (TENANT + "branding = { embed_enable = true }\n", "tenants[0].branding.embed_enable"),
        (TENANT + KEY + "rate_limit = 60\n", "keys[0].rate_limit"),
        (
            '[[domain_verifications]]\ndomain = "a.test"\ntoken = "t"\n'
            "expires_at = 2030-01-01T00:00:00Z\nmethod = 'HTTP_FILE'\n",
            "domain_verifications[0].method",
        ),
        ("[[tenant]]\n" + TENANT.split("\n", 2)[2], "tenant"),
    ],
)
def test_an_unknown_key_is_a_problem(tmp_path: Path, text: str, where: str) -> None:
    assert _problems(tmp_path, text) == [f"{where}: unknown key"]


def test_features_are_free_form(tmp_path: Path) -> None:
    tenants, _ = _load(tmp_path, TENANT + "features = { anything = 1, goes = true }\n")
    acme = asyncio.run(tenants.by_slug("acme"))
    assert acme is not None and acme.features == {"anything": 1, "goes": True}
