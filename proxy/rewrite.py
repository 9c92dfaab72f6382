"""Reading a client's request and rewriting it for the upstream.

The proxy reads only the fields it needs (and checks their types); every other field, known to vLLM or not,
is forwarded untouched. What the client asked for (``ClientAsk``) is kept so that the response can be cut back to
exactly that: the upstream always gets logprobs with K alternatives, the client gets its own count or none.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import orjson

from .errors import BadRequest

DETAIL_FIELD = "entropy_detail"
DETAIL_HEADER = "x-entropy-detail"


@dataclass(slots=True)
class ClientAsk:
    endpoint: str  # "chat" | "completions"
    model: str
    stream: bool
    n: int
    logprobs: bool  # the client wants logprobs back at all
    top: int  # its alternatives count (chat top_logprobs, completions logprobs); -1 = whole vocabulary
    echo: bool
    prompt_logprobs: bool  # it asked for prompt_logprobs itself
    include_usage: bool
    detail_tokens: bool  # per_token entropies wanted in the summary
    prompt: Any  # messages (chat) or prompt (completions), for observers
    forced: bool = True  # False: the request was forwarded as-is (the proxy could not force logprobs)


_LONG_INT = re.compile(rb"\d{19}")


def loads(body: bytes) -> Any:
    """Parse JSON; integers over 64 bits (which orjson would turn into floats) go through the stdlib parser."""
    if not _LONG_INT.search(body):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise BadRequest(f"We could not parse the JSON body of your request: {msg}") from None


def dumps(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except (TypeError, orjson.JSONEncodeError):
        pass  # integers over 64 bits, or a lone surrogate ("\ud800" is valid JSON text, not valid UTF-8)
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":")).encode()  # escaped as the client sent it


def _type_name(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(v), "null" if v is None else type(v).__name__
    )


def _field(body: dict[str, Any], name: str, kind: type, what: str) -> Any:
    v = body.get(name)
    if v is None:
        return None
    # bool is an int in Python, not in JSON: `"n": true` is a type error, `"stream": 1` too.
    ok = isinstance(v, bool) if kind is bool else isinstance(v, kind) and not isinstance(v, bool)
    if not ok:
        raise BadRequest(f"'{name}' must be {what}, got {_type_name(v)}", param=name, code="invalid_type")
    return v


def _count(body: dict[str, Any], name: str, minimum: int) -> int | None:
    v = _field(body, name, int, "an integer")
    if v is not None and v < minimum:
        raise BadRequest(f"'{name}' must be at least {minimum}, got {v}", param=name, code="invalid_value")
    return v


def parse_request(raw: bytes, endpoint: str, headers: Any) -> tuple[dict[str, Any], ClientAsk]:
    """Parse and check a chat or completions request. Raises :class:`BadRequest` with the offending param."""
    body = loads(raw)
    if not isinstance(body, dict):
        raise BadRequest(f"The request body must be a JSON object, got {_type_name(body)}")
    model = _field(body, "model", str, "a string") or ""
    stream = bool(_field(body, "stream", bool, "a boolean"))
    n = _count(body, "n", 1) or 1
    echo = bool(_field(body, "echo", bool, "a boolean"))
    prompt_lp = body.get("prompt_logprobs") is not None
    opts = _field(body, "stream_options", dict, "an object") or {}
    include_usage = bool(opts.get("include_usage"))
    detail = body.pop(DETAIL_FIELD, None)
    if detail not in (None, "tokens", "summary"):
        raise BadRequest(f"'{DETAIL_FIELD}' must be 'tokens' or 'summary'", param=DETAIL_FIELD, code="invalid_value")
    detail_tokens = detail == "tokens" or (headers.get(DETAIL_HEADER, "").strip().lower() == "tokens")
    forced = True
    if endpoint == "chat":
        if not isinstance(body.get("messages"), list):
            raise BadRequest("'messages' must be an array of messages", param="messages", code="invalid_type")
        want = bool(_field(body, "logprobs", bool, "a boolean"))
        top = _count(body, "top_logprobs", -1)
        if top is not None and not want:
            forced = False  # invalid for the upstream (it answers 400); forward as sent, let it say so
        prompt = body["messages"]
    else:
        if "prompt" not in body:
            raise BadRequest("'prompt' is required", param="prompt", code="missing_required_parameter")
        top = _count(body, "logprobs", -1)
        want = top is not None
        prompt = body["prompt"]
    ask = ClientAsk(
        endpoint=endpoint, model=model, stream=stream, n=n, logprobs=want, top=(top or 0) if want else 0,
        echo=echo, prompt_logprobs=prompt_lp, include_usage=include_usage, detail_tokens=detail_tokens,
        prompt=prompt, forced=forced,
    )
    return body, ask


def upstream_k(ask: ClientAsk, k: int) -> int:
    """The alternatives count sent upstream: the proxy's K, or more if the client asked for more."""
    if ask.logprobs and (ask.top == -1 or ask.top > k):
        return ask.top
    return k


def force_logprobs(body: dict[str, Any], ask: ClientAsk, k: int) -> dict[str, Any]:
    """Return the upstream body: the client's, with logprobs forced to K alternatives."""
    if not ask.forced:
        return body
    out = dict(body)
    kk = upstream_k(ask, k)
    if ask.endpoint == "chat":
        out["logprobs"] = True
        out["top_logprobs"] = kk
    else:
        out["logprobs"] = kk
    return out
