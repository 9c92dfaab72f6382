"""The fast path (proxy.hotpath) against the careful path: the same annotation and the same client bytes, on the
recorded vLLM fixtures and on generated bodies; anything unusual falls back (None) before touching any state."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitors.summary import SummaryThresholds
from proxy.annotate import Annotator, ResponseAnnotator
from proxy.hotpath import annotate_body_bytes, annotate_chunk_bytes
from proxy.logprobs import chat_positions
from proxy.rewrite import ClientAsk
from proxy.sse import SSEDecoder

FIX = Path(__file__).parent / "fixtures" / "vllm"
ANN = Annotator(SummaryThresholds(), 49_152, lambda model: 0.672)


def ask(logprobs: bool = False, top: int = 0, detail: bool = False, model: str = "") -> ClientAsk:
    return ClientAsk(endpoint="chat", model=model, stream=False, n=1, logprobs=logprobs, top=top, echo=False,
                     prompt_logprobs=False, include_usage=False, detail_tokens=detail, prompt=[{"role": "user"}])


def _state(ra: ResponseAnnotator) -> Any:
    obs = [(o.request_id, o.model, o.choice_index, o.summary, o.entropies.tolist(), o.lower.tolist(),
            o.upper.tolist(), o.sampled_logprobs.tolist(), o.tokens, [[(t, float(v)) for t, v in a]
                                                                     for a in o.top_alternatives],
            o.completion_text, o.finish_reason, o.extra) for o in ra.finished]
    return ra.request_id, ra.model, ra.missing, ra.impossible, ra.first_summary, obs


def careful_body(raw: bytes, a: ClientAsk, k: int) -> tuple[ResponseAnnotator, bytes]:
    obj = orjson.loads(raw)
    ra = ResponseAnnotator(ANN, a, k, a.model or str(obj.get("model", "")))
    ra.annotate_body(obj)
    return ra, orjson.dumps(obj)


def fast_body(raw: bytes, a: ClientAsk, k: int) -> tuple[ResponseAnnotator, bytes] | None:
    return annotate_body_bytes(raw, a, k, lambda m: ResponseAnnotator(ANN, a, k, a.model or str(m)))


def check_body(raw: bytes, a: ClientAsk, k: int, expect_fast: bool | None = None) -> None:
    got = fast_body(raw, a, k)
    if expect_fast is not None:
        assert (got is not None) == expect_fast
    if got is None:
        return
    ra_c, out_c = careful_body(raw, a, k)
    ra_f, out_f = got
    assert out_f == out_c
    assert _state(ra_f) == _state(ra_c)


def events(sse: bytes) -> list[bytes]:
    return [ev.data for ev in SSEDecoder().decode(sse) if ev.data is not None and ev.data != b"[DONE]"]


def check_stream(datas: list[bytes], a: ClientAsk, k: int) -> int:
    """Feed the same events to both paths (the fast one falling back per event as the service does);
    returns how many events the fast path took."""
    ra_c, ra_f = ResponseAnnotator(ANN, a, k, "m"), ResponseAnnotator(ANN, a, k, "m")
    taken = 0
    for d in datas:
        obj = orjson.loads(d)
        ra_c.annotate_chunk(obj)
        want = b"data: " + orjson.dumps(obj) + b"\n\n"
        got = annotate_chunk_bytes(d, ra_f)
        if got is None:
            obj2 = orjson.loads(d)
            ra_f.annotate_chunk(obj2)
            got = b"data: " + orjson.dumps(obj2) + b"\n\n"
        else:
            taken += 1
        assert got == want
    assert _state(ra_f) == _state(ra_c)
    return taken


ASKS = [ask(), ask(True, 20), ask(True, -1), ask(detail=True), ask(True, 20, detail=True, model="client-name"),
        ask(True, 5)]


@pytest.mark.parametrize("name", ["chat_k20.json", "chat_k20_long.json", "chat_n2_k5.json"])
@pytest.mark.parametrize("a", ASKS, ids=lambda a: f"lp{int(a.logprobs)}-top{a.top}-d{int(a.detail_tokens)}")
def test_recorded_bodies_same_bytes_and_annotation(name: str, a: ClientAsk) -> None:
    raw = (FIX / name).read_bytes()
    k = 5 if "k5" in name else 20
    cut = a.logprobs and 0 <= a.top < k
    check_body(raw, a, k, expect_fast=not cut)


def test_recorded_body_without_logprobs_falls_back() -> None:
    assert fast_body((FIX / "chat_nolp.json").read_bytes(), ask(), 20) is None


@pytest.mark.parametrize("name,k", [("chat_stream_k20.sse", 20), ("chat_stream_n2_k3.sse", 3)])
@pytest.mark.parametrize("a", ASKS[:5], ids=lambda a: f"lp{int(a.logprobs)}-top{a.top}-d{int(a.detail_tokens)}")
def test_recorded_streams_same_bytes_and_annotation(name: str, k: int, a: ClientAsk) -> None:
    datas = events((FIX / name).read_bytes())
    taken = check_stream(datas, a, k)
    assert taken == len([d for d in datas if b'"choices":[' in d])  # every chunk with choices went fast


def test_unusual_bodies_fall_back() -> None:
    raw = (FIX / "chat_k20.json").read_bytes()
    obj = orjson.loads(raw)
    lp = obj["choices"][0]["logprobs"]["content"]

    def variant(change: Any) -> bytes:
        o = orjson.loads(raw)
        change(o)
        return orjson.dumps(o)

    def swap_first(o: dict[str, Any]) -> None:  # sampled token not listed first
        t = o["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        t[0], t[1] = t[1], t[0]

    unusual = [
        variant(lambda o: o["choices"][0].__setitem__("entropy", 1)),
        variant(lambda o: o["choices"][0].pop("logprobs")),
        variant(lambda o: o["choices"][0]["logprobs"]["content"][3]["top_logprobs"].pop()),  # ragged
        variant(lambda o: o["choices"][0]["logprobs"]["content"][2].__setitem__("logprob", 2.0)),  # logits
        variant(swap_first),
        variant(lambda o: o.pop("choices")),
        variant(lambda o: o["choices"].append("not an object")),
        raw.replace(b'"logprob":', b'"logprob":NaN,"x":', 1),
        raw.replace(b'"bytes":[', b'"bytes":["\xff\xfe",', 1),  # invalid UTF-8 in a field msgspec skips
        raw.replace(b'"bytes":[', b'"bytes":["\\ud800",', 1),  # a lone surrogate escape there

        b"[1,2]",
        raw[:-1],
    ]
    assert lp and len(unusual) == 12
    for body in unusual:
        assert fast_body(body, ask(), 20) is None
        ra = ResponseAnnotator(ANN, ask(), 20, "m")
        assert annotate_chunk_bytes(body, ra) is None
        assert ra.states == {} and ra.finished == [] and ra.request_id == ""


def test_multiline_data_falls_back() -> None:
    d = events((FIX / "chat_stream_k20.sse").read_bytes())[3]
    assert annotate_chunk_bytes(d.replace(b',"finish_reason"', b',\n"finish_reason"'), ResponseAnnotator(
        ANN, ask(), 20, "m")) is None


def test_whitespace_falls_back_other_forms_keep_upstream_bytes() -> None:
    """Pretty-printed: the careful path. Another float form: the fast path keeps the upstream's bytes, the same
    JSON value as the careful path's, and the logprobs byte-identical to the upstream's."""
    raw = (FIX / "chat_k20.json").read_bytes()
    assert fast_body(orjson.dumps(orjson.loads(raw), option=orjson.OPT_INDENT_2), ask(True, 20), 20) is None
    lp = raw.index(b'"logprob":') + len(b'"logprob":')
    value = raw[lp:raw.index(b",", lp)]
    assert b"." in value and b"e" not in value
    other = raw[:lp] + value + b"0" + raw[lp + len(value):]  # the same number, written otherwise
    assert other != raw and orjson.loads(other) == orjson.loads(raw)
    ra_f, out_f = fast_body(other, ask(True, 20), 20)  # type: ignore[misc]
    ra_c, out_c = careful_body(other, ask(True, 20), 20)
    assert orjson.loads(out_f) == orjson.loads(out_c) and _state(ra_f) == _state(ra_c)
    assert out_f != out_c and other[lp - 200:lp + 40] in out_f


# -- generated bodies ------------------------------------------------------------------------------------------
token_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=6)


@st.composite
def position(draw: st.DrawFn, k: int) -> dict[str, Any]:
    toks = draw(st.lists(token_text, min_size=k, max_size=k))
    raw = sorted(draw(st.lists(st.floats(-30, 0, allow_nan=False, width=32), min_size=k, max_size=k)),
                 reverse=True)
    probs = np.exp(np.asarray(raw, dtype=np.float64))
    lps = [float(v) - math.log(max(1.0, float(probs.sum()) * 1.001)) for v in raw]  # mass at most 1
    lps = [min(v, 0.0) for v in lps]
    sampled = draw(st.integers(0, k - 1))
    order = [sampled] + [i for i in range(k) if i != sampled]
    entries = [{"token": toks[i], "logprob": lps[i], "bytes": list(toks[i].encode())} for i in order]
    return {"token": toks[sampled], "logprob": lps[sampled], "bytes": list(toks[sampled].encode()),
            "top_logprobs": entries}


@st.composite
def chat_body(draw: st.DrawFn) -> tuple[bytes, int]:
    k = draw(st.integers(1, 6))
    n = draw(st.integers(1, 3))
    choices = []
    for i in range(n):
        content = draw(st.lists(position(k), min_size=1, max_size=6))
        choice: dict[str, Any] = {"index": draw(st.sampled_from([i, 0, "x"])),
                                  "message": {"role": "assistant", "content": draw(st.one_of(token_text, st.none()))}}
        if draw(st.booleans()):
            choice["extra"] = {"nested": [draw(token_text), {"a": "}"}]}
        choice["logprobs"] = {"content": content}
        choice["finish_reason"] = draw(st.sampled_from(["length", "stop", None]))
        if draw(st.booleans()):
            choice["stop_reason"] = draw(st.one_of(st.none(), token_text))
        choices.append(choice)
    body = {"id": draw(st.one_of(token_text, st.none())), "object": "chat.completion", "model": "m",
            "choices": choices, "usage": {"completion_tokens": 3}}
    if draw(st.booleans()):
        body = {"tail": "{[\"", **body}
    return orjson.dumps(body), k


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chat_body(), st.sampled_from(ASKS))
def test_generated_bodies(body: tuple[bytes, int], a: ClientAsk) -> None:
    raw, k = body
    cut = a.logprobs and 0 <= a.top < k
    check_body(raw, a, k, expect_fast=not cut)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chat_body(), st.sampled_from(ASKS[:5]))
def test_generated_streams(body: tuple[bytes, int], a: ClientAsk) -> None:
    """The body's choices cut into one chunk per position (vLLM's stream shape), then fed to both paths."""
    raw, k = body
    obj = orjson.loads(raw)
    datas = []
    for c in obj["choices"]:
        content = c["logprobs"]["content"]
        for j, p in enumerate(content):
            last = j == len(content) - 1
            ch = {"index": c["index"], "delta": {"content": p["token"]}, "logprobs": {"content": [p]},
                  "finish_reason": c["finish_reason"] if last else None}
            datas.append(orjson.dumps({"id": obj["id"], "object": "chat.completion.chunk", "choices": [ch]}))
        datas.append(orjson.dumps({"id": obj["id"], "choices": [{"index": c["index"], "delta": {},
                                                                 "logprobs": None, "finish_reason": "stop"}]}))
    check_stream(datas, a, k)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6).flatmap(lambda k: st.lists(position(k), min_size=1, max_size=5)))
def test_typed_positions_equal_careful(content: list[dict[str, Any]]) -> None:
    from proxy.hotpath.splice import positions_of

    typed, ref = positions_of(content), chat_positions(content)
    assert typed is not None
    for f in ("logprobs", "sampled", "sampled_col"):
        assert np.array_equal(getattr(typed, f), getattr(ref, f))
    assert typed.tokens == ref.tokens and typed.alternatives == ref.alternatives
    assert (typed.skipped, typed.impossible, typed.collapsed) == (ref.skipped, ref.impossible, ref.collapsed)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=12).map(lambda b: b"data: " + b.replace(b"\r", b"").replace(b"\n", b"") + b"\n\n"),
    st.sampled_from([b"data: x\n\n", b": keep-alive\n\n", b"data:x\n\n", b"event: e\ndata: y\n\n", b"\n",
                     b"data: a\r\n\r\n", b"data: {}\n", b"\n\n", b"data: a\ndata: b\n\n", b"id: 3\n\n"])),
    max_size=8), st.data())
def test_sse_whole_event_shortcut_equals_line_loop(pieces: list[bytes], data: st.DataObject) -> None:
    """The decoder's shortcut for writes of whole "data:" events gives what its line loop gives, however the
    stream is cut into writes."""
    stream = b"".join(pieces)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=4)))
    writes = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    fast, slow = SSEDecoder(), SSEDecoder()
    got: list[tuple[Any, ...]] = []
    want: list[tuple[Any, ...]] = []
    for w in writes:
        got += [(e.raw, e.data, e.event, e.comments) for e in fast.decode(w)]
        want += [(e.raw, e.data, e.event, e.comments) for e in _line_loop(slow, w)]  # what the shortcut replaces
    got += [(e.raw, e.data, e.event, e.comments) for e in fast.flush()]
    want += [(e.raw, e.data, e.event, e.comments) for e in slow.flush()]
    assert got == want


def _line_loop(dec: SSEDecoder, chunk: bytes) -> list[Any]:
    """SSEDecoder.decode without its whole-event shortcut (a sentinel byte defeats it, then is dropped)."""
    if not chunk:
        return dec.decode(chunk)
    dec._buf += chunk[:1]  # a non-empty buffer: the shortcut is skipped
    return dec.decode(chunk[1:])
