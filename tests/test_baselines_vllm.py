"""The real vLLM names the revision (its /v1/models `root`); the proxy keys the automatic baseline by it, stores it
and exports it. Two proxies on one store: the second uses the first one's baseline without traffic of its own."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest

from proxy.app import create_app
from proxy.settings import load_settings
from tests.plugins.servers import serve_in_thread

pytestmark = pytest.mark.vllm

PROMPTS = ["Write one sentence about the sea.", "Describe a cat in one sentence.", "Say something about autumn."]


def _settings(upstream: str, url: str) -> object:
    return load_settings({
        "upstream": upstream, "models": ["smollm2"], "audit.url": url, "audit.sample_rate": 0.0,
        "monitors.window": 40, "monitors.baseline": 300, "monitors.baseline_responses": 12,
        "monitors.evidence_tokens": 200, "monitors.evidence_responses": 5, "monitors.baseline_poll_s": 1.0,
    }, environ={})


def _wait_for_baseline(url: str) -> dict:
    for _ in range(300):  # the poller writes a finished warm-up within a second
        st = httpx.get(f"{url}/v1/entropy/status").json()["models"].get("smollm2")
        if st and st["baseline"]["in_use"]:
            return st
        time.sleep(0.1)
    raise AssertionError(f"no baseline in use: {st}")


def test_revision_from_vllm_keys_a_stored_baseline_shared_by_a_second_proxy(vllm_server, tmp_path) -> None:
    models = httpx.get(f"{vllm_server}/v1/models").json()["data"]
    root = next(m["root"] for m in models if m["id"] == "smollm2")
    store = f"sqlite:///{tmp_path}/audit.db"
    with serve_in_thread(create_app(_settings(vllm_server, store))) as url:
        def one(i: int) -> None:
            httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
                "model": "smollm2", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": 32, "temperature": 1.0, "seed": i,
            }).raise_for_status()

        with cf.ThreadPoolExecutor(4) as pool:
            list(pool.map(one, range(16)))
        st = _wait_for_baseline(url)
        metrics = httpx.get(f"{url}/metrics").text
    assert st["revision"] == root
    b = st["baseline"]["in_use"]
    assert (b["revision"], b["source"]) == (root, "auto") and b["tokens"] >= 300 and b["responses"] >= 12
    assert b["measures"]["token_entropy_mean"] > 0 and b["forking_threshold"] > 0
    assert b["forking_threshold"] == pytest.approx(b["measures"]["token_entropy_p80"], abs=1e-5)  # fixed at its p80
    assert f'entropy_proxy_baseline_info{{model="smollm2",revision="{root}",source="auto"}} 1.0' in metrics
    with serve_in_thread(create_app(_settings(vllm_server, store))) as url2:  # a second replica, or a restart
        st2 = httpx.get(f"{url2}/v1/entropy/status").json()["models"]["smollm2"]
    assert st2["baseline"]["in_use"] == b and st2["state"] == "unknown"  # its baseline, but no evidence yet
