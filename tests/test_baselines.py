"""Baselines per (model, revision) in the audit store: persisted, shared by replicas, kept over a restart, keyed
by revision, pinned through the CLI; the `unknown` state before evidence; the exported series.

Traffic is fed to the apps' observer hub (what the service does after annotating a response); the upstream is a
mock that only answers /v1/models with a `root` (the revision). Every store test runs on a SQLite file and on a
real PostgreSQL (tests/plugins/postgres.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import create_app
from proxy.audit.store import AuditStore
from proxy.baselines.model import Baseline
from proxy.baselines.store import BaselineStore
from proxy.cli import main as cli_main
from proxy.monitoring import Monitoring
from proxy.settings import load_settings

from .synthetic import formatted, observation, token_entropies

FORMATS = ("prose", "code", "list", "json", "latex")
# The text work runs uncapped here (monitors.text_work_share: 0): the baselines need every response's diversity
# readings, and a loaded machine must not turn them into counted skips (the cap is tested in test_observer_cost).
SMALL = {"monitors.window": 100, "monitors.baseline": 2_000, "monitors.baseline_responses": 30,
         "monitors.evidence_tokens": 1_000, "monitors.evidence_responses": 10, "audit.sample_rate": 0.0,
         "monitors.text_work_share": 0}


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/audit.db"
    return str(request.getfixturevalue("postgres_db_url"))


class Upstream:
    """Answers /v1/models with the model's current root (its revision)."""

    def __init__(self, root: str | None = "rev-1") -> None:
        self.root = root

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            entry: dict[str, Any] = {"id": "m", "object": "model"}
            if self.root is not None:
                entry["root"] = self.root
            return httpx.Response(200, json={"object": "list", "data": [entry]})
        return httpx.Response(404, json={"error": "not here"})


def _settings(url: str, **kw: Any) -> Any:
    return load_settings({"upstream": "http://upstream.test", "models": ["m"], "audit.url": url, **SMALL, **kw},
                         environ={})


@contextlib.asynccontextmanager
async def replica(url: str, upstream: Upstream, **kw: Any) -> AsyncIterator[FastAPI]:
    app = create_app(_settings(url, **kw), transport=httpx.MockTransport(upstream))
    async with app.router.lifespan_context(app):
        yield app


async def feed(app: FastAPI, rng: np.random.Generator, n: int, scale: float = 1.0) -> None:
    mon = app.state.monitoring
    want = mon.processed + n
    for _ in range(n):
        h = token_entropies(rng, 64, scale)
        p = f"prompt {int(rng.integers(0, 8))}"
        app.state.hub.observe(observation(h, formatted(rng, FORMATS[int(rng.integers(0, 5))]), prompt=p))
    await text_work_done(mon, want)


async def text_work_done(mon: Any, want: int) -> None:
    """Wait for the worker's text work (an event, not a clock); every job ends processed, dropped or skipped, so
    the bound only turns a lost job into a failure instead of a hang."""
    deadline = time.monotonic() + 120
    while mon.processed + mon.dropped + mon.skipped_total() < want:
        assert time.monotonic() < deadline, "text jobs went missing"
        await asyncio.sleep(0.005)


def series(app: FastAPI) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(generate_latest(app.state.registry).decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def status(app: FastAPI) -> dict[str, Any]:
    return app.state.monitoring.status()["models"]["m"]


async def test_auto_baseline_shared_by_two_replicas_and_kept_over_a_restart(store_url: str) -> None:
    rng = np.random.default_rng(1)
    up = Upstream("rev-1")
    async with replica(store_url, up) as a, replica(store_url, up) as b:
        assert app_revision(a) == "rev-1" and app_revision(b) == "rev-1"
        # Before any traffic: listed, unknown, its counters at zero.
        st = status(a)
        assert st["state"] == "unknown" and st["revision"] == "rev-1" and st["baseline"]["in_use"] is None
        assert any("warm-up 0/2000 tokens, 0/30 responses" in r for r in st["diagnosis"])
        s0 = series(a)
        assert ({"model": "m", "state": "unknown"}, 1.0) in s0["entropy_proxy_entropy_state"]
        assert s0["entropy_proxy_forking_checked_tokens_total"] == [({"model": "m"}, 0.0)]
        assert "entropy_proxy_baseline" not in s0 and "entropy_proxy_baseline_info" not in s0
        await feed(a, rng, 40)  # 40 x 64 tokens >= 2,000 and >= 30 responses: the warm-up is complete
        await a.state.baselines.sync()
        assert a.state.baselines.written == 1
        made = a.state.baselines.current("m")
        assert made is not None and made.source == "auto" and made.revision == "rev-1"
        # The other replica has seen no traffic, yet compares with the same baseline after its next poll.
        await b.state.baselines.sync()
        assert b.state.baselines.current("m") == made
        # Its own warm-up, on different traffic, does not replace the stored one (insert-if-absent).
        await feed(b, rng, 40, scale=0.4)
        await b.state.baselines.sync()
        assert b.state.baselines.written == 0 and b.state.baselines.current("m") == made
        s = series(b)
        assert ({"model": "m", "revision": "rev-1", "source": "auto"}, 1.0) in s["entropy_proxy_baseline_info"]
        p80 = [v for lab, v in s["entropy_proxy_baseline"] if lab == {"model": "m", "measure": "token_entropy_p80"}]
        assert p80 == [pytest.approx(made.token_entropy_p80)]
    # A restart: the baseline is there before the first response, and the state waits for evidence.
    async with replica(store_url, up) as again:
        assert again.state.baselines.current("m") == made
        st = status(again)
        assert st["state"] == "unknown" and st["baseline"]["in_use"]["source"] == "auto"
        assert any("window holds 0 tokens" in r for r in st["diagnosis"])
        await feed(again, rng, 30)
        st = status(again)
        assert st["state"] == "healthy", st["diagnosis"]
        assert st["evidence"]["window"]["tokens"] == 30 * 64 and st["evidence"]["missing"] == []
        rows = await _rows(store_url)
        assert [(r.model, r.revision, r.source) for r in rows] == [("m", "rev-1", "auto")]


def app_revision(app: FastAPI) -> str:
    return str(app.state.revisions.revision("m"))


async def _rows(url: str) -> list[Baseline]:
    store = AuditStore(url)
    await store.start()
    try:
        return await BaselineStore(store).all()
    finally:
        await store.close()


async def test_a_new_revision_gets_its_own_baseline(store_url: str) -> None:
    rng = np.random.default_rng(2)
    up = Upstream("rev-1")
    async with replica(store_url, up) as app:
        await feed(app, rng, 40)
        await app.state.baselines.sync()
        first = app.state.baselines.current("m")
        assert first is not None and first.revision == "rev-1"
        up.root = "rev-2"  # redeployed behind the same served name: a sharper revision
        await app.state.baselines.sync()
        assert app_revision(app) == "rev-2" and app.state.baselines.current("m") is None
        await feed(app, rng, 5, scale=0.5)
        st = status(app)
        assert st["state"] == "unknown" and st["revision"] == "rev-2"
        assert any("no baseline for revision rev-2" in r for r in st["diagnosis"])
        await feed(app, rng, 40, scale=0.5)
        await app.state.baselines.sync()
        second = app.state.baselines.current("m")
        assert second is not None and second.revision == "rev-2"
        assert second.token_entropy_mean < 0.7 * first.token_entropy_mean  # type: ignore[operator]
    rows = await _rows(store_url)
    assert sorted((r.revision, r.source) for r in rows) == [("rev-1", "auto"), ("rev-2", "auto")]


async def test_concurrent_first_writes_leave_one_baseline(store_url: str) -> None:
    store = AuditStore(store_url)
    await store.start()
    try:
        bs = BaselineStore(store)
        cands = [Baseline(model="m", revision="r", source="auto", created=float(i), tokens=100 + i, responses=10)
                 for i in range(6)]
        wrote = await asyncio.gather(*(bs.insert_if_absent(c) for c in cands))
        assert sum(wrote) == 1
        rows = await bs.all()
        assert len(rows) == 1 and rows[0].tokens == 100 + wrote.index(True)
    finally:
        await store.close()


def test_pin_list_show_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/audit.db"
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(f"upstream: http://upstream.test\naudit:\n  url: {url}\n")
    up = Upstream("rev-1")
    rng = np.random.default_rng(3)

    async def warm() -> dict[str, Any]:
        async with replica(url, up) as app:
            await feed(app, rng, 40)
            await app.state.baselines.sync()
            return app.state.monitoring.baseline_snapshot()  # what `baseline save` writes

    snapshot = asyncio.run(warm())
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(snapshot))

    assert cli_main(["baseline", "list", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "m" in out and "rev-1" in out and "auto" in out
    assert cli_main(["baseline", "pin", "--config", str(cfg), "--model", "m"]) == 0
    assert "pinned" in capsys.readouterr().out
    assert cli_main(["baseline", "show", "--config", str(cfg), "--model", "m", "--revision", "rev-1"]) == 0
    out = capsys.readouterr().out
    assert "pinned" in out and "token_entropy_p80" in out
    # A saved file pinned for another revision (deploying rev-2 with the old revision's baseline on purpose).
    assert cli_main(["baseline", "pin", "--config", str(cfg), "--model", "m", "--revision", "rev-2",
                     "--file", str(saved)]) == 0
    capsys.readouterr()
    assert cli_main(["baseline", "pin", "--config", str(cfg), "--model", "nope"]) == 1
    assert "no automatic baseline" in capsys.readouterr().err
    # the old file commands still work
    assert cli_main(["baseline", "show", str(saved)]) == 0
    assert "model m:" in capsys.readouterr().out
    rows = asyncio.run(_rows(url))
    assert sorted((r.revision, r.source) for r in rows) == [("rev-1", "auto"), ("rev-1", "pinned"),
                                                            ("rev-2", "pinned")]

    async def after_pin() -> None:
        up.root = "rev-2"
        async with replica(url, up) as app:  # a pinned baseline wins over auto, and reaches a starting replica
            b = app.state.baselines.current("m")
            assert b is not None and (b.revision, b.source) == ("rev-2", "pinned")
            s = series(app)
            assert ({"model": "m", "revision": "rev-2", "source": "pinned"}, 1.0) in s["entropy_proxy_baseline_info"]

    asyncio.run(after_pin())


async def test_pin_reaches_a_running_replica_at_its_next_poll(store_url: str) -> None:
    rng = np.random.default_rng(4)
    up = Upstream("rev-1")
    async with replica(store_url, up) as a, replica(store_url, up) as b:
        await feed(a, rng, 40)
        await a.state.baselines.sync()
        await b.state.baselines.sync()
        auto = b.state.baselines.current("m")
        assert auto is not None
        pinned = Baseline.from_dict({**auto.to_dict(), "token_entropy_p80": 0.123, "forking_threshold": 0.123})
        await a.state.baselines.store.pin(pinned)
        await b.state.baselines.sync()
        now = b.state.baselines.current("m")
        assert now is not None and now.source == "pinned" and now.forking_threshold == 0.123
        assert status(b)["forking_threshold"] == 0.123


def _mon(**kw: Any) -> Monitoring:
    return Monitoring(load_settings({"upstream": "http://u", "models": ["m"], **SMALL, **kw}, environ={}))


def _feed_mon(mon: Monitoring, rng: np.random.Generator, n: int, **kw: Any) -> None:
    for _ in range(n):
        thr = mon.current_forking_threshold("m")  # what the annotator puts in the summary (adaptive: rolling p80)
        mon.observe(observation(token_entropies(rng, 64, **kw), formatted(rng, "prose"), prompt="p", threshold=thr))
        mon.process_pending()


def test_unknown_until_baseline_and_window_volume() -> None:
    mon = _mon()
    rng = np.random.default_rng(5)
    _feed_mon(mon, rng, 1)
    st = mon.status()["models"]["m"]
    assert st["state"] == "unknown"
    assert any("no baseline for revision unknown yet: warm-up 64/2000 tokens, 1/30 responses" in r
               for r in st["diagnosis"])
    assert st["evidence"]["window"]["tokens"] == 64 and st["evidence"]["window"]["responses"] == 1
    _feed_mon(mon, rng, 29)  # 1,920 tokens: the warm-up is not complete yet
    assert mon.models["m"].state() == "unknown"
    _feed_mon(mon, rng, 2)
    st = mon.status()["models"]["m"]
    assert st["state"] == "healthy" and st["baseline"]["in_use"]["tokens"] == 32 * 64
    assert st["evidence"]["warmup"] is None and st["evidence"]["forking_fixed"]["threshold"] > 0


def test_unknown_on_too_little_window_volume_even_with_a_baseline() -> None:
    mon = _mon(**{"monitors.window": 20, "monitors.evidence_tokens": 1_000})
    rng = np.random.default_rng(6)
    _feed_mon(mon, rng, 40)
    assert mon.models["m"].live.baseline is not None
    assert mon.models["m"].state() == "healthy"  # the window: 20 responses x 64 tokens
    for _ in range(20):  # a quiet spell of short answers: the window of 20 responses holds 160 tokens
        mon.observe(observation(token_entropies(rng, 8), "short", prompt="p"))
        mon.process_pending()
    d = mon.models["m"].diagnosis()
    assert d.state == "unknown" and any("window holds 160 tokens (< 1000)" in r for r in d.reasons)


def test_forking_fraction_at_the_fixed_threshold_falls_with_a_collapse() -> None:
    """The rolling p80 follows a collapse and keeps ~20 % of tokens above it; the baseline's fixed one does not."""
    mon = _mon(**{"monitors.window": 200})
    rng = np.random.default_rng(7)
    _feed_mon(mon, rng, 60)
    live = mon.models["m"].live
    assert live.baseline is not None and live.baseline.forking_fraction == pytest.approx(0.2, abs=0.02)
    before = (live.above, live.checked)
    _feed_mon(mon, rng, 700, fork_scale=0.3)  # forking tokens lose most of their entropy; > 40,000 tokens
    above, checked = live.above - before[0], live.checked - before[1]
    assert above / checked < 0.12
    st = mon.status()["models"]["m"]
    assert st["forking"]["fraction"] < 0.12  # the monitors' own reading uses the fixed cut-off too
    rolling = mon.models["m"].quantile.quantile(0.8)
    h = np.concatenate([token_entropies(rng, 64, fork_scale=0.3) for _ in range(200)])
    assert float(np.mean(h > rolling)) == pytest.approx(0.2, abs=0.03)  # what the adaptive cut-off would say


def test_metric_series_and_labels() -> None:
    from prometheus_client import CollectorRegistry

    from proxy import metrics as metrics_mod
    from proxy.observe import ObserverHub

    s = load_settings({"upstream": "http://u", "models": {"m": {"revision": "r7"}, "n": None}, **SMALL,
                       "monitors.baseline_responses": 50}, environ={})  # format entropy needs 50 responses
    app, hub, reg = FastAPI(), ObserverHub(), CollectorRegistry()
    metrics_mod.install(app, s, hub, reg)
    app.state.registry = reg
    rng = np.random.default_rng(8)
    for i in range(60):
        hub.observe(observation(token_entropies(rng, 64), formatted(rng, FORMATS[i % 5]), prompt=f"p{i % 4}"))
        app.state.monitoring.process_pending()
    hub.observe(observation(token_entropies(rng, 64), "x", model="n"))
    out = series(app)
    measures = {lab["measure"] for lab, _ in out["entropy_proxy_baseline"] if lab["model"] == "m"}
    assert measures == {"token_entropy_mean", "token_entropy_p80", "forking_fraction", "response_entropy_mean",
                        "distinct_2", "chrf_distance", "format_entropy"}  # distinct-2 over the warm-up's 50
    assert not [lab for lab, _ in out["entropy_proxy_baseline"] if lab["model"] == "n"]  # none yet: absent
    assert out["entropy_proxy_baseline_info"] == [({"model": "m", "revision": "r7", "source": "auto"}, 1.0)]
    samples = {lab["measure"]: v for lab, v in out["entropy_proxy_diversity_samples"] if lab["model"] == "m"}
    assert samples["format_entropy"] == 60 and samples["distinct_2"] == 50  # its window: the warm-up's responses
    assert samples["chrf_distance"] == 4 * 6  # 4 prompts, groups of 6
    checked = dict((lab["model"], v) for lab, v in out["entropy_proxy_forking_checked_tokens_total"])
    above = dict((lab["model"], v) for lab, v in out["entropy_proxy_forking_tokens_total"])
    live = app.state.monitoring.models["m"].live
    assert checked == {"m": live.checked, "n": 0.0} and above == {"m": live.above, "n": 0.0}
    assert 0 < above["m"] < checked["m"] == (60 - live.baseline.responses) * 64
    states = {lab["state"]: v for lab, v in out["entropy_proxy_entropy_state"] if lab["model"] == "n"}
    assert states["unknown"] == 1.0 and states["healthy"] == 0.0


async def test_a_store_outage_uses_the_warm_up_locally_and_writes_it_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/audit.db"
    real = BaselineStore.insert_if_absent

    async def down(self: BaselineStore, b: Baseline) -> bool:
        raise ConnectionError("store down")

    async with replica(url, Upstream()) as app:
        mgr = app.state.baselines
        monkeypatch.setattr(BaselineStore, "insert_if_absent", down)
        await feed(app, np.random.default_rng(9), 40)
        await mgr.sync()
        made = mgr.current("m")
        assert made is not None and made.source == "auto"  # this replica compares with its own meanwhile
        assert mgr.status()["pending_writes"] == 1 and "store down" in mgr.last_error
        assert await _rows(url) == []
        monkeypatch.setattr(BaselineStore, "insert_if_absent", real)
        await mgr.sync()
        assert mgr.status()["pending_writes"] == 0 and mgr.last_error is None and mgr.written == 1
        rows = await _rows(url)
        assert len(rows) == 1 and rows[0].created == made.created and mgr.current("m") == rows[0]


def test_an_old_baseline_file_pins_with_measures_read_off_its_histogram() -> None:
    from monitors.drift import ENTROPY_EDGES
    from proxy.baselines.model import BaselineBuilder

    rng = np.random.default_rng(10)
    builder = BaselineBuilder("m", "r", 5_000, 10)
    for _ in range(100):
        builder.add(token_entropies(rng, 64))
    exact = builder.finish({"format_entropy": 1.2}, {"format_entropy": 100})
    old_entry = {"drift": exact.drift_dict(), "collapse": exact.collapse_dict()}  # what files held before
    approx = Baseline.from_file_entry("m", "r2", "pinned", old_entry)
    assert approx.note and "approximate" in approx.note
    b = int(np.searchsorted(ENTROPY_EDGES, exact.token_entropy_p80)) - 1
    assert ENTROPY_EDGES[b] <= approx.token_entropy_p80 <= ENTROPY_EDGES[b + 1]  # type: ignore[operator]
    assert approx.forking_fraction == pytest.approx(0.2, abs=0.01)
    assert approx.token_entropy_mean == pytest.approx(exact.token_entropy_mean, rel=0.25)
    assert approx.response_entropy_mean == exact.response_entropy_mean and approx.diversity == {"format_entropy": 1.2}
    full = Baseline.from_file_entry("m", "r2", "pinned", {**old_entry, "baseline": exact.to_dict()})
    assert full.token_entropy_p80 == exact.token_entropy_p80 and full.revision == "r2" and full.note is None


async def test_a_replica_restarted_during_a_bad_rollout_compares_with_the_stored_baseline(tmp_path: Path) -> None:
    """Before baselines were stored, a replica restarted into collapsed traffic learnt it as normal (`healthy`)."""
    url = f"sqlite:///{tmp_path}/audit.db"
    rng = np.random.default_rng(11)
    async with replica(url, Upstream()) as a:
        await feed(a, rng, 40)
        await a.state.baselines.sync()
        assert a.state.baselines.current("m") is not None
    async with replica(url, Upstream()) as b:
        mon = b.state.monitoring
        for _ in range(120):  # collapsed: entropy at 40 %, one answer to everything
            h = token_entropies(rng, 64, 0.4)
            b.state.hub.observe(observation(h, "The answer is fixed.", prompt=f"prompt {int(rng.integers(0, 8))}"))
        await text_work_done(mon, 120)
        st = status(b)
        assert st["baseline"]["in_use"]["source"] == "auto"
        assert st["state"] == "collapse", st["diagnosis"]


@pytest.mark.parametrize("warmup", [100, 400])
def test_an_auto_baseline_from_a_realistic_warm_up_holds_every_diversity_measure(warmup: int) -> None:
    """A warm-up the size the alert-quality benchmark uses (100 responses, the rules' diversity guard) and the
    default (400): the auto baseline stores distinct-2, chrF distance and format entropy, each over the same
    responses as the live reading it is compared with, and exports all three as gauges."""
    from prometheus_client import CollectorRegistry

    from proxy import metrics as metrics_mod
    from proxy.observe import ObserverHub

    s = load_settings({"upstream": "http://u", "models": {"m": {"revision": "r1"}}, **SMALL,
                       "monitors.window": 200, "monitors.baseline": 64 * warmup // 2,
                       "monitors.baseline_responses": warmup}, environ={})
    app, hub, reg = FastAPI(), ObserverHub(), CollectorRegistry()
    metrics_mod.install(app, s, hub, reg)
    app.state.registry = reg
    rng = np.random.default_rng(11)
    mm = None
    for i in range(warmup):
        fmt = FORMATS[int(rng.choice(5, p=[0.5, 0.2, 0.15, 0.1, 0.05]))]
        hub.observe(observation(token_entropies(rng, 64), formatted(rng, fmt), prompt=f"question {i % 12}"))
        app.state.monitoring.process_pending()
        mm = app.state.monitoring.models["m"]
        assert i == warmup - 1 or mm.live.baseline is None  # the warm-up ends with its last response
    assert mm is not None and mm.live.baseline is not None and mm.live.baseline.source == "auto"
    b = mm.live.baseline
    assert set(b.diversity) == {"distinct_2", "chrf_distance", "format_entropy"}
    window = min(warmup, 200)  # distinct-2 over a fixed number of responses: the live reading's window
    assert b.diversity_samples["distinct_2"] == window
    assert b.diversity["distinct_2"] == pytest.approx(mm.text["comparable"]["distinct_2"])
    assert 0.2 < b.diversity["distinct_2"] < 1.0 and 0.0 < b.diversity["chrf_distance"] < 1.0
    assert b.diversity["format_entropy"] > 0.5
    out = series(app)
    gauges = {lab["measure"]: v for lab, v in out["entropy_proxy_baseline"] if lab["model"] == "m"}
    for m in ("distinct_2", "chrf_distance", "format_entropy"):
        assert gauges[m] == pytest.approx(b.diversity[m])
    samples = {lab["measure"]: v for lab, v in out["entropy_proxy_diversity_samples"] if lab["model"] == "m"}
    assert samples["distinct_2"] == window  # what the rules' samples guard reads is what the baseline holds


def test_a_baseline_saved_from_a_short_staging_run_pins_distinct_2_over_its_own_window() -> None:
    """A staging run's warm-up of 100 responses saves distinct-2; a production replica (warm-up 400) that loads the
    file measures its live distinct-2 over the same 100 responses, not 200 (distinct-n falls as its window grows,
    so 200 against 100 would read as a diversity fall)."""
    rng = np.random.default_rng(12)
    staging = _mon(**{"monitors.window": 200, "monitors.baseline": 3_200, "monitors.baseline_responses": 100})
    for i in range(100):
        fmt = FORMATS[i % 5]
        staging.observe(observation(token_entropies(rng, 64), formatted(rng, fmt), prompt=f"question {i % 12}"))
        staging.process_pending()
    saved = json.loads(json.dumps(staging.baseline_snapshot()))
    entry = Baseline.from_file_entry("m", "r1", "file", saved["models"]["m"])
    assert set(entry.diversity) == {"distinct_2", "chrf_distance", "format_entropy"}
    assert entry.diversity_samples["distinct_2"] == 100
    prod = _mon(**{"monitors.window": 400, "monitors.baseline_responses": 400})
    prod.load_baseline(saved)
    mm = prod.models["m"]
    assert mm.live.baseline is not None and mm.live.baseline.diversity["distinct_2"] == entry.diversity["distinct_2"]
    for i in range(150):
        prod.observe(observation(token_entropies(rng, 64), formatted(rng, FORMATS[i % 5]), prompt=f"q {i % 12}"))
        prod.process_pending()
    assert mm.text["samples"]["distinct_2"] == 100 and mm.text["comparable"]["distinct_2"] is not None
