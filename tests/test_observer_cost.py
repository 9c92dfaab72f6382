"""The observers' per-response cost kept bounded: the monitors' text-work cap counts what it skips, the audit writer
batches records into one transaction within its window and still writes at once on flush, a full batch or stop."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from proxy.audit.store import AuditStore
from proxy.audit.writer import AuditWriter
from proxy.hotpath.textbudget import TextBudget
from proxy.metrics import Metrics
from proxy.monitoring import Monitoring
from proxy.settings import load_settings
from tests.test_audit_store import make_obs

from .synthetic import formatted, observation, token_entropies


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_budget_fills_at_its_share_up_to_its_burst() -> None:
    clock = Clock()
    b = TextBudget(0.1, burst_s=2.0, clock=clock)
    assert b.allow() and b.credit == pytest.approx(0.2)
    b.charge(0.25)  # one expensive job may overdraw...
    assert not b.allow()  # ...and the next ones wait it out
    clock.t = 0.4  # 0.04 CPU-s back: still 0.01 short
    assert not b.allow()
    clock.t = 0.6
    assert b.allow()
    clock.t = 1_000.0  # an idle hour does not bank more than the burst
    assert b.allow() and b.credit == pytest.approx(0.2)
    with pytest.raises(ValueError):
        TextBudget(0.0)


def _mon(**kw: object) -> Monitoring:
    over = {"upstream": "http://u", "models": ["m"], "monitors.window": 200, **kw}
    return Monitoring(load_settings(over, environ={}))


def test_default_cap_and_off() -> None:
    assert _mon().text_budget is not None and _mon().text_budget.share == 0.05  # type: ignore[union-attr]
    assert _mon(**{"monitors.text_work_share": 0}).text_budget is None


async def test_worker_skips_beyond_its_share_and_counts_it() -> None:
    mon = _mon()
    mon.text_budget = TextBudget(1e-4, burst_s=2.0, clock=Clock())  # 0.2 ms of CPU, and time stands still
    rng = np.random.default_rng(1)
    n = 60
    async with mon.running():
        for i in range(n):
            mon.observe(observation(token_entropies(rng), formatted(rng, "prose"), prompt=f"p{i % 3}"))
        for _ in range(3_000):  # until the worker has taken every job (processed or skipped)
            if mon.processed + mon.skipped_total() == n:
                break
            await asyncio.sleep(0.01)
    assert mon.processed + mon.skipped_total() == n
    assert mon.processed >= 1 and mon.skipped == {"m": n - mon.processed}
    mm = mon.models["m"]
    assert mm.responses == n  # the request-path monitors saw every response
    assert len(mm.formats) == mon.processed  # the text monitors stand on the processed ones, and say so:
    assert mm.text["samples"]["format_entropy"] == mon.processed
    assert mon.status()["worker"]["skipped"] == n - mon.processed

    reg = CollectorRegistry()
    Metrics(load_settings({"upstream": "http://u", "models": ["m"]}, environ={}), reg, mon)
    text = generate_latest(reg).decode()
    assert f'entropy_proxy_monitor_text_skipped_total{{model="m"}} {float(n - mon.processed)}' in text


async def test_worker_without_cap_skips_nothing() -> None:
    mon = _mon(**{"monitors.text_work_share": 0})
    rng = np.random.default_rng(2)
    async with mon.running():
        for i in range(20):
            mon.observe(observation(token_entropies(rng), formatted(rng, "prose"), prompt=f"p{i}"))
        for _ in range(3_000):
            if mon.processed == 20:
                break
            await asyncio.sleep(0.01)
    assert mon.processed == 20 and mon.skipped_total() == 0



async def test_text_work_waits_its_grace_after_the_response_and_a_backlog_does_not(monkeypatch) -> None:
    """A response's text work starts TEXT_GRACE_S after it was queued (its GIL-holding C calls must not land on the
    next request's first milliseconds); a job already older than that runs at once."""
    import proxy.monitoring as monitoring

    waits: list[float] = []
    real_sleep = monitoring.time.sleep

    def sleep(s: float) -> None:
        waits.append(s)
        real_sleep(s)

    monkeypatch.setattr(monitoring.time, "sleep", sleep)
    mon = _mon(**{"monitors.text_work_share": 0})
    rng = np.random.default_rng(3)
    obs = [observation(token_entropies(rng), formatted(rng, "prose"), prompt=f"p{i}") for i in range(4)]
    for o in obs[:2]:  # queued before the worker runs, and then left to age past the grace
        mon.observe(o)
    await asyncio.sleep(monitoring.TEXT_GRACE_S * 3)
    async with mon.running():
        for _ in range(3_000):
            if mon.processed == 2:
                break
            await asyncio.sleep(0.001)
        assert waits == []  # the backlog ran at once
        mon.observe(obs[2])
        for _ in range(3_000):
            if mon.processed == 3:
                break
            await asyncio.sleep(0.001)
    assert mon.processed == 3
    assert len(waits) == 1 and 0 < waits[0] <= monitoring.TEXT_GRACE_S

class CountingStore(AuditStore):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.batches: list[int] = []

    async def insert_batch(self, rows: list[dict[str, Any]], probe_rows: Any = ()) -> Any:
        self.batches.append(len(rows))
        return await super().insert_batch(rows, probe_rows)


async def _until(pred: Any) -> None:
    for _ in range(3_000):
        if pred():
            return
        await asyncio.sleep(0.01)


async def test_audit_records_share_a_transaction_within_the_window(tmp_path: Path) -> None:
    store = CountingStore(f"sqlite:///{tmp_path}/a.db")
    w = AuditWriter(store, flush_interval_s=60.0)  # a window no test run outlasts
    await w.start()
    try:
        for i in range(5):  # responses finishing one after another, the loop free in between
            assert w.submit(make_obs(f"r-{i}"))
            await asyncio.sleep(0.05)
        assert store.batches == [] and w.written == 0  # still inside the window
        assert await w.flush(30)  # flush does not wait the window out
        assert store.batches == [5] and w.written == 5
    finally:
        await w.stop()


async def test_audit_full_batch_and_stop_do_not_wait_for_the_window(tmp_path: Path) -> None:
    store = CountingStore(f"sqlite:///{tmp_path}/b.db")
    w = AuditWriter(store, flush_interval_s=60.0, batch_size=4)
    await w.start()
    for i in range(4):
        w.submit(make_obs(f"f-{i}"))
    await _until(lambda: w.written == 4)
    assert store.batches == [4]
    w.submit(make_obs("last"))
    await asyncio.sleep(0.05)
    await asyncio.wait_for(w.stop(), 30)
    assert store.batches == [4, 1] and w.written == 5 and sum(w.dropped.values()) == 0


async def test_audit_without_window_writes_at_once(tmp_path: Path) -> None:
    store = CountingStore(f"sqlite:///{tmp_path}/c.db")
    w = AuditWriter(store, flush_interval_s=60.0)
    w.linger_s = 0.0
    await w.start()
    try:
        w.submit(make_obs("x"))
        await _until(lambda: w.written == 1)
        assert store.batches == [1]
    finally:
        await w.stop()


@pytest.mark.parametrize("seed", range(4))
def test_estimate_rows_is_estimate_positions_to_the_bit(seed: int) -> None:
    """The stream chunk's scalar shortcut gives exactly the numbers of the estimator's public entry point."""
    from monitors.entropy import estimate_positions, estimate_rows

    rng = np.random.default_rng(seed)
    for _ in range(300):
        t, w = int(rng.integers(1, 5)), int(rng.integers(1, 25))
        lp = np.sort(np.log(rng.dirichlet(np.full(w + 3, 0.3)))[:w])[::-1].reshape(1, w).repeat(t, 0)
        lp = lp + rng.normal(0, 0.01, lp.shape) * (rng.random() < 0.5)
        lp[rng.random(lp.shape) < 0.05] = -9999.0  # vLLM's probability-0 sentinel
        if rng.random() < 0.1:
            lp[0, 0] = 0.3  # a positive (logit-like) value: the general rules
        rows = lp.tolist()
        cols = [int(c) for c in rng.integers(0, w, t)]
        v = int(rng.choice([32, 49152, 151936]))
        got = estimate_rows(rows, v, cols)
        ref = estimate_positions(lp, v, sampled_col=np.array(cols))
        assert got is not None
        for g, r in zip(got, (ref.point, ref.lower, ref.upper, ref.tail_mass), strict=True):
            assert np.array_equal(np.array(g), r, equal_nan=True)
    assert estimate_rows([[-0.1] * 65], 100, [0]) is None  # wider than the scalar path takes
    assert estimate_rows([[-0.1] * 3] * 17, 100, [0] * 17) is None
    assert estimate_rows([[-0.1, -2.0], [-0.1]], 100, [0, 0]) is None
