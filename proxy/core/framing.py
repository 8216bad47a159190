"""Message framing rules that aiohttp's C parser (llhttp) leaves to the server (RFC 9112 §6).

llhttp already refuses, before any request object exists: ``Content-Length`` with
``Transfer-Encoding``, two ``Content-Length`` lines (equal or not), a ``Content-Length`` that is
not 1*DIGIT, ``chunked`` that is not the final coding, unknown codings without ``chunked``,
two ``Transfer-Encoding`` lines, malformed chunk sizes, CTL characters in field values, obs-fold
and whitespace before the colon. What it lets through, and what this module refuses:

- codings *before* ``chunked`` (``gzip, chunked``, ``identity, chunked``). RFC 9112 §6.1 makes
  them legal in principle, but the proxy removes ``chunked`` and then forwards the body with its
  own framing and without ``Transfer-Encoding`` (a hop-by-hop header, RFC 9110 §7.6.1): the
  upstream would receive still-encoded bytes it cannot know about. No client of a render API
  sends them, so they are refused like every other value that is not exactly ``chunked``.
  (§6.1 suggests 501 for a coding the server does not understand; CONTRACT §8 and the issue ask
  for 400 ``bad_request``, which is also what nginx answers for ``chunked, identity``.)
- ``Transfer-Encoding`` in an HTTP/1.0 request: RFC 9112 §6.1 says the framing must then be
  treated as faulty, since a 1.0 sender cannot have meant it (a classic smuggling vector).

Transfer-coding names are case-insensitive and optional whitespace around list members is not
part of them (RFC 9112 §7, RFC 9110 §5.6.1), so ``Chunked`` and ``chunked `` are ``chunked``.
"""

from __future__ import annotations

from collections.abc import Sequence


def framing_problem(version: tuple[int, int], transfer_encoding: Sequence[str]) -> str | None:
    """Why this request's framing is refused, or ``None`` when it is acceptable.

    ``transfer_encoding`` holds every ``Transfer-Encoding`` field line received (usually none).
    """
    if not transfer_encoding:
        return None
    if tuple(version) < (1, 1):
        return "Transfer-Encoding is not allowed in an HTTP/1.0 request"
    codings = [c.strip(" \t").lower() for line in transfer_encoding for c in line.split(",")]
    if codings != ["chunked"]:
        return "Transfer-Encoding must be exactly 'chunked'"
    return None
