"""The canary against the real vLLM (CPU, SmolLM2-135M-Instruct): a round runs through the proxy's own lifespan,
is stored per revision in the audit store, shows in ``/v1/entropy/status``, ``/metrics`` and ``/audit``, and the
budget holds. Kept small (3 prompts x 3 samples x 16 tokens): the measured figures come from ``bench.canary``."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import create_app
from proxy.settings import load_settings

pytestmark = pytest.mark.vllm

PROMPTS = {"include_default": False, "prompts": [
    {"id": "capital", "kind": "check", "prompt": "What is the capital of France? Answer in one sentence.",
     "answer": ["Paris"], "reference": "The capital of France is Paris, which is also its largest city."},
    {"id": "rain", "kind": "open", "prompt": "Write one short sentence about rain.",
     "reference": "The rain came sideways off the harbour and found every gap in my coat."},
    {"id": "json", "kind": "format", "prompt": 'Return only a JSON object with the key "city" set to "Paris".',
     "format": "json", "reference": '{"city": "Paris"}'},
]}


async def test_a_canary_round_on_the_real_model(vllm_server: str, vllm_model: str, tmp_path: Path) -> None:
    prompts = tmp_path / "canary.json"
    prompts.write_text(json.dumps(PROMPTS))
    budget = 5_000
    s = load_settings({
        "upstream": vllm_server, "models": {vllm_model: {"revision": "canary-test-rev", "vocab_size": 49_152}},
        "audit.url": f"sqlite:///{tmp_path}/audit.db", "audit.sample_rate": 0.0,
        "canary.enabled": True, "canary.prompts_file": str(prompts), "canary.samples": 3, "canary.max_tokens": 16,
        "canary.interval_s": 3_600, "canary.max_tokens_per_hour": budget,
    }, environ={})
    app = create_app(s)
    async with app.router.lifespan_context(app):
        canary = app.state.canary
        assert await canary.wait_rounds(1, timeout=600), canary.counts
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy.test") as c:
            status = (await c.get("/v1/entropy/status")).json()["canary"]
            st = status["models"][vllm_model]
            last = st["last_round"]
            assert st["revision"] == "canary-test-rev" and last["complete"] and last["prompts"] == 3
            assert st["state"] == "unknown" and "baseline round 1 of 5" in st["verdict"]["reasons"][0]
            m = last["measures"]
            assert 0 < m["mean_entropy"] < 10 and 0 <= m["distinct_2"] <= 1 and m["ratio"] > 0  # references given
            assert m["pass_1"] is not None and 0 <= m["pass_1"] <= 1
            fams = {f.name: f for f in text_string_to_metric_families((await c.get("/metrics")).text)}
            measures = {s.labels["measure"]: s.value for s in fams["entropy_proxy_canary_measure"].samples
                        if s.labels["model"] == vllm_model}
            assert measures["mean_entropy"] == pytest.approx(m["mean_entropy"], abs=1e-4)
            spent = next(s.value for s in fams["entropy_proxy_background_tokens"].samples
                         if s.labels == {"purpose": "canary"} and s.name.endswith("_total"))
            assert 0 < spent <= budget
            page = await c.get("/audit")
            assert page.status_code == 200 and 'data-model="smollm2"' in page.text
        rows = await canary.rounds.latest(vllm_model)
        assert len(rows) == 1 and rows[0].revision == "canary-test-rev" and len(rows[0].prompts) == 3
        # The budget holds: a round whose worst case does not fit in what is left of the hour is not started;
        # one that fits runs, and what it really cost stays within the budget.
        sampler = app.state.sampler
        used = sampler.tokens_last_hour("canary")
        assert used == spent
        need = canary.round_worst_case(vllm_model, canary.prompts.for_model(vllm_model), 1.0, 3)
        sampler.add_purpose("canary", used + need - 1)
        assert await canary.run_round(vllm_model) is None and canary.counts["skipped_budget"] == 1
        assert sampler.tokens_last_hour("canary") == used
        sampler.add_purpose("canary", used + need)
        second = await canary.run_round(vllm_model)
        assert second is not None and second.complete
        stats = sampler.stats()["canary"]
        assert used < stats["tokens_last_hour"] <= used + need and stats["reserved"] == 0 and stats["refused"] == 0
