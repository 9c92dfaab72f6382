"""The audit trail and the recognition probe: ``reference`` in feedback, probe results as rows, the state on the page.

Three tiers: the feedback route with a stand-in probe (what it hands over, and when); the sink that the audit
lifespan registers on a real :class:`proxy.probe.Probe`, against SQLite and a real PostgreSQL; and the whole proxy
(``create_app`` with metrics, audit and probe, in that order) over the fake vLLM of ``tests/test_recognition.py``,
whose re-scoring reproduces generation-time entropy exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

import proxy.probe
from proxy.audit import install
from proxy.audit.writer import AuditWriter
from proxy.cli_audit import add_parser
from proxy.observe import ObserverHub
from proxy.settings import load_settings
from tests.plugins.recorded import proxy_client
from tests.test_audit_store import make_obs, probe_result
from tests.test_recognition import CHAT, MODEL, FakeVLLM

REFERENCE = "the quick brown fox jumps over the lazy dog"


class StandInProbe:
    """Records ``submit_reference`` calls; ``answer`` is what it returns (or raises)."""

    def __init__(self, answer: bool | Exception = True) -> None:
        self.answer = answer
        self.calls: list[tuple[str, str]] = []
        self.result_sinks: list[Any] = []

    def submit_reference(self, request_id: str, text: str) -> bool:
        self.calls.append((request_id, text))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def _settings(url: str, **kw: Any) -> Any:
    return load_settings({"upstream": "http://127.0.0.1:9", "audit.url": url, "audit.sample_rate": 0.0, **kw},
                         environ={})


async def _audit_app(url: str, probe: Any = None) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI, ObserverHub]]:
    app, hub = FastAPI(), ObserverHub()
    cm = install(app, _settings(url), hub, None)
    assert cm is not None
    if probe is not None:
        app.state.probe = probe  # after the audit install, as proxy.probe is: looked up later, not at install
    async with cm:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            yield client, app, hub


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/audit.db"
    return str(request.getfixturevalue("postgres_db_url"))


# -- the route ---------------------------------------------------------------------------------------------------------
async def test_reference_goes_to_the_probe_after_the_label_is_stored(tmp_path: Path) -> None:
    probe = StandInProbe()
    async for client, _, hub in _audit_app(f"sqlite:///{tmp_path}/a.db", probe):
        hub.observe(make_obs("chatcmpl-r", flags=("confident",)))
        r = await client.post("/v1/feedback", json={"id": "chatcmpl-r", "correct": True, "reference": REFERENCE})
        assert r.status_code == 200, r.text
        assert r.json()["reference_queued"] is True and probe.calls == [("chatcmpl-r", REFERENCE)]
        # Without a reference (or with null) nothing reaches the probe and the answer has no such field.
        for body in ({"id": "chatcmpl-r", "correct": False}, {"id": "chatcmpl-r", "correct": False, "reference": None}):
            r = await client.post("/v1/feedback", json=body)
            assert r.status_code == 200 and "reference_queued" not in r.json()
        # An unknown id is a 404 before the probe hears of it; a malformed reference a 400.
        assert (await client.post("/v1/feedback", json={"id": "nope", "correct": True,
                                                         "reference": REFERENCE})).status_code == 404
        assert (await client.post("/v1/feedback", json={"id": "chatcmpl-r", "correct": True,
                                                         "reference": ""})).status_code == 400
        assert probe.calls == [("chatcmpl-r", REFERENCE)]
        # The largest accepted reference, in multi-byte characters (64 KiB of UTF-8), written with JSON escapes.
        big = "\u20ac" * (64 * 1024 // 3)
        r = await client.post("/v1/feedback", content=json.dumps({"id": "chatcmpl-r", "correct": True,
                                                                  "reference": big}).encode())
        assert r.status_code == 200, r.text[:200]
        assert probe.calls[-1] == ("chatcmpl-r", big)


@pytest.mark.parametrize("answer", [False, RuntimeError("probe broke")])
async def test_reference_not_queued_still_stores_the_label(tmp_path: Path, answer: bool | Exception) -> None:
    probe = StandInProbe(answer)
    async for client, app, hub in _audit_app(f"sqlite:///{tmp_path}/a.db", probe):
        hub.observe(make_obs("chatcmpl-n", flags=("confident",)))
        r = await client.post("/v1/feedback", json={"id": "chatcmpl-n", "correct": False, "reference": REFERENCE})
        assert r.status_code == 200 and r.json()["reference_queued"] is False
        (row,) = await app.state.audit_writer.store.get("chatcmpl-n")
        assert row["correct"] is False


async def test_reference_without_a_probe(tmp_path: Path) -> None:
    async for client, _, hub in _audit_app(f"sqlite:///{tmp_path}/a.db"):
        hub.observe(make_obs("chatcmpl-p", flags=("confident",)))
        r = await client.post("/v1/feedback", json={"id": "chatcmpl-p", "correct": True, "reference": REFERENCE})
        assert r.status_code == 200 and r.json()["reference_queued"] is False


class StandInMonitoring:
    def __init__(self, models: dict[str, Any] | Exception) -> None:
        self.models = models

    def status(self) -> dict[str, Any]:
        if isinstance(self.models, Exception):
            raise self.models
        return {"models": self.models, "worker": {}}


async def test_page_shows_each_models_state_and_evidence(tmp_path: Path) -> None:
    async for client, app, hub in _audit_app(f"sqlite:///{tmp_path}/a.db"):
        hub.observe(make_obs("chatcmpl-s", flags=("confident",), model="m1"))
        app.state.monitoring = StandInMonitoring({
            "m1": {"state": "collapse", "diagnosis": ["entropy down: collapse score 0.7 >= 0.5",
                                                      "diversity fell <by> 0.3"],
                   "recognition_ratio": 0.91, "recognition_rise": 1.02},
            "m2": {"state": "recognition", "diagnosis": ["ratio rose 1.4x over its baseline"],
                   "recognition_ratio": 1.3, "recognition_rise": 1.4},
        })
        page = (await client.get("/audit")).text
        section = page.split('id="state"')[1].split('id="confident-wrong"')[0]
        assert re.findall(r'data-model="([^"]+)" data-state="([^"]+)"', section) == [("m1", "collapse"),
                                                                                   ("m2", "recognition")]
        assert 'class="state state-collapse"' in section
        assert "<li>diversity fell &lt;by&gt; 0.3</li>" in section  # escaped, never markup
        assert "recognition ratio 0.910 · rise 1.020" in section
        only = (await client.get("/audit", params={"model": "m2"})).text.split('id="state"')[1]
        assert 'data-model="m2"' in only and 'data-model="m1"' not in only.split('id="confident-wrong"')[0]
        # Monitors failing or absent: the page still renders the store.
        app.state.monitoring = StandInMonitoring(RuntimeError("monitors broke"))
        r = await client.get("/audit")
        assert r.status_code == 200 and "No live state" in r.text and 'data-id="chatcmpl-s"' in r.text


# -- the sink ----------------------------------------------------------------------------------------------------------
async def test_probe_sink_writes_rows_and_records_the_probed_response(store_url: str) -> None:
    settings = _settings(store_url)
    app, hub = FastAPI(), ObserverHub()
    cm = install(app, settings, hub, None)
    proxy.probe.install(app, settings, hub, None)  # the order of proxy.app.COMPONENTS: audit first, then the probe
    probe: proxy.probe.Probe = app.state.probe
    assert cm is not None and probe.result_sinks == []  # nothing to register on at install time
    async with cm as writer:
        assert probe.result_sinks == [writer.submit_probe]
        hub.observe(make_obs("chatcmpl-quiet", flags=()))  # audit.sample_rate 0: remembered, not recorded
        hub.observe(make_obs("chatcmpl-flagged", flags=("uncertain",)))
        for result in (probe_result("chatcmpl-quiet", ratio=None), probe_result("chatcmpl-quiet", ratio=0.7),
                       probe_result("chatcmpl-flagged", ratio=1.2, aligned=False)):
            for sink in probe.result_sinks:  # as Probe._run hands over each result
                sink(result)
        assert await writer.flush(10)
        store = writer.store
        got = await store.probe_results_for(["chatcmpl-quiet", "chatcmpl-flagged"])
        assert [p["ratio"] for p in got["chatcmpl-quiet"]] == [0.7, None]
        assert got["chatcmpl-quiet"][0]["selfcheck_abs_diff"] == pytest.approx(0.004)
        assert got["chatcmpl-flagged"][0]["selfcheck_aligned"] is False
        # The probed response is in the trail with its results, though the audit sampler passed it over.
        assert await store.exists("chatcmpl-quiet") and await store.exists("chatcmpl-flagged")
        assert writer.written == 5 and not writer.dropped
    assert probe.result_sinks == []  # removed on shutdown


async def test_probe_rows_count_against_the_queue(tmp_path: Path) -> None:
    from proxy.audit.store import AuditStore

    w = AuditWriter(AuditStore(f"sqlite:///{tmp_path}/a.db"), queue_size=2)
    assert w.submit_probe(probe_result("a")) and w.submit_probe(probe_result("b"))
    assert not w.submit_probe(probe_result("c"))  # never blocks: dropped and counted like any record
    assert w.dropped["queue_full"] == 1
    assert not w.is_pending("a")  # a probe row does not make feedback wait for a response row
    await w.start()
    assert await w.flush(10)
    await w.stop()
    assert w.written == 2


# -- the whole proxy ---------------------------------------------------------------------------------------------------
def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="entropy-proxy")
    add_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


async def test_whole_proxy_reference_to_row_to_page_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = f"sqlite:///{tmp_path}/audit.db"
    settings = {"audit.enabled": True, "audit.url": db, "audit.sample_rate": 0.0, "probe.sample_rate": 1.0,
                "thresholds.confident_mean": 0.0, "thresholds.uncertain_mean": 1000.0}  # nothing flagged
    async with proxy_client(FakeVLLM(), ("proxy.metrics", "proxy.audit", "proxy.probe"), **settings) as c:
        app: FastAPI = c.app  # type: ignore[attr-defined]
        probe: proxy.probe.Probe = app.state.probe
        writer: AuditWriter = app.state.audit_writer
        ids = []
        for i in range(2):
            r = await c.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": f"q {i}"}]})
            assert r.status_code == 200 and r.json()["choices"][0]["entropy"]["flags"] == []
            ids.append(r.headers["x-entropy-request-id"])
        assert await probe.wait_idle(10) and probe.counts["scored"] == 2
        fb = await c.post("/v1/feedback", json={"id": ids[0], "correct": False, "reference": REFERENCE})
        assert fb.status_code == 200 and fb.json()["reference_queued"] is True
        assert await probe.wait_idle(10) and probe.counts["scored"] == 3
        assert await writer.flush(10)
        stored = await writer.store.probe_results_for(ids)
        pair = probe.results[ids[0]]
        assert pair.ratio is not None and [p["ratio"] for p in stored[ids[0]]] == [pair.ratio, None]
        assert stored[ids[0]][0]["off_mean_entropy"] == pytest.approx(pair.off["mean_entropy"])  # type: ignore[index]
        assert stored[ids[0]][0]["selfcheck_abs_diff"] == pytest.approx(0.0, abs=1e-9)  # the fake reproduces exactly
        assert len(stored[ids[1]]) == 1 and await writer.store.exists(ids[1])  # probed, so recorded

        status = (await c.get("/v1/entropy/status")).json()["models"][MODEL]
        page = (await c.get("/audit")).text
    state = re.search(r'<div class="model-state" data-model="([^"]+)" data-state="([^"]+)"', page)
    assert state is not None and state.groups() == (MODEL, status["state"])
    assert status["state"] in ("healthy", "recognition", "collapse", "drift", "unknown")
    section = page.split('id="state"')[1].split('id="confident-wrong"')[0]
    assert status["diagnosis"]
    for reason in status["diagnosis"]:
        assert f"<li>{html.escape(reason)}</li>" in section  # the evidence
    assert f"<td>{MODEL}</td><td>3</td><td>1</td><td>{pair.ratio:.3f}</td>" in section.split("probe-summary")[1]
    resp = page.split(f'data-id="{ids[0]}"')[1].split('class="resp')[0]
    assert f'data-ratio="{pair.ratio}"' in resp and f"ratio {pair.ratio:.3f}" in resp and "self-check 0.0000" in resp

    # The command line runs its own event loop: from this async test, in a thread.
    assert await asyncio.to_thread(_cli, ["audit", "--url", db, "show", ids[0]]) == 0
    captured = capsys.readouterr()
    shown = json.loads(captured.out)
    assert [p["ratio"] for p in shown["probe"]] == [pair.ratio, None] and shown["label"] == "incorrect"
    assert f"ratio {pair.ratio:.3f}" in captured.err
    assert await asyncio.to_thread(_cli, ["audit", "--url", db, "report", "--png", ""]) == 0
    out = capsys.readouterr().out
    probe_part = out.split("Recognition probe")[1]
    assert f"{MODEL}: 3 results, 1 pairs, ratio sum(H_off)/sum(H_on) {pair.ratio:.3f}" in probe_part
    assert f"{ids[0]}" in probe_part.split("Latest probe results:")[1]
