"""The background sampler against a fake upstream (httpx.MockTransport): budgets, refusals, errors, bounds."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, generate_latest

from proxy.background import ensure_sampler, install
from proxy.background.sampler import HOUR, BackgroundSampler
from proxy.settings import load_settings

SETTINGS = load_settings({"upstream": "http://upstream.test"}, environ={})


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeUpstream:
    """Answers chat requests with ``completion`` tokens per choice and ``prompt`` prompt tokens, like vLLM's usage."""

    def __init__(self, prompt: int = 20, completion: int | None = None) -> None:
        self.prompt, self.completion = prompt, completion
        self.bodies: list[dict[str, Any]] = []
        self.fail: Exception | int | bytes | None = None

    def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        if isinstance(self.fail, Exception):
            raise self.fail
        if isinstance(self.fail, int):
            return httpx.Response(self.fail, json={"error": {"message": "boom"}})
        if isinstance(self.fail, bytes):
            return httpx.Response(200, content=self.fail)
        n = body.get("n", 1)
        per = body["max_tokens"] if self.completion is None else self.completion
        return httpx.Response(200, json={
            "choices": [{"index": i, "message": {"role": "assistant", "content": "x"}} for i in range(n)],
            "usage": {"prompt_tokens": self.prompt, "completion_tokens": per * n,
                      "total_tokens": self.prompt + per * n},
        })


def make(up: FakeUpstream, clock: Clock | None = None, **kw: Any) -> BackgroundSampler:
    client = httpx.AsyncClient(base_url="http://upstream.test", transport=httpx.MockTransport(up.handler))
    return BackgroundSampler(client, SETTINGS, clock=clock or Clock(), **kw)


def body(max_tokens: int = 40, n: int = 1, text: str = "What is 2+2?") -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "n": n}


async def test_budget_holds_over_the_sliding_hour_and_refusals_are_counted() -> None:
    up, clock = FakeUpstream(prompt=20), Clock()
    s = make(up, clock)
    s.add_purpose("canary", 1_000)
    sent = 0
    for _ in range(30):
        if await s.chat("canary", body(max_tokens=40, n=4)) is not None:
            sent += 1
        assert s.tokens_last_hour("canary") <= 1_000
        clock.t += 60  # 30 requests over 30 minutes: all in one hour
    st = s.stats()["canary"]
    assert sent == len(up.bodies) and sent > 0
    assert st["refused"] == 30 - sent > 0
    assert st["tokens_total"] == sent * (20 + 160)  # actual usage is charged, not the worst case
    assert st["reserved"] == 0
    clock.t += HOUR  # the hour slides past every charge
    assert s.tokens_last_hour("canary") == 0
    assert await s.chat("canary", body(max_tokens=40, n=4)) is not None


async def test_worst_case_uses_the_learnt_prompt_size() -> None:
    up = FakeUpstream(prompt=17)
    s = make(up)
    s.add_purpose("canary", 10_000)
    b = body(max_tokens=10, n=2)
    first = s.worst_case(dict(b))
    assert first >= 10 * 2 + len(b["messages"][0]["content"])  # bytes bound plus template allowance
    await s.chat("canary", b)
    assert s.worst_case(dict(b)) == 10 * 2 + 17


async def test_a_request_larger_than_the_budget_is_refused_before_it_is_sent() -> None:
    up = FakeUpstream()
    s = make(up)
    s.add_purpose("semantic", 100)
    assert await s.chat("semantic", body(max_tokens=200)) is None
    assert up.bodies == [] and s.stats()["semantic"]["refused"] == 1


async def test_logprobs_are_forced_unless_the_body_sets_them() -> None:
    up = FakeUpstream()
    s = make(up, k=lambda: 7)
    s.add_purpose("canary", 10_000)
    await s.chat("canary", body())
    await s.chat("canary", {**body(), "logprobs": False})
    assert up.bodies[0]["logprobs"] is True and up.bodies[0]["top_logprobs"] == 7
    assert up.bodies[1]["logprobs"] is False and "top_logprobs" not in up.bodies[1]
    b = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    await s.chat("canary", b)
    assert up.bodies[2]["max_tokens"] > 0  # a body without max_tokens gets a finite one


async def test_the_upstreams_logprobs_limit_is_learnt() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        k = json.loads(request.content)["top_logprobs"]
        calls.append(k)
        if k > 5:
            return httpx.Response(400, json={"error": {"message": f"Requested sample logprobs of {k}, which is "
                                                                   "greater than max allowed: 5"}})
        return httpx.Response(200, json={"choices": [], "usage": {"prompt_tokens": 1, "total_tokens": 1}})

    client = httpx.AsyncClient(base_url="http://u.test", transport=httpx.MockTransport(handler))
    s = BackgroundSampler(client, SETTINGS)
    s.add_purpose("canary", 10_000)
    assert await s.chat("canary", body()) is not None
    assert await s.chat("canary", body()) is not None
    assert calls == [20, 5, 5]


@pytest.mark.parametrize("fail, charged", [
    (httpx.ConnectError("refused"), 0), (httpx.ReadTimeout("slow"), "worst"), (httpx.ReadError("reset"), "worst"),
    (500, 0), (400, 0),
    (b"not json", "worst"), (b'{"choices": "no"}', "worst"),
])
async def test_upstream_errors_return_none_and_are_counted(fail: Any, charged: Any) -> None:
    up = FakeUpstream()
    up.fail = fail
    s = make(up)
    s.add_purpose("canary", 10_000)
    b = body(max_tokens=30)
    worst = s.worst_case(dict(b))
    assert await s.chat("canary", b) is None
    st = s.stats()["canary"]
    assert st["errors"] == 1 and st["refused"] == 0 and st["reserved"] == 0
    assert st["tokens_total"] == (worst if charged == "worst" else 0)


async def test_concurrency_bound_holds() -> None:
    inflight = peak = 0
    release = anyio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal inflight, peak
        inflight += 1
        peak = max(peak, inflight)
        await release.wait()
        inflight -= 1
        return httpx.Response(200, json={"choices": [], "usage": {"prompt_tokens": 1, "total_tokens": 2}})

    client = httpx.AsyncClient(base_url="http://u.test", transport=httpx.MockTransport(handler))
    s = BackgroundSampler(client, SETTINGS, concurrency=2)
    s.add_purpose("canary", 100_000)
    async with s.running():
        for i in range(6):
            assert s.spawn("canary", s.chat("canary", body(text=f"q{i}")))
        while s.purposes["canary"].requests < 2:
            await anyio.sleep(0)
        for _ in range(50):  # give any third request every chance to start
            await anyio.sleep(0)
        assert inflight == 2
        release.set()
        assert await s.wait_idle(10)
    assert peak == 2 and s.stats()["canary"]["requests"] == 6


async def test_spawn_is_bounded_closes_what_it_refuses_and_contains_failures() -> None:
    s = make(FakeUpstream(), queue_size=2)
    s.add_purpose("semantic", 1_000)
    gate = anyio.Event()
    ran: list[str] = []

    async def job(name: str) -> None:
        await gate.wait()
        ran.append(name)

    async def broken() -> None:
        raise RuntimeError("bug in a background task")

    assert not s.spawn("semantic", job("before start"))  # not running: refused, coroutine closed (no warning)
    async with s.running():
        assert s.spawn("semantic", job("a"))
        assert s.spawn("semantic", broken())
        assert not s.spawn("semantic", job("c"))  # two queued or running: full
        gate.set()
        assert await s.wait_idle(10)
        assert s.spawn("semantic", job("d"))
        assert await s.wait_idle(10)
    st = s.stats()["semantic"]
    assert ran == ["a", "d"] and st["dropped"] == 2 and st["errors"] == 1 and st["spawned"] == 3


def _app(purpose: bool, leader: bool | None) -> tuple[FastAPI, Any, CollectorRegistry]:
    app, reg = FastAPI(), CollectorRegistry()
    if leader is not None:
        app.state.is_leader = leader
    cm = install(app, SETTINGS, None, reg)
    if purpose:
        ensure_sampler(app, SETTINGS, reg).add_purpose("canary", 500)
    return app, cm, reg


@pytest.mark.parametrize("purpose, leader, runs", [(False, None, False), (True, None, True), (True, True, True),
                                                    (True, False, False)])
async def test_runs_only_with_a_purpose_and_only_in_the_leader(purpose: bool, leader: bool | None,
                                                               runs: bool) -> None:
    app, cm, reg = _app(purpose, leader)
    async with cm:
        assert app.state.sampler.running_now is runs
    assert app.state.sampler.running_now is False
    text = generate_latest(reg).decode()
    if purpose:
        assert 'entropy_proxy_background_tokens_total{purpose="canary"} 0.0' in text
        assert 'entropy_proxy_background_refused_total{purpose="canary"} 0.0' in text
        assert 'entropy_proxy_background_budget_tokens{purpose="canary"} 500.0' in text


async def test_metrics_count_tokens_and_refusals() -> None:
    app, _, reg = _app(True, None)
    s = app.state.sampler
    client = httpx.AsyncClient(base_url="http://u.test", transport=httpx.MockTransport(FakeUpstream(10).handler))
    s._client = lambda: client
    assert await s.chat("canary", body(max_tokens=20, n=2)) is not None  # 10 + 40 tokens
    assert await s.chat("canary", body(max_tokens=441)) is None  # 50 + 441 + 10 > 500
    text = generate_latest(reg).decode()
    assert 'entropy_proxy_background_tokens_total{purpose="canary"} 50.0' in text
    assert 'entropy_proxy_background_refused_total{purpose="canary"} 1.0' in text


async def test_post_charges_usage_or_the_reservation_and_never_raises() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/tokenize":
            return httpx.Response(200, json={"tokens": [1, 2, 3]})
        if request.url.path == "/broken":
            raise httpx.ReadTimeout("slow")
        return httpx.Response(200, json={"choices": [{}], "usage": {"prompt_tokens": 30, "total_tokens": 31}})

    client = httpx.AsyncClient(base_url="http://u.test", transport=httpx.MockTransport(handler))
    s = BackgroundSampler(client, SETTINGS)
    s.add_purpose("canary", 100)
    assert (await s.post("canary", "/tokenize", {"prompt": "x"}, 0)) == {"tokens": [1, 2, 3]}
    assert await s.post("canary", "/v1/completions", {"prompt": [1]}, 40) is not None
    assert await s.post("canary", "/broken", {}, 20) is None
    assert await s.post("canary", "/v1/completions", {"prompt": [1]}, 60) is None  # 31 + 20 + 60 > 100
    st = s.stats()["canary"]
    assert st["tokens_total"] == 31 + 20 and st["errors"] == 1 and st["refused"] == 1
    assert seen == ["/tokenize", "/v1/completions", "/broken"]
