"""Chat bodies and stream chunks annotated without building the whole JSON tree, and written back by splicing.

vLLM's chat body is ~200 kB for 128 tokens at K=20, nearly all of it ``logprobs`` — and most of that the
``bytes`` array of every alternative. The careful path (``orjson.loads``, annotate the dicts, ``orjson.dumps``)
builds ~10^5 Python objects for it. Here:

1. one msgspec pass decodes the body's choices with their ``logprobs`` value kept as ``msgspec.Raw`` (its
   bytes, found again after the one ``"logprobs":`` key of each choice);
2. a typed msgspec decoder reads each ``logprobs`` into ``{token, logprob, top_logprobs: [{token, logprob}]}``
   structs, skipping ``bytes`` and every other field without building them;
3. the positions go through the same :class:`~proxy.annotate.ResponseAnnotator` steps as the careful path
   (``body_choice`` / ``chunk_state``, ``chunk_logprobs``, ``chunk_finish``), so the annotation is the same;
4. the client's body is the upstream's bytes with the ``logprobs`` value replaced by ``null`` when the client
   did not ask for logprobs (untouched when it asked for at least K) and ``,"entropy":{...}`` inserted before
   each choice's closing brace — where the careful path's ``dict`` puts the new key.

When the upstream writes compact JSON as orjson does (vLLM does: its recorded bodies round-trip through orjson
byte for byte), the result is byte-identical to the careful path's; a body with whitespace around the
``"logprobs":`` keys takes the careful path, and other differences of form (a float written ``1e-05`` rather
than ``1e-5``, ``\\u00e9`` rather than ``é``) stay as the upstream wrote them: the same JSON value, and the
logprobs byte-identical to the upstream's.

Anything else — completions, a client asking for fewer alternatives than K (the lists must be cut), a choice without
logprobs or already carrying ``entropy``, positions the careful path would read with its slow loop (ragged rows, a
sampled token not listed first), logits instead of logprobs, malformed JSON, an SSE ``data`` field spread over
several lines — returns None *before* any state is touched, and the caller takes the careful path.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import msgspec
import orjson

from ..annotate import ResponseAnnotator
from ..logprobs import Positions, chat_positions_typed
from ..rewrite import ClientAsk

_UNSET = msgspec.UNSET


class _Top(msgspec.Struct, gc=False):
    token: str
    logprob: float


class _Pos(msgspec.Struct, gc=False):
    token: str
    logprob: float
    top_logprobs: list[_Top]


class _ChatLogprobs(msgspec.Struct, gc=False):
    content: list[_Pos]


class _Choice(msgspec.Struct, gc=False):
    index: Any = 0
    message: Any = None
    delta: Any = None
    finish_reason: Any = None
    logprobs: msgspec.Raw | msgspec.UnsetType = _UNSET
    entropy: msgspec.Raw | msgspec.UnsetType = _UNSET


class _Body(msgspec.Struct, gc=False):
    choices: list[_Choice]
    id: Any = None
    model: Any = ""


_BODY = msgspec.json.Decoder(_Body)
_LOGPROBS = msgspec.json.Decoder(_ChatLogprobs)
_NULL = b"null"
_KEY = b'"logprobs":'
# A JSON string (escapes included) or a bracket: enough to find the brace that closes the current object.
_SCAN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]]')
_OPEN = frozenset(b"{[")
_SURROGATE = re.compile(rb"\\u[dD]")


def _object_end(raw: bytes, start: int) -> int:
    """Offset of the ``}`` closing the object that ``start`` (a position between two of its members) is in."""
    depth = 0
    for m in _SCAN.finditer(raw, start):
        c = raw[m.start()]
        if c == 0x22:
            continue
        if c in _OPEN:
            depth += 1
        elif depth:
            depth -= 1
        else:
            return m.start() if c == 0x7D else -1
    return -1


def _text(obj: Any) -> str:
    t = obj.get("content") if isinstance(obj, dict) else None
    return t if isinstance(t, str) else ""


def _read(raw: bytes, ask: ClientAsk, k_sent: int, stream: bool) -> tuple[_Body, list[Any]] | None:
    """Decode and check everything before any annotator state changes. Per choice: (start and end of its
    ``logprobs`` value, offset of its closing brace, Positions — None when the logprobs are ``null``)."""
    if ask.endpoint != "chat":
        return None
    # msgspec skips the fields it is not asked for without checking them; orjson refuses invalid UTF-8 and
    # surrogate escapes anywhere, and the careful path answers such a body as orjson and the stdlib read it.
    if not raw.isascii():
        try:
            raw.decode()
        except UnicodeDecodeError:
            return None
    if _SURROGATE.search(raw) is not None:  # one regex pass: 4x faster than two ``in`` scans of 200 kB
        return None
    try:
        body = _BODY.decode(raw)
    except msgspec.DecodeError:
        return None
    cut = ask.logprobs and 0 <= ask.top < k_sent
    # Each choice's logprobs value sits right after its key. Inside a JSON string every '"' is escaped, so the
    # bytes '"logprobs":' are a key (or the end of a key that contains an escaped quote); exactly one per
    # choice and none elsewhere means the i-th is the i-th choice's ("prompt_logprobs" does not contain it).
    if raw.count(_KEY) != len(body.choices):
        return None
    read: list[Any] = []
    at = 0
    for c in body.choices:
        lp = c.logprobs
        if c.entropy is not _UNSET or lp is _UNSET:
            return None
        value = bytes(lp)  # a copy, but comparing bytes is a memcmp where a memoryview compares item by item
        start = raw.find(_KEY, at) + len(_KEY)
        if not raw.startswith(value, start):  # not this choice's value: the careful path
            return None
        at = start + len(value)
        end = _object_end(raw, at)
        if end < 0:
            return None
        pos: Positions | None = None
        if value == _NULL:
            if not stream:  # the careful path counts it missing
                return None
        elif cut:  # the client's shorter lists must be cut from the upstream's
            return None
        else:
            try:
                content = _LOGPROBS.decode(lp).content
            except msgspec.DecodeError:
                return None
            pos = chat_positions_typed(content)
            if pos is None or pos.impossible:
                return None
        read.append((start, at, end, pos))
    return body, read


def _splice(raw: bytes, ask: ClientAsk, choices: list[tuple[int, int, int, Any]]) -> bytes:
    """The upstream's bytes with, per choice, its logprobs value as the client asked and ``entropy`` at its end."""
    out: list[bytes] = []
    at = 0
    for a, b, end, ent in choices:
        if not ask.logprobs and raw[a:b] != _NULL:
            out += (raw[at:a], _NULL)
            at = b
        if ent is not _UNSET:
            out += (raw[at:end], b',"entropy":', orjson.dumps(ent))
            at = end
    out.append(raw[at:])
    return b"".join(out)


def annotate_body_bytes(
    raw: bytes, ask: ClientAsk, k_sent: int, make: Callable[[Any], ResponseAnnotator]
) -> tuple[ResponseAnnotator, bytes] | None:
    """A whole chat body: ``(annotator, client bytes)``, or None for the careful path. ``make(body_model)``
    builds the :class:`ResponseAnnotator` as the careful path does (``body_model``: the body's ``model``)."""
    got = _read(raw, ask, k_sent, stream=False)
    if got is None:
        return None
    body, read = got
    ra = make(body.model)
    ra.request_id = str(body.id or "")
    choices = []
    for c, (a, b, end, pos) in zip(body.choices, read, strict=True):
        idx = c.index if isinstance(c.index, int) else 0
        choices.append((a, b, end, ra.body_choice(idx, pos, _text(c.message), c.finish_reason)))
    return ra, _splice(raw, ask, choices)


def annotate_chunk_bytes(data: bytes, ra: ResponseAnnotator) -> bytes | None:
    """One stream event's ``data`` (a chat chunk): the SSE event to send (``data: ...\\n\\n``), or None for the
    careful path."""
    if b"\n" in data or b"\r" in data:  # several data lines: the careful path re-frames them
        return None
    got = _read(data, ra.ask, ra.k_sent, stream=True)
    if got is None:
        return None
    body, read = got
    if not ra.request_id:
        ra.request_id = str(body.id or "")
    choices = []
    for c, (a, b, end, pos) in zip(body.choices, read, strict=True):
        idx = c.index if isinstance(c.index, int) else 0
        st = ra.chunk_state(idx)
        st.text.append(_text(c.delta))
        ent: Any = _UNSET
        if pos is not None:
            got_ent = ra.chunk_logprobs(st, pos)
            if got_ent is not None:
                ent = got_ent
        if c.finish_reason is not None:
            ent = ra.chunk_finish(idx, st, c.finish_reason, None if ent is _UNSET else ent)
        choices.append((a, b, end, ent))
    return b"data: " + _splice(data, ra.ask, choices) + b"\n\n"


def positions_of(content: list[Any]) -> Positions | None:
    """Typed positions of a chat ``logprobs.content`` given as JSON bytes (for tests)."""
    return chat_positions_typed(_LOGPROBS.decode(b'{"content":' + orjson.dumps(content) + b"}").content)
