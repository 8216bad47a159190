"""proxy.core.routes: longest prefix on a segment boundary (CONTRACT §2)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.routes import RouteTable, prefix_matches


@dataclass(frozen=True)
class Route:
    prefix: str


PREFIXES = ["/v1/renders", "/v1/renders/batch", "/embed/", "/public", "/v1", "/static/"]
TABLE = RouteTable(Route(p) for p in PREFIXES)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/renders", "/v1/renders"),
        ("/v1/renders/", "/v1/renders"),
        ("/v1/renders/42", "/v1/renders"),
        ("/v1/renders/42/download", "/v1/renders"),
        # longest prefix wins, whatever the order of the configuration
        ("/v1/renders/batch", "/v1/renders/batch"),
        ("/v1/renders/batch/7", "/v1/renders/batch"),
        ("/v1/renders/batches", "/v1/renders"),
        ("/v1/projects", "/v1"),
        ("/v1", "/v1"),
        ("/v1/", "/v1"),
        # a prefix matches on a segment boundary only
        ("/v1/renders-admin", "/v1"),
        ("/v1/rendersx/1", "/v1"),
        ("/v10/renders", None),
        ("/publicity", None),
        ("/public", "/public"),
        ("/public/x", "/public"),
        # a prefix that ends in "/" matches everything below it, but not itself without it
        ("/embed/", "/embed/"),
        ("/embed/abc", "/embed/"),
        ("/embed/a/b/c", "/embed/"),
        ("/embed", None),
        ("/embedded", None),
        ("/static/app.js", "/static/"),
        # no match
        ("/", None),
        ("", None),
        ("/V1/renders", None),  # paths are case-sensitive (RFC 3986 §6.2.2.1)
        ("/other", None),
    ],
)
def test_match(path: str, expected: str | None) -> None:
    route = TABLE.match(path)
    assert (route.prefix if route else None) == expected


def test_order_of_configuration_does_not_matter() -> None:
    for routes in (PREFIXES, list(reversed(PREFIXES)), sorted(PREFIXES)):
        table = RouteTable(Route(p) for p in routes)
        assert table.match("/v1/renders/batch/1") == Route("/v1/renders/batch")
        assert table.match("/v1/renders/1") == Route("/v1/renders")


def test_root_prefix_catches_everything_else() -> None:
    table = RouteTable([Route("/"), Route("/v1/renders")])
    assert table.match("/anything/at/all") == Route("/")
    assert table.match("/") == Route("/")
    assert table.match("/v1/renders/9") == Route("/v1/renders")


def test_empty_table_matches_nothing() -> None:
    assert RouteTable([]).match("/v1/renders") is None


@pytest.mark.parametrize(
    ("prefix", "path", "matches"),
    [
        ("/a", "/a", True),
        ("/a", "/a/", True),
        ("/a", "/a/b", True),
        ("/a", "/ab", False),
        ("/a", "/", False),
        ("/a/", "/a/", True),
        ("/a/", "/a/b", True),
        ("/a/", "/a", False),
        ("/a/", "/ab", False),
        ("/", "/", True),
        ("/", "/x", True),
    ],
)
def test_prefix_matches(prefix: str, path: str, matches: bool) -> None:
    assert prefix_matches(prefix, path) is matches


_segment = st.text(alphabet="ab-_.", min_size=1, max_size=4)
_path = st.lists(_segment, min_size=1, max_size=4).map(lambda s: "/" + "/".join(s))


@settings(max_examples=200, deadline=None)
@given(st.lists(_path, max_size=6, unique=True), _path)
def test_match_is_the_longest_matching_prefix(prefixes: list[str], path: str) -> None:
    route = RouteTable(Route(p) for p in prefixes).match(path)
    candidates = [p for p in prefixes if path == p or path.startswith(p + "/")]
    if not candidates:
        assert route is None
    else:
        assert route == Route(max(candidates, key=len))
