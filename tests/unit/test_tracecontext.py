"""proxy.core.tracecontext: the W3C traceparent a proxy without an SDK span sends upstream, held
to OpenTelemetry's own propagator on what is a valid header."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.trace import get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from proxy.core.tracecontext import child_traceparent, new_id, parse_traceparent

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
VALID = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (VALID, (TRACE_ID, "01")),
        (f"00-{TRACE_ID}-{PARENT_ID}-00", (TRACE_ID, "00")),
        (f" \t{VALID} ", (TRACE_ID, "01")),
        # a later version may carry more fields after the flags (§3.2.4)
        (f"01-{TRACE_ID}-{PARENT_ID}-09-what-ever", (TRACE_ID, "09")),
        (f"cc-{TRACE_ID}-{PARENT_ID}-01", (TRACE_ID, "01")),
        (None, None),
        ("", None),
        ("garbage", None),
        (f"ff-{TRACE_ID}-{PARENT_ID}-01", None),  # version ff is invalid
        (f"00-{TRACE_ID}-{PARENT_ID}-01-extra", None),  # version 00 has nothing more
        (f"00-{'0' * 32}-{PARENT_ID}-01", None),
        (f"00-{TRACE_ID}-{'0' * 16}-01", None),
        (VALID.upper(), None),  # lower-case hex only
        (f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01", None),
        (f"00_{TRACE_ID}-{PARENT_ID}-01", None),
        (f"01-{TRACE_ID}-{PARENT_ID}-01-" + "x" * 500, None),  # past 512 characters
    ],
)
def test_parse_traceparent(value: str | None, expected: tuple[str, str] | None) -> None:
    assert parse_traceparent(value) == expected


def test_a_child_continues_the_trace_with_an_id_of_its_own() -> None:
    child, continued = child_traceparent(VALID)
    version, trace_id, span_id, flags = child.split("-")
    assert continued and (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert re.fullmatch(r"[0-9a-f]{16}", span_id) and span_id != PARENT_ID
    assert child_traceparent(VALID)[0] != child  # one span id per hop


@pytest.mark.parametrize("inbound", [None, "garbage", f"00-{'0' * 32}-{PARENT_ID}-01"])
def test_without_a_valid_parent_a_new_unsampled_trace_starts(inbound: str | None) -> None:
    child, continued = child_traceparent(inbound)
    assert not continued
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", child)
    assert parse_traceparent(child) is not None


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([64, 128]))
def test_new_ids_are_nonzero_lower_hex_of_the_right_length(bits: int) -> None:
    value = new_id(bits)
    assert re.fullmatch(f"[0-9a-f]{{{bits // 4}}}", value) and int(value, 16) != 0


_PROPAGATOR = TraceContextTextMapPropagator()
_hex = st.text(alphabet="0123456789abcdefABCDEF", min_size=0, max_size=34)


@st.composite
def _near_valid(draw: st.DrawFn) -> str:
    """Headers shaped like traceparent, with each part perturbed: lengths, case, zeros,
    versions, extra fields, whitespace."""
    version = draw(st.sampled_from(["00", "01", "ff", "0", "000", "0g", "cc"]))
    trace_id = draw(st.one_of(st.just(TRACE_ID), st.just("0" * 32), _hex))
    span_id = draw(st.one_of(st.just(PARENT_ID), st.just("0" * 16), _hex))
    flags = draw(st.one_of(st.sampled_from(["00", "01", "ff"]), _hex))
    rest = draw(st.sampled_from(["", "-", "-x", "-abc-def", " ", "\t", "x"]))
    lead = draw(st.sampled_from(["", " ", "\t "]))
    return f"{lead}{version}-{trace_id}-{span_id}-{flags}{rest}"


@settings(max_examples=1000, deadline=None)
@given(st.one_of(_near_valid(), st.text(max_size=80).filter(lambda t: "\n" not in t)))
def test_the_same_verdict_as_opentelemetrys_propagator(value: str) -> None:
    context = get_current_span(_PROPAGATOR.extract({"traceparent": value})).get_span_context()
    ours = parse_traceparent(value)
    if not context.is_valid:
        assert ours is None, value
    else:
        assert ours == (f"{context.trace_id:032x}", f"{int(context.trace_flags):02x}"), value
