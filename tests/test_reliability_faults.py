"""Every fault of the fault-injection upstream gets its documented outcome, and the proxy is healthy afterwards.

The proxy runs under uvicorn (default components: metrics and monitors) in front of
:class:`tests.fakes.fault_upstream.FaultUpstream`; the fault is chosen per request with ``X-Fault`` (forwarded
upstream like any client header). After each fault the next normal request succeeds, the server's event loop is
back to its baseline number of tasks and no upstream connection is left busy. docs/reliability.md is this table.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import pytest

from proxy.metrics import ERROR_KINDS
from tests.fakes.fault_upstream import FaultUpstream, closed_port_url
from tests.plugins.reliability_support import (
    CHAT,
    RunningProxy,
    chat_body,
    final_entropy,
    running_proxy,
    sample,
    sse_events,
)

TOKENS = 8
TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Outcome:
    status: int
    code: str | None = None  # error.code of an error the proxy answers itself (None: passed through / 200)
    kind: str | None = None  # entropy_proxy_upstream_errors_total{kind} that must go up by one
    entropy: str = "annotated"  # "annotated" | "null" | "none" (an error, no annotation)
    tokens: int = TOKENS  # annotated tokens (positions without usable logprobs are skipped)
    events_before_error: int | None = None  # streams: data events relayed before the proxy's error event


def _kind(k: str) -> str:
    # upstream_errors_total labels come from a fixed set; see the report for "bad_response"
    return k if k in ERROR_KINDS else "other"


NON_STREAM: dict[str, Outcome] = {
    "reset": Outcome(502, "upstream_unavailable", "unavailable", "none"),
    "hang": Outcome(504, "upstream_timeout", "timeout", "none"),
    "stall": Outcome(504, "upstream_timeout", "timeout", "none"),
    "slow-20": Outcome(200),
    "status-500": Outcome(500, None, "status_5xx", "none"),
    "status-503": Outcome(503, None, "status_5xx", "none"),
    "status-429": Outcome(429, None, "status_4xx", "none"),
    "malformed-json": Outcome(502, "upstream_bad_response", _kind("bad_response"), "none"),
    "truncated": Outcome(502, "upstream_unavailable", "unavailable", "none"),
    "drop-logprobs": Outcome(200, entropy="null"),
    "null-logprobs": Outcome(200, tokens=TOKENS - 2),
    "nan-logprobs": Outcome(200, tokens=TOKENS - 2),
    "positive-logprobs": Outcome(200, entropy="null"),
    "fallback": Outcome(200, tokens=TOKENS - 2),
}

STREAM: dict[str, Outcome] = {
    "reset": Outcome(502, "upstream_unavailable", "unavailable", "none"),
    "hang": Outcome(504, "upstream_timeout", "timeout", "none"),
    "stall": Outcome(504, "upstream_timeout", "timeout", "none"),
    "stall-mid": Outcome(200, "upstream_timeout", "stream", "none", events_before_error=3),
    "slow-20": Outcome(200),
    "status-500": Outcome(500, None, "status_5xx", "none"),
    "malformed-json": Outcome(502, "upstream_bad_response", _kind("bad_response"), "none"),
    "cut-mid-chunk": Outcome(200, "upstream_unavailable", "stream", "none", events_before_error=3),
    "cut-mid-event": Outcome(200, "upstream_unavailable", "stream", "none", events_before_error=3),
    "stream-error": Outcome(200, None, "stream", "none"),
    "drop-logprobs": Outcome(200, entropy="null"),
    "null-logprobs": Outcome(200, tokens=TOKENS - 2),
    "nan-logprobs": Outcome(200, tokens=TOKENS - 2),
    "positive-logprobs": Outcome(200, entropy="null"),
    "fallback": Outcome(200, tokens=TOKENS - 2),
    "multi-token": Outcome(200),
    "empty-delta": Outcome(200, tokens=TOKENS + 2),  # two extra chunks: logprobs with an empty delta, counted
    "keep-alive": Outcome(200),
    "crlf": Outcome(200),
}


@pytest.fixture(scope="module")
def fake() -> Iterator[FaultUpstream]:
    with FaultUpstream(tokens=TOKENS, stall_s=10) as f:
        yield f


@pytest.fixture(scope="module")
def proxy(fake: FaultUpstream) -> Iterator[RunningProxy]:
    with running_proxy(fake.url, timeout_s=TIMEOUT_S, connect_timeout_s=TIMEOUT_S) as p:
        assert p.client.post(CHAT, json=chat_body()).status_code == 200  # warm-up: lazily created tasks exist
        p.settle()
        p.baseline_tasks = p.spy.tasks()
        yield p


def _healthy_afterwards(proxy: RunningProxy) -> None:
    tasks, busy = proxy.settle()
    assert busy == 0, "an upstream connection is still in use"
    assert tasks <= proxy.baseline_tasks, f"{tasks} tasks on the loop, baseline {proxy.baseline_tasks}"
    for stream in (False, True):
        r = proxy.client.post(CHAT, json=chat_body(stream=stream))
        assert r.status_code == 200
        ent = final_entropy(sse_events(r.content)) if stream else r.json()["choices"][0]["entropy"]
        assert ent["tokens"] == TOKENS
    proxy.settle()


def _check(proxy: RunningProxy, fake: FaultUpstream, mode: str, stream: bool, want: Outcome) -> None:
    before = proxy.metrics()
    r = proxy.client.post(CHAT, json=chat_body(stream=stream), headers={"X-Fault": mode})
    after = proxy.metrics()
    assert r.status_code == want.status, r.content[:300]
    streamed = r.headers.get("content-type", "").startswith("text/event-stream")
    if streamed:
        evs = sse_events(r.content)
        assert evs[-1] == "[DONE]" and r.content.replace(b"\r\n", b"\n").endswith(b"data: [DONE]\n\n")
        errors = [e for e in evs if isinstance(e, dict) and "error" in e]
        if want.kind == "stream":
            assert len(errors) == 1 and set(errors[0]["error"]) == {"message", "type", "param", "code"}
            if want.code is not None:
                assert errors[0]["error"]["code"] == want.code and evs[-2] is errors[0]
            if want.events_before_error is not None:
                assert evs.index(errors[0]) == want.events_before_error
        else:
            assert not errors
            ent = final_entropy(evs)
            if want.entropy == "null":
                assert ent is None
            else:
                assert ent["tokens"] == want.tokens and ent["mean"] is not None
    else:
        body = r.json()
        if want.status >= 400:
            assert set(body["error"]) == {"message", "type", "param", "code"}
            if want.code is not None:
                assert body["error"]["code"] == want.code
        else:
            ent = body["choices"][0]["entropy"]
            if want.entropy == "null":
                assert ent is None
            else:
                assert ent["tokens"] == want.tokens and ent["mean"] is not None
    labels = {"model": "smollm2"}
    if want.kind is not None:
        key = "entropy_proxy_upstream_errors_total"
        assert sample(after, key, **labels, kind=want.kind) - sample(before, key, **labels, kind=want.kind) == 1
    missing = "entropy_proxy_logprobs_missing_total"
    assert sample(after, missing, **labels) - sample(before, missing, **labels) == (want.entropy == "null")
    req = "entropy_proxy_requests_total"
    status = str(want.status)
    assert sample(after, req, **labels, endpoint="chat", status=status) - sample(
        before, req, **labels, endpoint="chat", status=status) == 1
    if mode in ("hang", "stall", "stall-mid"):
        assert fake.wait_closed(-1, 2.0), "the proxy never closed the stalled upstream connection"


@pytest.mark.parametrize("mode", sorted(NON_STREAM))
def test_fault_non_streaming(proxy: RunningProxy, fake: FaultUpstream, mode: str) -> None:
    _check(proxy, fake, mode, False, NON_STREAM[mode])
    _healthy_afterwards(proxy)


@pytest.mark.parametrize("mode", sorted(STREAM))
def test_fault_streaming(proxy: RunningProxy, fake: FaultUpstream, mode: str) -> None:
    _check(proxy, fake, mode, True, STREAM[mode])
    _healthy_afterwards(proxy)


def test_framing_variants_give_the_same_entropy_as_a_plain_stream(proxy: RunningProxy) -> None:
    def per_token(mode: str) -> list[float]:
        r = proxy.client.post(CHAT, json=chat_body(stream=True), headers={"X-Fault": mode})
        return [t for ev in sse_events(r.content) if isinstance(ev, dict) for c in ev["choices"]
                if c.get("entropy") for t in c["entropy"]["per_token"]]

    plain = per_token("ok")
    assert len(plain) == TOKENS
    for mode in ("multi-token", "keep-alive", "crlf"):
        assert per_token(mode) == plain, mode
    extra = per_token("empty-delta")  # the plain tokens in order, plus the control tokens' positions
    it = iter(extra)
    assert len(extra) == TOKENS + 2 and all(any(v == w for w in it) for v in plain)
    r = proxy.client.post(CHAT, json=chat_body(stream=True), headers={"X-Fault": "keep-alive"})
    assert r.content.count(b": keep-alive\n\n") >= TOKENS


def test_nan_logprobs_reach_the_client_as_null_json(proxy: RunningProxy) -> None:
    r = proxy.client.post(CHAT, json=chat_body(logprobs=True, top_logprobs=2), headers={"X-Fault": "nan-logprobs"})
    content = orjson.loads(r.content)["choices"][0]["logprobs"]["content"]  # strict JSON: no bare NaN
    assert content[1]["logprob"] is None and content[0]["logprob"] is not None


@pytest.mark.parametrize("stream", [False, True])
def test_lower_max_logprobs_is_learnt_and_retried(proxy: RunningProxy, fake: FaultUpstream, stream: bool) -> None:
    upstream = proxy.app.state.upstream
    n0 = len(fake.requests)
    try:
        r = proxy.client.post(CHAT, json=chat_body(stream=stream), headers={"X-Fault": "max-logprobs-5"})
        assert r.status_code == 200
        ent = final_entropy(sse_events(r.content)) if stream else r.json()["choices"][0]["entropy"]
        assert ent["top_k"] == 5 and ent["tokens"] == TOKENS
        assert [b["top_logprobs"] for b in fake.bodies()[n0:]] == [20, 5]
        assert b'"error"' not in r.content
    finally:
        upstream.max_k.clear()
    _healthy_afterwards(proxy)


@pytest.mark.parametrize("stream", [False, True])
def test_refused_connection_is_502_and_the_proxy_keeps_serving(stream: bool) -> None:
    with running_proxy(closed_port_url(), connect_timeout_s=TIMEOUT_S) as p:
        before = p.metrics()
        r = p.client.post(CHAT, json=chat_body(stream=stream))
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"
        key = "entropy_proxy_upstream_errors_total"
        assert sample(p.metrics(), key, model="smollm2", kind="unavailable") - sample(
            before, key, model="smollm2", kind="unavailable") == 1
        assert p.client.get("/healthz").status_code == 200
        assert p.client.get("/readyz").status_code == 503
        tasks, busy = p.settle()
        assert busy == 0 and tasks <= p.baseline_tasks
