"""Body surgery for the fault upstream: healthy vLLM bodies turned into the faulty ones it serves."""

from __future__ import annotations

import json
from typing import Any

BODY_MODES = ("null-logprobs", "nan-logprobs", "positive-logprobs", "fallback")


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=True).encode()


def events_of(body: bytes) -> list[bytes]:
    """SSE body -> the ``data:`` payloads (JSON is on one line, so splitting on blank lines is exact)."""
    return [e[len(b"data: "):] for e in body.split(b"\n\n") if e.startswith(b"data: ")]


def _logprob_entries(obj: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for c in obj.get("choices") or []:
        lp = c.get("logprobs")
        if isinstance(lp, dict) and isinstance(lp.get("content"), list):
            out += lp["content"]
    return out


def _shift_logprobs(obj: Any, by: float) -> None:
    for e in _logprob_entries(obj):
        e["logprob"] += by
        for t in e["top_logprobs"]:
            t["logprob"] += by
    for c in obj.get("choices") or []:
        lp = c.get("logprobs")
        if isinstance(lp, dict) and "token_logprobs" in lp:
            lp["token_logprobs"] = [v + by for v in lp["token_logprobs"]]
            lp["top_logprobs"] = [{k: v + by for k, v in d.items()} for d in lp["top_logprobs"]]


def mutate_body(mode: str, body: bytes) -> bytes:
    if mode not in BODY_MODES:
        return body
    obj = json.loads(body)
    _mutate(mode, obj, streamed=False, position=None)
    return dumps(obj)


def _mutate(mode: str, obj: dict[str, Any], streamed: bool, position: int | None) -> None:
    if mode == "positive-logprobs":
        _shift_logprobs(obj, 15.0)
        return
    if mode != "fallback":
        bad = None if mode == "null-logprobs" else float("nan")
        for c in obj.get("choices") or []:  # legacy completions: a list of floats per choice
            lp = c.get("logprobs")
            if isinstance(lp, dict) and "token_logprobs" in lp:
                for j in range(len(lp["token_logprobs"])):
                    if (position if streamed else j) in (1, 2):
                        lp["token_logprobs"][j] = bad
    entries = _logprob_entries(obj)
    chosen = [e for j, e in enumerate(entries) if (position if streamed else j) in (1, 2)]
    for e in chosen:
        if mode == "fallback" and streamed:
            e.pop("logprob", None)
            e.pop("top_logprobs", None)
        elif mode == "fallback":
            e["logprob"], e["top_logprobs"] = -9999.0, []
        else:
            bad = None if mode == "null-logprobs" else float("nan")
            e["logprob"] = bad
            if e["top_logprobs"]:
                e["top_logprobs"][0]["logprob"] = bad


def stream_events(mode: str, events: list[bytes]) -> list[bytes]:
    if mode in BODY_MODES:
        out, position = [], 0
        for ev in events:
            if ev == b"[DONE]":
                out.append(ev)
                continue
            obj = json.loads(ev)
            n = len(_logprob_entries(obj))
            _mutate(mode, obj, streamed=True, position=position)
            position += n
            out.append(dumps(obj))
        return out
    if mode == "multi-token":
        return _merge_chunks(events, 3)
    if mode == "empty-delta":
        out = []
        for i, ev in enumerate(events):
            out.append(ev)
            obj = json.loads(ev) if ev != b"[DONE]" else {}
            if i % 3 == 2 and _logprob_entries(obj) and obj["choices"][0].get("finish_reason") is None:
                choice = obj["choices"][0]
                choice["delta"] = {}
                choice["logprobs"]["content"][0]["token"] = "<tool_call>"
                out.append(dumps(obj))
        return out
    if mode == "keep-alive":
        return [x for ev in events for x in (b": keep-alive", ev)]
    return events


def _merge_chunks(events: list[bytes], per: int) -> list[bytes]:
    """Chat stream with one choice: join ``per`` consecutive token chunks into one."""
    out: list[bytes] = []
    group: list[dict[str, Any]] = []

    def flush() -> None:
        if group:
            first = group[0]
            ch = first["choices"][0]
            for other in group[1:]:
                o = other["choices"][0]
                ch["delta"]["content"] = ch["delta"].get("content", "") + o["delta"].get("content", "")
                ch["logprobs"]["content"] += o["logprobs"]["content"]
                ch.update({k: v for k, v in o.items() if k not in ("delta", "logprobs")})
                first.update({k: v for k, v in other.items() if k != "choices"})
            out.append(dumps(first))
            group.clear()

    for ev in events:
        obj = json.loads(ev) if ev != b"[DONE]" else None
        if obj is not None and _logprob_entries(obj):
            group.append(obj)
            if len(group) == per or obj["choices"][0].get("finish_reason"):
                flush()
            continue
        flush()
        out.append(ev)
    flush()
    return out

