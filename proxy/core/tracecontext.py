"""W3C Trace Context ``traceparent`` (https://www.w3.org/TR/trace-context/ §3.2) for a proxy
that takes part in the trace without an OpenTelemetry span (exporter ``none``).

Written out rather than taken from OpenTelemetry's propagator, which the proxy uses when it has
an SDK span: extracting into a context and injecting from a non-recording span cost 18 µs per
request (``Telemetry.inject`` measured with timeit), this 3 µs. ``tests/unit/test_tracecontext.py``
holds the two to the same verdict on valid and invalid headers (hypothesis).
"""

from __future__ import annotations

import random
import re

_HEADER = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.S)
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
_MAX_LENGTH = 512  # OpenTelemetry's bound on a header of a future version


def parse_traceparent(value: str | None) -> tuple[str, str] | None:
    """(trace-id, trace-flags) of a valid ``traceparent``, else None (§3.2.2, §3.2.4: version
    ``ff`` and all-zero ids are invalid; a version-00 header has nothing after the flags; a
    later version may carry more fields, which are ignored)."""
    if value is None or len(value) > _MAX_LENGTH:
        return None
    value = value.strip(" \t")
    match = _HEADER.fullmatch(value)
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE:
        return None
    if parent_id == _ZERO_SPAN:
        return None
    return trace_id, flags


def new_id(bits: int) -> str:
    """A random non-zero id of ``bits`` bits in lower-case hex (§3.2.2.3, §3.2.2.4)."""
    while True:
        n = random.getrandbits(bits)
        if n:
            return f"{n:0{bits // 4}x}"


def child_traceparent(inbound: str | None) -> tuple[str, bool]:
    """The ``traceparent`` for the next hop and whether it continues ``inbound``: the same
    trace-id and flags with a parent-id of the proxy's own, or, when ``inbound`` is missing or
    invalid, a new trace that nothing has sampled (flags ``00``)."""
    parent = parse_traceparent(inbound)
    if parent is None:
        return f"00-{new_id(128)}-{new_id(64)}-00", False
    trace_id, flags = parent
    return f"00-{trace_id}-{new_id(64)}-{flags}", True
