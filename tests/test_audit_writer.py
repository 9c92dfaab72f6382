"""The writer never blocks the request path: sampling, a dead or slow store, counted drops, flush on shutdown."""

from __future__ import annotations

import asyncio
import inspect
import random
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.responses import JSONResponse

from proxy.audit import install
from proxy.audit.store import AuditStore
from proxy.audit.writer import AuditWriter
from proxy.observe import ObserverHub
from proxy.settings import load_settings
from tests.test_audit_store import make_obs


class FakeMetrics:
    def __init__(self) -> None:
        self.calls: Counter[tuple[str, Any]] = Counter()

    """Records calls with the signatures of proxy.metrics.Metrics."""

    def audit_dropped(self, reason: str, n: int = 1) -> None:
        self.calls[("audit_dropped", reason)] += n

    def feedback(self, model: str, correct: bool, *, confident: bool = False, mean_entropy: float | None = None,
                 score: float | None = None, key: Any = None) -> None:
        self.calls[("feedback", (model, correct))] += 1
        if confident and not correct:
            self.calls[("confident_wrong", model)] += 1

    def set_calibration(self, model: str, measure: str, value: float) -> None:
        self.calls[("calibration", (model, measure, round(value, 6)))] += 1


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/audit.db"


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A TCP port that completes the handshake (backlog) but never answers: a hung database."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield s.getsockname()[1]
    s.close()


async def test_sampling_rules(sqlite_url: str) -> None:
    w = AuditWriter(AuditStore(sqlite_url), sample_rate=0.0)
    await w.start()
    try:
        w.observe(make_obs("conf", flags=("confident",)))
        w.observe(make_obs("unc", flags=("uncertain", "forking_heavy")))
        w.observe(make_obs("plain", flags=("forking_heavy",)))
        w.observe(make_obs("none", flags=()))
        assert await w.flush(5)
        assert {r["response_id"] for r in await w.store.recent()} == {"conf", "unc"}
    finally:
        await w.stop()


async def test_sample_rate_share(sqlite_url: str) -> None:
    w = AuditWriter(AuditStore(sqlite_url), sample_rate=0.25, rng=random.Random(7), queue_size=5000)
    await w.start()
    try:
        for i in range(800):
            w.observe(make_obs(f"p-{i}", flags=()))
        assert await w.flush(20)
        n = await w.store.count()
    finally:
        await w.stop()
    assert 150 <= n <= 250  # 0.25 * 800 = 200, binomial sd ~12


async def test_flush_on_shutdown(sqlite_url: str) -> None:
    w = AuditWriter(AuditStore(sqlite_url), batch_size=50, flush_interval_s=5.0)
    await w.start()
    for i in range(500):
        assert w.submit(make_obs(f"q-{i}"))
    await w.stop()  # no flush() first: stop must write what is queued
    s = AuditStore(sqlite_url)
    await s.start()
    assert await s.count() == 500
    await s.close()
    assert sum(w.dropped.values()) == 0 and w.written == 500


def _submit_all(w: AuditWriter, n: int) -> int:
    """Submit n observations back to back from the event loop's thread; returns how many were queued.

    ``submit`` is a plain function: it cannot hand the loop to the store, so every call returns whatever the
    store is doing (a store it waited for would hang this test). Its speed is measured in
    ``bench/audit_throughput.py`` (mean and worst microseconds), not asserted here."""
    assert not inspect.iscoroutinefunction(w.submit)
    return sum(w.submit(make_obs(f"x-{i}")) for i in range(n))


async def _until(what: str, predicate: Any, timeout: float = 30.0) -> None:
    """Wait for an event the writer's task produces (the timeout bounds a hang, it is not the claim)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("kind", ["dead", "hung"])
async def test_store_down_never_blocks_and_counts(kind: str, tmp_path: Path, blackhole: int) -> None:
    url = (
        f"postgresql://postgres:@/postgres?host={tmp_path}/no-server-here"
        if kind == "dead"
        else f"postgresql://postgres:pw@127.0.0.1:{blackhole}/postgres"
    )
    metrics = FakeMetrics()
    w = AuditWriter(AuditStore(url, pool_timeout_s=0.3), queue_size=100, batch_size=20, write_timeout_s=0.3,
                    shutdown_timeout_s=1.0, metrics=lambda: metrics)
    await w.start()  # the store does not answer: start-up logs it and goes on (bounded by pool_timeout_s)
    assert not w.store_ok
    queued = _submit_all(w, 1000)
    assert queued <= 120 and w.dropped["queue_full"] == 1000 - queued
    await _until("a failed batch", lambda: w.dropped["store_error"] >= 20)  # the writer tries, fails, drops
    await w.stop()
    assert w.written == 0
    total = sum(w.dropped.values())
    assert total == 1000  # every record is accounted for: queue_full + store_error + shutdown
    assert sum(v for (name, _), v in metrics.calls.items() if name == "audit_dropped") == 1000


async def test_blocked_store_never_blocks_submit(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's write is held until the test lets it go: every submit meanwhile returns, the queue fills to its
    bound and the rest is counted as dropped; once released, what was queued is written."""
    store = AuditStore(sqlite_url)
    real_insert = store.insert_batch
    entered, release = asyncio.Event(), asyncio.Event()
    calls = 0

    async def held_insert(rows: list[dict[str, Any]], probe_rows: Any = ()) -> None:
        nonlocal calls
        calls += 1
        entered.set()
        await release.wait()
        await real_insert(rows, probe_rows)

    monkeypatch.setattr(store, "insert_batch", held_insert)
    w = AuditWriter(store, queue_size=50, batch_size=10)
    await w.start()
    assert w.submit(make_obs("first"))
    await asyncio.wait_for(entered.wait(), 30)  # the writer's task is inside the store, held
    queued = _submit_all(w, 200)
    assert not release.is_set() and calls == 1  # all 200 calls returned while the store held its first write
    assert queued == 50 and w.dropped["queue_full"] == 150
    release.set()
    assert await w.flush(30)
    await w.stop()
    assert w.written == 51 and calls == 1 + 50 // 10


async def test_a_batch_in_flight_when_shutdown_gives_up_is_counted(sqlite_url: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    store = AuditStore(sqlite_url)
    entered = asyncio.Event()

    async def never_returns(rows: list[dict[str, Any]], probe_rows: Any = ()) -> None:
        entered.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(store, "insert_batch", never_returns)
    w = AuditWriter(store, queue_size=50, batch_size=10, write_timeout_s=3600, shutdown_timeout_s=0.05)
    await w.start()
    assert _submit_all(w, 5) == 5
    await asyncio.wait_for(entered.wait(), 30)
    assert _submit_all(w, 3) == 3  # queued behind the held batch
    await w.stop()
    assert w.written == 0 and w.dropped["shutdown"] == 8 and sum(w.dropped.values()) == 8


async def test_proxy_keeps_answering_with_store_down(tmp_path: Path) -> None:
    settings = load_settings(
        {"upstream": "http://127.0.0.1:9", "audit.url": f"postgresql://postgres:@/postgres?host={tmp_path}/gone",
         "audit.queue_size": 10},
        environ={},
    )
    app = FastAPI()
    app.state.metrics = FakeMetrics()
    hub = ObserverHub()
    cm = install(app, settings, hub, None)
    assert cm is not None
    counter = iter(range(10**6))

    @app.post("/v1/chat/completions")
    async def fake_chat() -> JSONResponse:  # stands in for the real service: annotate, observe, answer
        rid = f"chatcmpl-{next(counter)}"
        hub.observe(make_obs(rid, flags=("confident",)))
        return JSONResponse({"id": rid}, headers={"X-Entropy-Request-Id": rid})

    async with cm:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            answers = [await client.post("/v1/chat/completions", json={}) for _ in range(50)]
            assert all(r.status_code == 200 for r in answers)
            fb = await client.post("/v1/feedback", json={"id": "chatcmpl-0", "correct": False})
            assert fb.status_code == 503  # the store is down: said so, in the OpenAI error shape
            assert fb.json()["error"]["code"] == "audit_store_unavailable"
    writer = app.state.audit_writer
    assert writer.dropped["queue_full"] >= 40
    assert sum(writer.dropped.values()) == 50


def test_unsampled_memory_is_bounded(sqlite_url: str) -> None:
    w = AuditWriter(AuditStore(sqlite_url), sample_rate=0.0, recent_size=10, recent_tokens=30)
    for i in range(20):
        w.observe(make_obs(f"u-{i}", flags=()))  # 7 tokens each: the token budget keeps 4
    assert list(w._recent) == [f"u-{i}" for i in range(16, 20)]
    assert w._recent_tok == 28
    assert w.promote("u-19") and not w.promote("u-3")
    assert w._recent_tok == 21


# -- the row encoding: the vectorised alternatives give what the plain per-token lists give ---------------------

_LOGPROB = st.one_of(
    st.floats(min_value=-60.0, max_value=0.0), st.just(-9999.0), st.just(0.0), st.just(float("nan")),
    st.floats(min_value=-1e-9, max_value=0.0), st.floats(min_value=-1e-300, max_value=0.0),
)


def _alternatives_reference(alts: list[list[tuple[str, float]]], store_text: bool) -> tuple[str, str | None]:
    """The rule written out token by token: probability exp(lp) (0 for vLLM's -9999 and for NaN), 4 decimals."""
    import math

    import orjson

    def prob(lp: float) -> float:
        if lp != lp or lp <= -9999.0:
            return 0.0
        return float(np.round(math.exp(min(lp, 0.0)), 4))

    probs = orjson.dumps([[prob(lp) for _, lp in a] for a in alts]).decode()
    tokens = orjson.dumps([[t for t, _ in a] for a in alts]).decode() if store_text else None
    return probs, tokens


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(min_value=0, max_value=6),
    rows=st.lists(st.lists(st.tuples(st.text(max_size=3), _LOGPROB), max_size=6), max_size=40),
    ragged=st.booleans(),
    store_text=st.booleans(),
)
def test_alternatives_encoding_matches_the_per_token_rule(width, rows, ragged, store_text):
    from proxy.audit.writer import _alternatives

    alts = rows if ragged else [(r * (width + 1))[:width] if r else [("x", -1.0)] * width for r in rows]
    assert _alternatives(alts, store_text) == _alternatives_reference(alts, store_text)
