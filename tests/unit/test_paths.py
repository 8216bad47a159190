"""proxy.core.paths: dot-segment removal (RFC 3986 §5.2.4) and request-target parsing (§7)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.paths import BadTarget, resolve_dot_segments, split_target

_DOT_SPELLINGS = [".", "%2e", "%2E"]
_DOTDOT_SPELLINGS = [a + b for a in _DOT_SPELLINGS for b in _DOT_SPELLINGS]


def rfc3986_remove_dot_segments(path: str) -> tuple[str, bool]:
    """RFC 3986 §5.2.4 transcribed step by step, on a path whose dots are already decoded.

    Returns the output and whether a ".." ever found an empty output buffer (where the RFC
    silently stays at the root and the proxy answers 400 instead).
    """
    inp, out, climbed = path, "", False
    while inp:
        if inp.startswith("../"):  # A
            inp = inp[3:]
        elif inp.startswith(("./", "/./")):  # A, B
            inp = inp[2:]
        elif inp == "/.":
            inp = "/"
        elif inp.startswith("/../") or inp == "/..":  # C
            inp = "/" + inp[4:] if inp.startswith("/../") else "/"
            if not out:
                climbed = True
            out = out[: out.rfind("/")] if "/" in out else ""
        elif inp in (".", ".."):  # D
            inp = ""
        else:  # E
            m = re.match(r"/?[^/]*", inp)
            assert m is not None
            out += m.group(0)
            inp = inp[m.end() :]
    return out, climbed


def _decode_dots(path: str) -> str:
    """Spell every dot-segment written with %2e as plain dots (RFC 3986 §2.3 equivalence)."""
    segments = path.split("/")
    return "/".join(
        "." if s in _DOT_SPELLINGS else ".." if s in _DOTDOT_SPELLINGS else s for s in segments
    )


# --------------------------------------------------------------------------- tables


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/", "/"),
        ("/v1/renders", "/v1/renders"),
        ("/public/../v1/renders", "/v1/renders"),
        ("/a/./b", "/a/b"),
        ("/a/b/../c", "/a/c"),
        ("/a/b/c/./../../g", "/a/g"),  # RFC 3986 §5.2.4's own example
        ("/mid/content=5/../6", "/mid/6"),  # and its second one (after the merge)
        # trailing "." and ".." name a directory: the trailing slash stays
        ("/a/.", "/a/"),
        ("/a/b/..", "/a/"),
        ("/a/..", "/"),
        ("/.", "/"),
        ("/a/./", "/a/"),
        ("/a/b/../", "/a/"),
        # %2e is "." (RFC 3986 §2.3), in either case and any mix
        ("/a/%2e/b", "/a/b"),
        ("/a/%2E/b", "/a/b"),
        ("/a/b/%2e%2e/c", "/a/c"),
        ("/a/b/%2E%2E/c", "/a/c"),
        ("/a/b/.%2e/c", "/a/c"),
        ("/a/b/%2e./c", "/a/c"),
        ("/a/b/%2E%2e/c", "/a/c"),
        ("/a/b/%2e%2E", "/a/"),
        ("/public/%2e%2e/v1/renders", "/v1/renders"),
        # empty segments ("//") are preserved, and ".." removes one of them like any other
        ("//", "//"),
        ("/a//b", "/a//b"),
        ("//a/./b", "//a/b"),
        ("/a//../b", "/a/b"),
        ("//a/../b", "//b"),
        ("/a/b//", "/a/b//"),
        # segments that merely contain dots are ordinary
        ("/...", "/..."),
        ("/a/.../b", "/a/.../b"),
        ("/a/.b/c.", "/a/.b/c."),
        ("/a/..b/b..", "/a/..b/b.."),
        ("/a/%2e%2e%2fb", "/a/%2e%2e%2fb"),  # an encoded slash is not a separator
        ("/a/%2e%2e%2F..", "/a/%2e%2e%2F.."),
        ("/a/%252e%252e/b", "/a/%252e%252e/b"),  # double encoding is not a dot
        ("/a/%2f/b", "/a/%2f/b"),
        ("/a/%2x/b", "/a/%2x/b"),
        ("/file.tar.gz", "/file.tar.gz"),
    ],
)
def test_resolve_dot_segments(path: str, expected: str) -> None:
    assert resolve_dot_segments(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/..",
        "/../",
        "/../a",
        "/a/../..",
        "/a/b/../../..",
        "/a/../../b",
        "/%2e%2e",
        "/%2E%2E/etc/passwd",
        "/.%2e/x",
        "/./../x",
        "/public/../../v1/renders",
    ],
)
def test_climbing_above_the_root_is_refused(path: str) -> None:
    with pytest.raises(BadTarget):
        resolve_dot_segments(path)


@pytest.mark.parametrize("path", ["", "a/b", "./a", "../a", "%2e/a", "*"])
def test_path_must_be_absolute(path: str) -> None:
    with pytest.raises(BadTarget):
        resolve_dot_segments(path)


# RFC 3986 §5.4 with base "http://a/b/c/d;p?q": the reference's path is merged with the base
# directory "/b/c/" (§5.2.3) and then resolved. Only examples whose result is a path of the
# same authority apply; those that climb above "/" are 400 here instead of being clamped.
_BASE_DIR = "/b/c/"
_RFC3986_5_4 = [
    ("g", "/b/c/g"),
    ("./g", "/b/c/g"),
    ("g/", "/b/c/g/"),
    ("/g", "/g"),
    (";x", "/b/c/;x"),
    ("g;x", "/b/c/g;x"),
    (".", "/b/c/"),
    ("./", "/b/c/"),
    ("..", "/b/"),
    ("../", "/b/"),
    ("../g", "/b/g"),
    ("../..", "/"),
    ("../../", "/"),
    ("../../g", "/g"),
    # §5.4.2 abnormal examples
    ("/./g", "/g"),
    ("g.", "/b/c/g."),
    (".g", "/b/c/.g"),
    ("g..", "/b/c/g.."),
    ("..g", "/b/c/..g"),
    ("./../g", "/b/g"),
    ("./g/.", "/b/c/g/"),
    ("g/./h", "/b/c/g/h"),
    ("g/../h", "/b/c/h"),
    ("g;x=1/./y", "/b/c/g;x=1/y"),
    ("g;x=1/../y", "/b/c/y"),
]


@pytest.mark.parametrize(("reference", "expected"), _RFC3986_5_4)
def test_rfc3986_section_5_4_examples(reference: str, expected: str) -> None:
    merged = reference if reference.startswith("/") else _BASE_DIR + reference
    assert resolve_dot_segments(merged) == expected
    # the same with every dot-segment spelled %2e
    encoded = "/".join({".": "%2e", "..": "%2E%2e"}.get(seg, seg) for seg in merged.split("/"))
    assert resolve_dot_segments(encoded) == expected


@pytest.mark.parametrize("reference", ["../../../g", "../../../../g", "/../g"])
def test_rfc3986_abnormal_examples_that_climb_are_refused(reference: str) -> None:
    # RFC 3986 §5.4.2 clamps these to "/g"; CONTRACT §7 makes them 400 bad_request.
    merged = reference if reference.startswith("/") else _BASE_DIR + reference
    assert rfc3986_remove_dot_segments(merged) == ("/g", True)
    with pytest.raises(BadTarget):
        resolve_dot_segments(merged)


# --------------------------------------------------------------------------- split_target


@pytest.mark.parametrize(
    ("target", "host", "expected"),
    [
        ("/", "h", ("/", "")),
        ("/v1/renders", "h", ("/v1/renders", "")),
        # the query string is kept raw: not decoded, not resolved, not re-encoded
        ("/v1/renders?a=1&b=%2F..%2F&c", "h", ("/v1/renders", "a=1&b=%2F..%2F&c")),
        ("/x?path=/../../etc", "h", ("/x", "path=/../../etc")),
        ("/x?", "h", ("/x", "")),
        ("/x?a?b", "h", ("/x", "a?b")),
        ("/x?q=%2e%2e", "h", ("/x", "q=%2e%2e")),
        # the path is resolved, the query untouched
        ("/public/../v1/renders?x=1", "h", ("/v1/renders", "x=1")),
        # a fragment is never part of what goes upstream, whichever side of "?" it starts
        ("/x#frag", "h", ("/x", "")),
        ("/x?a=1#frag", "h", ("/x", "a=1")),
        ("/x#frag?not=query", "h", ("/x", "")),
        ("/a/../b#/../..", "h", ("/b", "")),
        # absolute-form (RFC 9112 §3.2.2) when its authority equals Host
        ("http://h/x", "h", ("/x", "")),
        ("http://h/x?y=1", "h", ("/x", "y=1")),
        ("http://h", "h", ("/", "")),
        ("http://h?y=1", "h", ("/", "y=1")),
        ("https://h/a/./b", "h", ("/a/b", "")),
        ("HTTP://H/x", "h", ("/x", "")),
        ("http://h:8080/x", "h:8080", ("/x", "")),
        ("http://acme.flatrender.test/x", "Acme.FlatRender.test", ("/x", "")),
        ("http://h/x#f", "h", ("/x", "")),
        ("http://[::1]:8080/x", "[::1]:8080", ("/x", "")),
    ],
)
def test_split_target(target: str, host: str, expected: tuple[str, str]) -> None:
    assert split_target(target, host) == expected


@pytest.mark.parametrize(
    ("target", "host"),
    [
        ("*", "h"),  # asterisk-form (OPTIONS *) is not proxied
        ("h:443", "h"),  # authority-form (CONNECT)
        ("", "h"),
        ("x", "h"),
        ("v1/renders", "h"),
        # absolute-form whose authority is not the Host: two hops could pick two tenants
        ("http://other/x", "h"),
        ("http://h.evil/x", "h"),
        ("http://h:8080/x", "h"),
        ("http://h/x", "h:8080"),
        ("http://user@h/x", "h"),
        ("ftp://h/x", "h"),
        ("ws://h/x", "h"),
        # absolute-form whose path climbs
        ("http://h/../x", "h"),
        ("/../x", "h"),
        ("/%2e%2e/x?q", "h"),
    ],
)
def test_split_target_rejects(target: str, host: str) -> None:
    with pytest.raises(BadTarget):
        split_target(target, host)


# --------------------------------------------------------------------------- properties

_segment = st.one_of(
    st.sampled_from(["", "a", "b", "c.d", "...", ".x", "x.", "%2f", "%2e%2e%2f", "%252e"]),
    st.sampled_from(_DOT_SPELLINGS),
    st.sampled_from(_DOTDOT_SPELLINGS),
    st.text(alphabet="abc.%2eE", min_size=1, max_size=6),
)
_paths = st.lists(_segment, max_size=10).map(lambda segs: "/" + "/".join(segs))
_plain_segment = st.text(
    alphabet=st.characters(exclude_characters="/?#", codec="utf-8"),
    max_size=8,
).filter(lambda s: s not in _DOT_SPELLINGS and s not in _DOTDOT_SPELLINGS)
_plain_paths = st.lists(_plain_segment, max_size=8).map(lambda segs: "/" + "/".join(segs))


# What an HTTP/1.1 request line can carry: visible ASCII (RFC 9112 §3), minus the "#" that
# starts a fragment.
_QUERY_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="#")


def _resolved_or_none(path: str) -> str | None:
    try:
        return resolve_dot_segments(path)
    except BadTarget:
        return None


@settings(max_examples=300, deadline=None)
@given(_paths)
def test_resolution_agrees_with_rfc3986(path: str) -> None:
    expected, climbed = rfc3986_remove_dot_segments(_decode_dots(path))
    resolved = _resolved_or_none(path)
    if climbed:
        assert resolved is None
    else:
        assert resolved == expected


@settings(max_examples=300, deadline=None)
@given(_paths)
def test_resolved_path_has_no_dot_segments_and_is_stable(path: str) -> None:
    resolved = _resolved_or_none(path)
    if resolved is None:
        return
    assert resolved.startswith("/")
    segments = resolved.split("/")[1:]
    assert not set(segments) & {*_DOT_SPELLINGS, *_DOTDOT_SPELLINGS}
    # resolving twice is resolving once
    assert resolve_dot_segments(resolved) == resolved


@settings(max_examples=200, deadline=None)
@given(_plain_paths)
def test_path_without_dot_segments_is_unchanged(path: str) -> None:
    assert resolve_dot_segments(path) == path


@settings(max_examples=200, deadline=None)
@given(_paths, st.text(alphabet=_QUERY_CHARS, max_size=20))
def test_split_target_keeps_query_raw(path: str, query: str) -> None:
    resolved = _resolved_or_none(path)
    if resolved is None:
        return
    assert split_target(f"{path}?{query}", "h") == (resolved, query)
    assert split_target(f"http://h{path}?{query}", "h") == (resolved, query)
