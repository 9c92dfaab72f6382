"""Other OpenAI-compatible engines through the same code: K capped to the engine's limit (learnt from its error
or configured with ``top_k``), errors normalised to the OpenAI shape.

Each fake answers healthy requests with the replaying upstream's vLLM-shaped bodies and refuses like the engine
(docs/reliability.md, "Other engines"; VLLM.md's table):
- OpenAI: chat ``top_logprobs`` <= 20, legacy completions ``logprobs`` <= 5, 400 with its own messages;
- llama.cpp ``llama-server``: no cap, omitted ``top_logprobs`` means 20, error object without ``param``;
- TGI Messages API: ``--max-top-n-tokens`` 5, 422 ``{"error": str, "error_type": str}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from bench.replay_upstream import Replayer
from tests.plugins.recorded import Chunks, proxy_client
from tests.plugins.reliability_support import CHAT, COMPLETIONS, chat_body, final_entropy, sse_events

ERROR_KEYS = {"message", "type", "param", "code"}
COMP = {"model": "smollm2", "prompt": "Once", "max_tokens": 6}


class Engine:
    """``handler(request)`` for MockTransport; ``refuse(path, body)`` returns (status, body) or None."""

    def __init__(self, refuse: Callable[[str, dict[str, Any]], tuple[int, Any] | None]) -> None:
        self.refuse = refuse
        self.replayer = Replayer(tokens=6, max_logprobs=-1)
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        self.sent.append((request.url.path, body))
        refused = self.refuse(request.url.path, body)
        if refused is not None:
            status, err = refused
            content = err if isinstance(err, bytes) else orjson.dumps(err)
            return httpx.Response(status, stream=Chunks([content]), headers={"content-type": "application/json"})
        if body.get("logprobs") is True and body.get("top_logprobs") is None:
            body = {**body, "top_logprobs": 20}  # llama.cpp: omitted means 20
        reply = self.replayer.completion(request.url.path == CHAT, orjson.dumps(body))
        return httpx.Response(reply.status, stream=Chunks(list(reply.parts)),
                              headers={"content-type": reply.content_type.decode()})

    def ks(self, path: str) -> list[int]:
        key = "top_logprobs" if path == CHAT else "logprobs"
        return [b.get(key) for p, b in self.sent if p == path]


def openai_refuse(path: str, body: dict[str, Any]) -> tuple[int, Any] | None:
    if path == CHAT and (body.get("top_logprobs") or 0) > 20:
        got = body["top_logprobs"]
        msg = f"Invalid 'top_logprobs': integer above maximum value. Expected a value <= 20, but got {got} instead."
        return 400, {"error": {"message": msg, "type": "invalid_request_error", "param": "top_logprobs",
                               "code": "integer_above_max_value"}}
    if path == COMPLETIONS and (body.get("logprobs") or 0) > 5:
        return 400, {"error": {"message": "Invalid value for 'logprobs': must be less than or equal to 5.",
                               "type": "invalid_request_error", "param": "logprobs", "code": None}}
    return None


def tgi_refuse(path: str, body: dict[str, Any]) -> tuple[int, Any] | None:
    if body.get("model") == "overloaded":
        return 503, {"error": "Model is overloaded", "error_type": "overloaded"}
    n = body.get("top_logprobs") or 0
    if n > 5:
        return 422, {"error": f"Input validation error: `top_n_tokens` must be >= 0 and <= 5. Given: {n}",
                     "error_type": "validation"}
    return None


def llamacpp_refuse(path: str, body: dict[str, Any]) -> tuple[int, Any] | None:
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        return 400, {"error": {"code": 400, "message": "'messages' is required", "type": "invalid_request_error"}}
    return None


def _entropy(r: httpx.Response, stream: bool) -> Any:
    return final_entropy(sse_events(r.content)) if stream else r.json()["choices"][0]["entropy"]


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_limits_are_learnt_per_endpoint(stream: bool) -> None:
    engine = Engine(openai_refuse)
    async with proxy_client(engine, top_k=20) as c:
        chat = await c.post(CHAT, json=chat_body(stream=stream))
        comp = await c.post(COMPLETIONS, json={**COMP, "stream": stream})
        comp2 = await c.post(COMPLETIONS, json={**COMP, "stream": stream, "logprobs": 2})
        chat2 = await c.post(CHAT, json=chat_body(stream=stream))
    for r in (chat, comp, comp2, chat2):
        assert r.status_code == 200 and b'"error"' not in r.content
    assert _entropy(chat, stream)["top_k"] == 20 and _entropy(comp, stream)["top_k"] == 5
    assert engine.ks(COMPLETIONS) == [20, 5, 5]  # learnt once, for completions only
    assert engine.ks(CHAT) == [20, 20]
    lp = comp2.json()["choices"][0]["logprobs"] if not stream else None
    if lp is not None:
        assert all(len(d) <= 3 for d in lp["top_logprobs"])  # the client's own 2 (+ the sampled token)


async def test_openai_configured_k_over_the_cap_is_capped_and_the_clients_own_excess_passes() -> None:
    engine = Engine(openai_refuse)
    async with proxy_client(engine, top_k=50) as c:
        ok = await c.post(CHAT, json=chat_body())
        own = await c.post(CHAT, json=chat_body(logprobs=True, top_logprobs=25))
    assert ok.status_code == 200 and ok.json()["choices"][0]["entropy"]["top_k"] == 20
    assert engine.ks(CHAT) == [50, 20, 25]
    assert own.status_code == 400 and own.json()["error"]["param"] == "top_logprobs"  # the client's to see


@pytest.mark.parametrize("stream", [False, True])
async def test_tgi_cap_5_is_learnt_from_its_422(stream: bool) -> None:
    engine = Engine(tgi_refuse)
    async with proxy_client(engine) as c:
        r = await c.post(CHAT, json=chat_body(stream=stream))
        r2 = await c.post(CHAT, json=chat_body(stream=stream))
    assert r.status_code == 200 and r2.status_code == 200
    assert _entropy(r, stream)["top_k"] == 5 and _entropy(r, stream)["tokens"] == 6
    assert engine.ks(CHAT) == [20, 5, 5]


@pytest.mark.parametrize("stream", [False, True])
async def test_tgi_error_body_is_normalised(stream: bool) -> None:
    engine = Engine(tgi_refuse)
    async with proxy_client(engine, top_k=5) as c:
        r = await c.post(CHAT, json=chat_body(model="overloaded", stream=stream))
        own = await c.post(CHAT, json=chat_body(logprobs=True, top_logprobs=9, stream=stream))
    assert r.status_code == 503 and r.headers["content-type"] == "application/json"
    assert r.json() == {"error": {"message": "Model is overloaded", "type": "api_error", "param": None,
                                  "code": "overloaded"}}
    err = own.json()["error"]
    assert own.status_code == 422 and set(err) == ERROR_KEYS and err["type"] == "invalid_request_error"
    assert "<= 5" in err["message"] and err["code"] == "validation"


async def test_tgi_error_event_mid_stream_is_normalised_and_ends_with_one_error_then_done() -> None:
    pieces = [b'data: {"id":"x","object":"chat.completion.chunk","model":"m","choices":[{"index":0,'
              b'"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n',
              b'data: {"error":"Request failed during generation: CUDA OOM","error_type":"generation"}\n\n']

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Chunks(pieces), headers={"content-type": "text/event-stream"})

    async with proxy_client(handler) as c:
        r = await c.post(CHAT, json=chat_body(stream=True))
    evs = sse_events(r.content)
    errors = [e for e in evs if isinstance(e, dict) and "error" in e]
    assert evs[-1] == "[DONE]" and len(errors) == 1 and evs[-2] is errors[0]
    assert set(errors[0]["error"]) == ERROR_KEYS and "CUDA OOM" in errors[0]["error"]["message"]


async def test_llamacpp_explicit_k_and_its_error_completed_to_the_openai_shape() -> None:
    engine = Engine(llamacpp_refuse)
    async with proxy_client(engine) as c:
        r = await c.post(CHAT, json=chat_body(logprobs=True))  # no top_logprobs: OpenAI means 0 alternatives
        bad = await c.post(CHAT, json={"model": "smollm2", "messages": []})
    assert engine.ks(CHAT)[0] == 20  # always explicit: the engine's own default never decides K
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert all(e["top_logprobs"] == [] for e in content)
    assert r.json()["choices"][0]["entropy"]["top_k"] == 20
    assert bad.status_code == 400
    assert bad.json() == {"error": {"message": "'messages' is required", "type": "invalid_request_error",
                                    "param": None, "code": 400}}


async def test_non_json_error_pages_become_openai_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, stream=Chunks([b"<html><body>502 Bad Gateway</body></html>"]),
                              headers={"content-type": "text/html"})

    async with proxy_client(handler) as c:
        r = await c.post(CHAT, json=chat_body())
    assert r.status_code == 502 and r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == ERROR_KEYS and "502 Bad Gateway" in err["message"] and err["type"] == "api_error"
