"""`models.<name>.vocab_size`: the entropy of a model's responses (annotation and probe) uses its own V."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from monitors.entropy import estimate_positions
from proxy.logprobs import chat_positions, completion_positions
from proxy.probe import Probe
from tests.plugins.recorded import fixture_bytes, proxy_client
from tests.test_recognition import CHAT, COMPONENTS, MODEL, FakeVLLM, _question

OWN_V = 49_152  # SmolLM2's
GLOBAL_V = 262_144


def _per_token(pos, v: int) -> list[float]:
    est = estimate_positions(pos.logprobs, v, sampled_col=pos.sampled_col, collapsed=pos.collapsed)
    return [round(x, 4) for x in est.point.tolist()]


def _models(v: int) -> dict[str, object]:
    return {"vocab_size": GLOBAL_V, "models": {MODEL: {"vocab_size": v}, "other-model": None}}


async def test_chat_point_estimate_uses_the_models_own_vocabulary(recorded):
    recorded.serve(CHAT, "chat_k20.json")
    content = orjson.loads(fixture_bytes("chat_k20.json"))["choices"][0]["logprobs"]["content"]
    own, glob = _per_token(chat_positions(content), OWN_V), _per_token(chat_positions(content), GLOBAL_V)
    assert own != glob  # V moves the point estimate at K=20, so the check below can tell them apart
    async with proxy_client(recorded, **_models(OWN_V)) as c:
        r = await c.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                     "entropy_detail": "tokens"})
    ent = r.json()["choices"][0]["entropy"]
    assert ent["per_token"] == own
    assert ent["mean"] == pytest.approx(np.mean(own), abs=1e-4)


async def test_streamed_chat_uses_the_models_own_vocabulary(recorded):
    recorded.serve(CHAT, "chat_stream_k20.sse")
    raw = fixture_bytes("chat_stream_k20.sse")
    chunks = [orjson.loads(b[6:]) for b in raw.split(b"\n\n") if b.startswith(b"data: {")]
    content = [e for ch in chunks for c in ch.get("choices", ()) for e in ((c.get("logprobs") or {}).get("content")
                                                                          or ())]
    own, glob = _per_token(chat_positions(content), OWN_V), _per_token(chat_positions(content), GLOBAL_V)
    assert own != glob
    async with proxy_client(recorded, **_models(OWN_V)) as c:
        r = await c.post(CHAT, json={"model": MODEL, "stream": True, "entropy_detail": "tokens",
                                     "messages": [{"role": "user", "content": "hi"}]})
    finals = [orjson.loads(b[6:]) for b in r.content.split(b"\n\n") if b.startswith(b"data: {")]
    ent = next(ch["entropy"] for f in finals for ch in f.get("choices", ()) if ch.get("finish_reason"))
    assert ent["per_token"] == own


async def test_completions_point_estimate_uses_the_models_own_vocabulary(recorded):
    recorded.serve("/v1/completions", "comp_k5.json")
    lp = orjson.loads(fixture_bytes("comp_k5.json"))["choices"][0]["logprobs"]
    own, glob = _per_token(completion_positions(lp, 0, 5), OWN_V), _per_token(completion_positions(lp, 0, 5), GLOBAL_V)
    assert own != glob
    async with proxy_client(recorded, top_k=5, **_models(OWN_V)) as c:
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "The capital of France is",
                                                  "entropy_detail": "tokens"})
    assert r.json()["choices"][0]["entropy"]["per_token"] == own


async def test_a_model_without_its_own_vocabulary_uses_the_global_one(recorded):
    recorded.serve(CHAT, "chat_k20.json")
    content = orjson.loads(fixture_bytes("chat_k20.json"))["choices"][0]["logprobs"]["content"]
    async with proxy_client(recorded, **_models(OWN_V)) as c:
        r = await c.post(CHAT, json={"model": "other-model", "entropy_detail": "tokens",
                                     "messages": [{"role": "user", "content": "hi"}]})
    assert r.json()["choices"][0]["entropy"]["per_token"] == _per_token(chat_positions(content), GLOBAL_V)


async def test_probe_rescoring_uses_the_models_own_vocabulary():
    """The probe re-scores with the same V as the annotation: its self-check (re-scored minus generation-time
    entropy) stays 0 with a per-model V, and both equal the estimator at that V."""
    fake = FakeVLLM()
    async with proxy_client(fake, COMPONENTS, **{"probe.sample_rate": 1.0, **_models(500)}) as c:
        probe: Probe = c.app.state.probe  # type: ignore[attr-defined]
        r = await c.post(CHAT, json={**_question(0), "logprobs": True, "top_logprobs": 20,
                                     "entropy_detail": "tokens"})
        choice = r.json()["choices"][0]
        pos = chat_positions(choice["logprobs"]["content"])
        assert choice["entropy"]["per_token"] == _per_token(pos, 500) != _per_token(pos, GLOBAL_V)
        assert await probe.wait_idle(10)
        assert probe.counts["scored"] == 1
        assert probe.selfcheck_value(MODEL) == pytest.approx(0.0, abs=1e-9)
