"""Request-target parsing and dot-segment resolution (CONTRACT §7).

The path is resolved *before* routing so that ``/public/../v1/renders`` is routed, authenticated
and forwarded as ``/v1/renders``: routing on the raw path and forwarding it would let an upstream
that resolves dot-segments itself serve an ``api_key`` route without a key. Resolution follows
RFC 3986 §5.2.4 (remove_dot_segments), with ``%2e`` recognised as ``.`` (RFC 3986 §2.3 makes
them equivalent), except that climbing above ``/`` is an error rather than silently clamped.
"""

from __future__ import annotations

from urllib.parse import urlsplit

_DOT = frozenset({".", "%2e", "%2E"})
_DOTDOT = frozenset({"..", ".%2e", ".%2E", "%2e.", "%2E.", "%2e%2e", "%2E%2E", "%2e%2E", "%2E%2e"})


class BadTarget(ValueError):
    """The request target cannot be routed safely."""


def resolve_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 on an absolute path; raises ``BadTarget`` if it climbs above ``/``."""
    if not path.startswith("/"):
        raise BadTarget("path must start with '/'")
    if "." not in path and "%2" not in path:
        return path  # fast path: nothing to resolve
    segments = path.split("/")[1:]
    out: list[str] = []
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        if seg in _DOT:
            pass
        elif seg in _DOTDOT:
            if not out:
                raise BadTarget("path climbs above the root")
            out.pop()
        else:
            out.append(seg)
            continue
        if i == last:  # "/a/." and "/a/b/.." name a directory: keep the trailing slash
            out.append("")
    return "/" + "/".join(out)


def split_target(target: str, host: str) -> tuple[str, str]:
    """Split a request target into (resolved path, raw query string).

    Origin-form (``/path?q``) is the norm; absolute-form (``http://host/path``) is accepted as
    RFC 9112 §3.2.2 requires, but only when its authority agrees with ``Host`` — otherwise two
    hops could disagree on which tenant a request belongs to.
    """
    if not target.startswith("/"):
        if target == "*" or "://" not in target:
            raise BadTarget("unsupported request-target form")
        try:
            parts = urlsplit(target)
        except ValueError:  # "http://[::1/x" (unclosed IPv6 literal), NFKC-unsafe authority
            raise BadTarget("malformed absolute-form target") from None
        if parts.scheme.lower() not in ("http", "https") or parts.netloc.lower() != host.lower():
            raise BadTarget("absolute-form target does not match Host")
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
    # The fragment goes first: in "/a?b#c" the query is "b", and in "/a#c?x" there is none.
    path, _, query = target.partition("#")[0].partition("?")
    return resolve_dot_segments(path), query
