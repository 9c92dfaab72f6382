"""Shadow sampling for semantic entropy, through the whole proxy.

Two tiers: a recorded/fake upstream (fast; the meaning test is a hand-made rule injected in place of the
embedding model) and the real vLLM with the real packaged embedding model, on a real socket.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import orjson
import pytest
from fastapi import FastAPI

from proxy.app import create_app
from proxy.settings import load_settings
from tests.plugins.recorded import UPSTREAM, Chunks, RecordedUpstream
from tests.plugins.servers import serve_in_thread

CITIES = ("paris", "lyon", "rome")
SAMPLE_TEXTS = ["Paris.", "It is Paris.", "Lyon.", "Paris, of course", "Rome"]


def city_similarity(texts: list[str]) -> np.ndarray:
    found = [{c for c in CITIES if c in t.lower()} for t in texts]
    return np.array([[1.0 if a and a == b else 0.0 for b in found] for a in found])


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class Upstream(RecordedUpstream):
    """The recorded chat answer for clients; ``n`` made-up answers (with logprobs and usage) for shadow samples."""

    def __init__(self) -> None:
        super().__init__()
        self.serve("/v1/chat/completions", "chat_k20.json")
        self.sample_requests: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content) if request.content else {}
        n = body.get("n") or 1
        if n == 1:
            return super().__call__(request)
        self.sample_requests.append(body)
        choices = []
        for i in range(n):
            text = SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]
            choices.append({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                            "logprobs": {"content": [{"token": text, "logprob": -0.2 - 0.1 * i, "top_logprobs": []}]}})
        data = {"id": "chatcmpl-shadow", "object": "chat.completion", "model": body["model"], "choices": choices,
                # charged as if every sample ran to max_tokens, so the test knows the sum
                "usage": {"prompt_tokens": 30, "completion_tokens": n * body["max_tokens"],
                          "total_tokens": 30 + n * body["max_tokens"]}}
        return httpx.Response(200, stream=Chunks([orjson.dumps(data)]), headers={"content-type": "application/json"})


@contextlib.asynccontextmanager
async def app_client(tmp_path: Path, **extra: Any) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI, Upstream]]:
    upstream = Upstream()
    settings = load_settings(
        {"upstream": UPSTREAM, "models": ["smollm2"], "audit.url": f"sqlite:///{tmp_path}/audit.db",
         "audit.sample_rate": 0.0, "audit.store_text": True, "thresholds.confident_mean": 50.0,
         "semantic.sample_rate": 1.0, "semantic.samples": 5, "semantic.uncertain_nats": 0.5, **extra},
        environ={},
    )
    app = create_app(settings, transport=httpx.MockTransport(upstream))
    async with app.router.lifespan_context(app):
        app.state.semantic.clusterer._similarity = city_similarity  # the model's stand-in: same city, same meaning
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as client:
            yield client, app, upstream


async def _ask(client: httpx.AsyncClient) -> str:
    r = await client.post("/v1/chat/completions", json={
        "model": "smollm2", "messages": [{"role": "user", "content": "Capital of France?"}], "max_tokens": 8})
    assert r.status_code == 200, r.text
    return str(r.headers["X-Entropy-Request-Id"])


async def test_shadow_samples_reach_audit_metrics_and_flags(tmp_path: Path) -> None:
    async with app_client(tmp_path) as (client, app, upstream):
        rid = await _ask(client)
        assert await app.state.sampler.wait_idle(30)
        (sent,) = upstream.sample_requests
        assert sent["n"] == 5 and sent["temperature"] == 1.0 and sent["stream"] is False
        assert sent["messages"] == [{"role": "user", "content": "Capital of France?"}]
        (row,) = await app.state.audit_writer.store.get(rid)
        # Paris x3, Lyon, Rome: three meanings; the client's recorded answer names no city: a fourth, no sample.
        assert [c["size"] for c in row["semantic_clusters"]] == [3, 1, 1, 0]
        assert [c["original"] for c in row["semantic_clusters"]] == [False, False, False, True]
        assert row["semantic_clusters"][0]["answers"] == ["Paris.", "It is Paris.", "Paris, of course"]
        assert row["semantic_entropy_discrete"] == pytest.approx(-(0.6 * np.log(0.6) + 2 * 0.2 * np.log(0.2)))
        assert 0.0 < row["semantic_entropy"] < np.log(3)
        assert row["semantic_samples"] == 5
        assert "confident" in row["flags"] and "confident_inconsistent" in row["flags"]
        metrics = (await client.get("/metrics")).text
        assert _metric(metrics, "entropy_proxy_semantic_entropy_nats_count", model="smollm2") == 1.0
        assert _metric(metrics, "entropy_proxy_background_tokens_total", purpose="semantic") == 30 + 5 * sent[
            "max_tokens"]
        page = (await client.get("/audit", params={"flag": "confident_inconsistent"})).text
        assert f'data-id="{rid}"' in page and 'class="semantic"' in page
        assert "Paris. | It is Paris. | Paris, of course" in page  # the samples, grouped by meaning
        assert 'data-score="semantic entropy"' in page
        status = (await client.get("/v1/entropy/status")).json()
        assert status["semantic"]["results"] == 1 and status["semantic"]["flagged_confident_inconsistent"] == 1


async def test_budget_refuses_what_it_cannot_cover(tmp_path: Path) -> None:
    # Worst case of the first shadow request: 5 samples x 16 tokens + the prompt's bound (18 bytes + 104) = 202,
    # which fits in 210. It is charged its usage, 110; from then on the prompt's size is known (30), so the next
    # worst case is 110 and 110 + 110 > 210: refused, and the one after it too.
    async with app_client(tmp_path, **{"semantic.max_tokens_per_hour": 210, "semantic.max_tokens": 16}) as (
            client, app, upstream):
        for _ in range(3):
            await _ask(client)
            assert await app.state.sampler.wait_idle(30)
        stats = app.state.sampler.stats()["semantic"]
        assert len(upstream.sample_requests) == 1
        assert stats["refused"] == 2 and stats["tokens_last_hour"] == 110 <= stats["budget"]
        assert app.state.semantic.no_answer == 2
        metrics = (await client.get("/metrics")).text
        assert _metric(metrics, "entropy_proxy_background_refused_total", purpose="semantic") == 2.0
        assert _metric(metrics, "entropy_proxy_semantic_entropy_nats_count", model="smollm2") == 1.0


async def test_off_by_default_imports_no_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; from proxy.app import create_app; from proxy.settings import load_settings;"
            "app = create_app(load_settings({'upstream': 'http://x.test'}, environ={}));"
            "assert getattr(app.state, 'semantic', None) is None;"
            "bad = [m for m in ('torch', 'sentence_transformers', 'transformers') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


QUESTION = "What is the capital of France? Answer in one word."


@pytest.mark.vllm
def test_real_vllm_shadow_sample(vllm_server: str, tmp_path: Path) -> None:
    """A real request through the proxy gets shadow samples from the real vLLM, clustered by the real model."""
    settings = load_settings(
        {"upstream": vllm_server, "models": ["smollm2"], "audit.url": f"sqlite:///{tmp_path}/audit.db",
         "audit.sample_rate": 0.0, "audit.store_text": True, "semantic.sample_rate": 1.0, "semantic.samples": 4,
         "semantic.max_tokens": 16, "semantic.max_tokens_per_hour": 400},
        environ={},
    )
    app = create_app(settings)
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0, timeout=120)

        def ask(_: int) -> str:
            raw = client.chat.completions.with_raw_response.create(
                model="smollm2", messages=[{"role": "user", "content": QUESTION}], max_tokens=8, temperature=0.0)
            return str(raw.headers["x-entropy-request-id"])

        # Three at once: the first shadow request reserves its worst case (4 x 16 tokens + the prompt's bound,
        # about 220) while in flight, so the two that follow cannot fit in 400 beside it and are refused.
        with ThreadPoolExecutor(3) as pool:
            ids = list(pool.map(ask, range(3)))
        with httpx.Client(base_url=url, timeout=30) as http:
            deadline = time.monotonic() + 240  # the first result loads the embedding model (seconds)
            while True:
                sem = http.get("/v1/entropy/status").json()["semantic"]
                bg = http.get("/v1/entropy/status").json()["background"]["purposes"]["semantic"]
                if sem["results"] >= 1 and sem["results"] + sem["no_answer"] + sem["not_spawned"] >= 3 \
                        and bg["reserved"] == 0:
                    break
                assert time.monotonic() < deadline, (sem, bg)
                time.sleep(0.5)
            metrics = http.get("/metrics").text
            page = http.get("/audit").text
    assert _metric(metrics, "entropy_proxy_semantic_entropy_nats_count", model="smollm2") == sem["results"]
    # Budget: what was charged in the hour never exceeds it; a request whose worst case did not fit was refused.
    assert 0 < bg["tokens_last_hour"] <= 400
    assert bg["refused"] == sem["no_answer"] >= 1
    assert 'class="semantic"' in page
    shown = [rid for rid in ids if f'data-id="{rid}"' in page]
    assert len(shown) == 3  # every shadow-sampled response is recorded, its samples grouped by meaning
    assert page.count('class="cluster"') >= 1
