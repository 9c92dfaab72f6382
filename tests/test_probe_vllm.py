"""The recognition probe against the real vLLM (CPU, SmolLM2-135M-Instruct): self-check, ratio, client timing.

Measurements are printed and written to ``test-artifacts/probe-vllm.json``. The only hard limits are the issue's:
re-scoring the model's own completions reproduces their generation-time entropy within 0.05 nats (mean absolute
difference); the recognition ratio must exist and be finite - its value is a finding, not asserted.

The reference answers reach the probe the way a client sends them: ``POST /v1/feedback`` with ``reference``;
the results then sit in the audit trail (``audit_probe_results``) beside the responses they belong to.
"""

from __future__ import annotations

import json
import math
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from monitors.recognition import bootstrap_ratio_interval
from proxy.app import create_app
from proxy.audit.store import AuditStore
from proxy.settings import load_settings
from tests.plugins.servers import serve_in_thread

pytestmark = pytest.mark.vllm

ARTIFACT = Path(__file__).resolve().parent.parent / "test-artifacts" / "probe-vllm.json"
SELFCHECK_LIMIT = 0.05  # nats, the bound (0.03 seen by hand on this model)

# Questions with reference answers written for this test (the off-policy side: text the model did not write).
QA = [
    ("What is the capital of France?", "The capital of France is Paris, which is also its largest city."),
    ("Why is the sky blue?", "Sunlight scatters off air molecules, and blue light scatters far more than red, so "
                             "the sky looks blue from every direction."),
    ("Give me a tip for sleeping better.", "Keep a fixed wake-up time every day, even on weekends; a regular "
                                           "rhythm does more for sleep than anything you do at night."),
    ("What does a compiler do?", "A compiler translates a program written in one language, usually a high-level "
                                 "one, into another, usually machine code that a processor can run."),
    ("Name three primary colors.", "In painting the traditional primary colors are red, yellow and blue."),
    ("How do plants make food?", "Plants use photosynthesis: chlorophyll captures light energy, which turns "
                                 "carbon dioxide and water into glucose and releases oxygen."),
    ("What is 12 times 12?", "12 times 12 is 144."),
    ("Describe a cat in one sentence.", "A cat is a small, independent carnivore with soft fur, sharp claws and a "
                                        "talent for sleeping in the sun."),
]


def _app(upstream: str, model: str, rate: float, audit_url: str | None = None) -> FastAPI:
    audit = {"audit.url": audit_url, "audit.sample_rate": 0.0} if audit_url else {"audit.enabled": False}
    s = load_settings({"upstream": upstream, "models": [model], "probe.sample_rate": rate, "probe.concurrency": 1,
                       **audit}, environ={})
    return create_app(s)


async def _stored_probe_results(app: FastAPI, ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    store = AuditStore(app.state.audit_writer.store.url)
    await store.start()
    try:
        return await store.probe_results_for(ids)
    finally:
        await store.close()


def _wait_idle(app: FastAPI, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while app.state.probe.pending > 0:
        assert time.monotonic() < deadline, "the probe did not finish in time"
        time.sleep(0.1)


def _chat(c: httpx.Client, model: str, q: str, **kw: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": q}], **kw}
    r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r


def _overhead(metrics: str) -> tuple[float, float]:
    for fam in text_string_to_metric_families(metrics):
        if fam.name == "entropy_proxy_overhead_seconds":
            total = {s.name: s.value for s in fam.samples if s.labels.get("endpoint") == "chat"}
            return total.get("entropy_proxy_overhead_seconds_sum", 0.0), total.get(
                "entropy_proxy_overhead_seconds_count", 0.0)
    return 0.0, 0.0


def _record(key: str, value: Any) -> None:
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(ARTIFACT.read_text()) if ARTIFACT.exists() else {}
    data[key] = value
    ARTIFACT.write_text(json.dumps(data, indent=2))


def test_selfcheck_and_recognition_ratio_on_the_real_model(vllm_server: str, vllm_model: str, tmp_path: Path) -> None:
    app = _app(vllm_server, vllm_model, 1.0, audit_url=f"sqlite:///{tmp_path}/audit.db")
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=300.0) as c:
        ids = []
        for q, _ in QA:
            r = _chat(c, vllm_model, q, temperature=1.0, max_tokens=64, seed=len(ids))
            ids.append(r.headers["x-entropy-request-id"])
        _wait_idle(app)
        for rid, (_, ref) in zip(ids, QA, strict=True):
            fb = c.post("/v1/feedback", json={"id": rid, "correct": True, "reference": ref})
            assert fb.status_code == 200 and fb.json()["reference_queued"] is True, fb.text
        _wait_idle(app)
        probe = app.state.probe
        status = c.get("/v1/entropy/status").json()
        metrics = c.get("/metrics").text
        page = c.get("/audit", params={"limit": len(QA)}).text
    # Stopped: the audit writer flushed on shutdown. Each response has its on-policy result and its pair.
    stored = anyio.run(_stored_probe_results, app, ids)

    results = [probe.results[rid] for rid in ids]
    assert probe.enabled and probe.counts["failed"] == 0, probe.status()
    checks = [r.selfcheck for r in results]
    aligned = [ch["mean_abs_diff"] for ch in checks if ch["aligned"]]
    assert len(aligned) >= 0.75 * len(QA), checks  # retokenizing the text gives the generated ids back
    mad = statistics.fmean(aligned)
    print(f"\nself-check: mean abs diff {mad:.4f} nats over {len(aligned)}/{len(QA)} aligned responses; "
          f"per response {[round(x, 4) for x in aligned]}, worst token {max(ch['max_abs_diff'] or 0 for ch in checks)}")
    assert mad <= SELFCHECK_LIMIT
    gauge = probe.selfcheck_value(vllm_model)
    assert gauge == pytest.approx(mad, abs=1e-4)  # the per-response values are rounded to 5 decimals
    assert f'entropy_proxy_probe_selfcheck_abs_diff{{model="{vllm_model}"}}' in metrics

    h_on = [r.on["mean_entropy"] for r in results]
    h_off = [r.off["mean_entropy"] for r in results]  # type: ignore[index]
    s_on = [r.on["input_surprise"] for r in results]
    s_off = [r.off["input_surprise"] for r in results]  # type: ignore[index]
    ratio = status["models"][vllm_model]["recognition_ratio"]
    assert ratio is not None and math.isfinite(ratio) and ratio > 0
    assert ratio == pytest.approx(sum(h_off) / sum(h_on), rel=1e-3)
    ci = bootstrap_ratio_interval(h_on, h_off)
    print(f"recognition ratio H_off/H_on = {ratio:.3f} (90% bootstrap {ci}); on-policy H {statistics.fmean(h_on):.3f}"
          f" surprise {statistics.fmean(s_on):.3f}; off-policy H {statistics.fmean(h_off):.3f} surprise "
          f"{statistics.fmean(s_off):.3f} nats; per pair {[round(r.ratio or 0, 3) for r in results]}")
    assert status["probe"]["models"][vllm_model]["pairs"] == len(QA)
    for rid, r in zip(ids, results, strict=True):
        assert [p["ratio"] for p in stored[rid]] == [r.ratio, None]
        assert stored[rid][0]["selfcheck_abs_diff"] == r.selfcheck["mean_abs_diff"]
    assert f'data-model="{vllm_model}" data-state="{status["models"][vllm_model]["state"]}"' in page
    assert page.count('class="probe"') == 2 * len(QA)
    _record("selfcheck_and_ratio", {
        "model": vllm_model, "responses": len(QA), "aligned": len(aligned), "selfcheck_mean_abs_diff": mad,
        "selfcheck_per_response": aligned, "recognition_ratio": ratio, "ratio_interval_90": ci,
        "on_policy": {"mean_entropy": h_on, "input_surprise": s_on},
        "off_policy": {"mean_entropy": h_off, "input_surprise": s_off},
        "state": status["models"][vllm_model]["state"],
    })


def test_probe_at_full_rate_does_not_hold_client_responses(vllm_server: str, vllm_model: str) -> None:
    """The proof is an event: the probe's first upstream call is held (by the test) while clients get their whole
    answers from the real vLLM; nothing is scored until it is let go, then everything is."""
    app = _app(vllm_server, vllm_model, 1.0)
    held, release = threading.Event(), threading.Event()
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=300.0) as c:
        probe = app.state.probe
        real_post = probe._post

        async def held_post(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> httpx.Response:
            held.set()
            await anyio.to_thread.run_sync(release.wait)
            return await real_post(client, path, body)

        probe._post = held_post
        try:
            _chat(c, vllm_model, QA[0][0], max_tokens=8, temperature=0)
            assert held.wait(60), "the probe never started on the first response"
            for q, _ in QA[1:3]:  # answered in full while the probe's call is held
                r = _chat(c, vllm_model, q, max_tokens=8, temperature=0)
                assert r.json()["choices"][0]["entropy"]["tokens"] > 0
            # Observers run once a body is sent, so the last job may be queued just after the client has its
            # answer: wait for it (nothing can be scored meanwhile, the first call is still held).
            deadline = time.monotonic() + 60
            while probe.pending < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not release.is_set() and probe.counts["scored"] == 0 and probe.pending == 3
        finally:
            release.set()
        _wait_idle(app)
        assert probe.counts["scored"] == 3


def test_client_latency_with_the_probe_at_rate_0_and_1_is_reported(vllm_server: str, vllm_model: str) -> None:
    """A measurement, reported not asserted: client latency and proxy overhead with the probe at rate 0 and 1."""
    out: dict[str, Any] = {}
    for rate in (0.0, 1.0):
        app = _app(vllm_server, vllm_model, rate)
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=300.0) as c:
            _chat(c, vllm_model, "Warm up.", max_tokens=4, temperature=0)
            times = []
            for q, _ in QA[:6]:
                t0 = time.perf_counter()
                _chat(c, vllm_model, q, max_tokens=32, temperature=0, ignore_eos=True)
                times.append(time.perf_counter() - t0)
            total_s, n = _overhead(c.get("/metrics").text)
            _wait_idle(app)
            scored = app.state.probe.counts["scored"]
        out[str(rate)] = {"latency_s": [round(t, 4) for t in times], "median_s": statistics.median(times),
                          "overhead_mean_ms": 1000 * total_s / max(n, 1), "probed": scored}
        assert scored == (7 if rate else 0)
    print(f"\nclient latency (6 x 32 tokens): rate 0 median {out['0.0']['median_s']:.3f} s, rate 1 median "
          f"{out['1.0']['median_s']:.3f} s; proxy overhead {out['0.0']['overhead_mean_ms']:.2f} ms vs "
          f"{out['1.0']['overhead_mean_ms']:.2f} ms per request")
    _record("timing", out)
