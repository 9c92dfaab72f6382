"""W3C Trace Context (``traceparent``) read and written by hand: the request path needs two integers and a flag
from it, not the SDK's propagator objects."""

from __future__ import annotations

import random

_HEX = frozenset("0123456789abcdef")
SAMPLED = 0x01


def parse(value: str | None) -> tuple[int, int, int] | None:
    """``(trace_id, parent_span_id, flags)`` from a ``traceparent`` header, or None when it is absent or invalid
    (then the proxy starts a new trace, as the W3C spec asks). Versions above 00 are read by their first four
    fields; version ff and all-zero ids are invalid."""
    if not value:
        return None
    value = value.strip().lower()
    parts = value.split("-")
    if len(parts) < 4:
        return None
    version, trace, span, flags = parts[0], parts[1], parts[2], parts[3]
    if len(version) != 2 or version == "ff" or not _HEX.issuperset(version):
        return None
    if version == "00" and len(parts) != 4:
        return None
    if len(trace) != 32 or len(span) != 16 or len(flags) != 2:
        return None
    if not (_HEX.issuperset(trace) and _HEX.issuperset(span) and _HEX.issuperset(flags)):
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if trace_id == 0 or span_id == 0:
        return None
    return trace_id, span_id, int(flags, 16)


def format(trace_id: int, span_id: int, sampled: bool) -> str:  # noqa: A001 - the module's verb
    return f"00-{trace_id:032x}-{span_id:016x}-{SAMPLED if sampled else 0:02x}"


def new_trace_id() -> int:
    return random.getrandbits(128) or 1


def new_span_id() -> int:
    return random.getrandbits(64) or 1
