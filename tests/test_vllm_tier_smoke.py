"""The real tier's footing: the session's vLLM answers chat with the logprobs shape the proxy relies on.

If these fail, every other ``vllm`` test would fail for a reason that has nothing to do with the proxy.
"""

from __future__ import annotations

import math

import httpx
import pytest

pytestmark = pytest.mark.vllm

K = 20


def _chat(base: str, model: str, **extra: object) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Name three primary colours."}],
        "max_tokens": 12,
        "temperature": 0.0,
        **extra,
    }
    return httpx.post(base + "/v1/chat/completions", json=body, timeout=120.0)


def test_models_lists_the_served_model(vllm_server: str, vllm_model: str) -> None:
    r = httpx.get(vllm_server + "/v1/models", timeout=10.0)
    assert r.status_code == 200
    assert vllm_model in [m["id"] for m in r.json()["data"]]


def test_chat_with_top_logprobs_20(vllm_server: str, vllm_model: str) -> None:
    r = _chat(vllm_server, vllm_model, logprobs=True, top_logprobs=K)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert choice["message"]["content"]
    assert 0 < len(content) <= 12
    assert len(content) == r.json()["usage"]["completion_tokens"]
    for pos in content:
        assert pos["logprob"] <= 0.0
        tops = pos["top_logprobs"]
        # K entries (sampled token included; when it is outside the top K it replaces the K-th).
        assert len(tops) == K
        assert pos["token"] in [t["token"] for t in tops]
        assert all(t["logprob"] <= 0.0 for t in tops)
        mass = sum(math.exp(t["logprob"]) for t in tops if t["logprob"] > -9999.0)
        assert 0.0 < mass <= 1.0 + 1e-4
    # Greedy decoding: every sampled token is the most probable one listed.
    for pos in content:
        assert pos["logprob"] >= max(t["logprob"] for t in pos["top_logprobs"]) - 1e-4


def test_without_logprobs_the_field_is_null(vllm_server: str, vllm_model: str) -> None:
    r = _chat(vllm_server, vllm_model)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["logprobs"] is None


def test_more_than_the_server_max_is_refused(vllm_server: str, vllm_model: str) -> None:
    r = _chat(vllm_server, vllm_model, logprobs=True, top_logprobs=K + 1)
    assert r.status_code == 400
    assert "max allowed: 20" in r.json()["error"]["message"]


def test_demo_runs_against_the_real_server(vllm_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`entropy-proxy demo --upstream URL`: proxy as a child process, one answer, a summary, a clean stop."""
    from proxy.demo import main

    rc = main(["--upstream", vllm_server, "--color", "never", "--max-tokens", "16", "-q", "What is 2+2?"])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert "Q: What is 2+2?" in out
    assert "entropy: mean " in out and " confidence " in out and " forking " in out
    assert "tokens: " in out
    assert out.rstrip().endswith("stopped.")
