"""The canary against a fake upstream: prompt files, rounds, baseline and verdict, budget, the app wiring (status,
metrics, audit store), leader-only. The real-vLLM tier is tests/test_canary_vllm.py.

The fake "model" speaks words from a small vocabulary; at every position its next-word distribution is
``softmax(-sharpness * rank)`` over a ranking that depends on the previous word. It reports raw logprobs (the
temperature-1 distribution, as vLLM does) and samples at the request's temperature, and answers ``/tokenize`` and
``prompt_logprobs`` re-scoring from the same distribution. ``sharpness`` is the knob that "post-trains" it.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import COMPONENTS
from proxy.background.sampler import BackgroundSampler
from proxy.canary.prompts import PromptError, load_prompts
from proxy.canary.runner import Canary
from proxy.canary.store import MemoryRounds
from proxy.settings import load_settings
from tests.plugins.recorded import proxy_client

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "it", "ran", "far", "away"]
K = 8


class FakeModel:
    def __init__(self, sharpness: float = 0.5, seed: int = 0) -> None:
        self.sharpness = sharpness
        self.rng = random.Random(seed)
        self.paths: list[str] = []

    def dist(self, prev: int) -> list[tuple[int, float]]:
        order = [(prev * 5 + i) % len(WORDS) for i in range(len(WORDS))]
        w = np.exp(-self.sharpness * np.arange(len(WORDS)))
        p = w / w.sum()
        return [(tok, float(math.log(x))) for tok, x in zip(order, p, strict=True)]

    def ids(self, text: str) -> list[int]:
        return [WORDS.index(w) if w in WORDS else len(w) % len(WORDS) for w in text.split()]

    def sample(self, prev: int, temperature: float, n_tokens: int) -> tuple[str, list[dict[str, Any]]]:
        words, content = [], []
        for _ in range(n_tokens):
            d = self.dist(prev)
            logits = np.array([lp for _, lp in d]) / max(temperature, 1e-3)
            p = np.exp(logits - logits.max())
            p /= p.sum()
            i = self.rng.choices(range(len(d)), weights=p.tolist())[0]
            tok, lp = d[i]
            top = [{"token": WORDS[t] + " ", "logprob": v, "bytes": None} for t, v in d[:K]]
            if i >= K:
                top = [{"token": WORDS[tok] + " ", "logprob": lp, "bytes": None}, *top[: K - 1]]
            content.append({"token": WORDS[tok] + " ", "logprob": lp, "bytes": None, "top_logprobs": top})
            words.append(WORDS[tok])
            prev = tok
        return " ".join(words), content

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        path = request.url.path
        self.paths.append(path)
        if path == "/tokenize":
            text = " ".join(m["content"] for m in body["messages"]) if "messages" in body else body["prompt"]
            return httpx.Response(200, json={"tokens": self.ids(text), "max_model_len": 2048})
        if path == "/v1/completions":
            ids = body["prompt"]
            plp: list[Any] = [None]
            for prev, cur in zip(ids, ids[1:], strict=False):
                d = self.dist(prev)
                e = {str(t): {"logprob": lp, "rank": r + 1} for r, (t, lp) in enumerate(d[: body["prompt_logprobs"]])}
                e.setdefault(str(cur), {"logprob": dict(d)[cur], "rank": 99})
                plp.append(e)
            return httpx.Response(200, json={"choices": [{"index": 0, "text": "x", "prompt_logprobs": plp}],
                                             "usage": {"prompt_tokens": len(ids), "total_tokens": len(ids) + 1}})
        if path == "/v1/chat/completions":
            prev = self.ids(body["messages"][-1]["content"])[-1]
            n, mt = body.get("n", 1), body["max_tokens"]
            choices = []
            for i in range(n):
                text, content = self.sample(prev, body.get("temperature", 1.0), mt)
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                 "logprobs": {"content": content}, "finish_reason": "length"})
            return httpx.Response(200, json={"id": "c", "choices": choices, "usage": {
                "prompt_tokens": 10, "completion_tokens": n * mt, "total_tokens": 10 + n * mt}})
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "smollm2", "root": "fake"}]})
        return httpx.Response(404, json={"error": {"message": "nope"}})


PROMPTS = {"include_default": False, "prompts": [
    {"id": f"p{i}", "kind": "open", "prompt": f"{WORDS[i]} {WORDS[(i + 3) % 12]}",
     "reference": " ".join(WORDS[(i * j) % 12] for j in range(1, 10))} for i in range(6)
] + [{"id": "count", "kind": "check", "prompt": "say cat", "answer": ["cat"], "reference": "the cat"}]}


@pytest.fixture
def prompts_file(tmp_path: Path) -> str:
    p = tmp_path / "prompts.json"
    p.write_text(json.dumps(PROMPTS))
    return str(p)


# -- prompt files ----------------------------------------------------------------------------------------------------
def test_default_prompt_set_has_every_kind_and_foreign_references() -> None:
    ps = load_prompts().for_model("any")
    kinds = {p.kind for p in ps}
    assert kinds == {"open", "check", "format"} and len(ps) >= 8
    assert all(p.reference for p in ps)
    add = next(p for p in ps if p.id == "math-add")
    assert add.check("The answer is 42.") is True
    assert add.check("420") is False and add.check("4.2") is False and add.check("42.5") is False
    js = next(p for p in ps if p.id == "format-json")
    assert js.check('{"name": "Ana", "age": 31}') is True and js.check("Ana is 31") is False
    assert next(p for p in ps if p.kind == "open").check("anything") is None


def test_user_file_adds_replaces_and_names_bad_fields(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("prompts:\n  - {id: math-add, kind: check, prompt: 'What is 1+1?', answer: ['2']}\n"
                 "  - {id: mine, prompt: 'hello'}\nmodels:\n  big: [{id: big-only, prompt: 'x'}]\n")
    ps = load_prompts(str(f))
    ids = [p.id for p in ps.for_model("small")]
    assert "mine" in ids and "fact-week" in ids and "big-only" not in ids
    assert next(p for p in ps.for_model("small") if p.id == "math-add").answers == ("2",)
    assert "big-only" in [p.id for p in ps.for_model("big")]
    f.write_text("include_default: false\nprompts:\n  - {id: only, prompt: 'x'}\n")
    assert [p.id for p in load_prompts(str(f)).for_model("m")] == ["only"]
    for bad, where in [("prompts:\n  - {id: c, kind: check, prompt: x}\n", "answer"),
                       ("prompts:\n  - {id: f, kind: format, prompt: x, format: poem}\n", "format"),
                       ("prompts:\n  - {kind: open, prompt: x}\n", "id"), ("prompts: [", "YAML")]:
        f.write_text(bad)
        with pytest.raises(PromptError, match=where):
            load_prompts(str(f))


# -- rounds, baseline, verdict ---------------------------------------------------------------------------------------
def _canary(model: FakeModel, prompts_file: str, budget: int = 1_000_000, **kw: Any) -> Canary:
    s = load_settings({"upstream": "http://fake", "canary.enabled": True, "canary.prompts_file": prompts_file,
                       "canary.samples": 5, "canary.max_tokens": 12, "canary.max_tokens_per_hour": budget,
                       "top_k": K, "vocab_size": len(WORDS), **kw}, environ={})
    client = httpx.AsyncClient(base_url="http://fake", transport=httpx.MockTransport(model))
    return Canary(s, BackgroundSampler(client, s, concurrency=2), load_prompts(prompts_file), MemoryRounds(),
                  models=lambda: ["smollm2"], revision=lambda m: "rev-a")


async def test_baseline_then_healthy_then_a_sharpened_model_reads_collapse(prompts_file: str) -> None:
    model = FakeModel(sharpness=0.4, seed=1)
    c = _canary(model, prompts_file)
    for i in range(5):
        r = await c.run_round("smollm2")
        assert r is not None and r.complete and r.verdict["state"] == "unknown"
        assert r.verdict["reasons"] == [f"baseline round {i + 1} of 5"]
    r = await c.run_round("smollm2")
    assert r is not None and r.verdict["state"] == "healthy", r.verdict["reasons"]
    assert r.measures["ratio"] is not None and r.measures["pass_1"] is not None
    assert c.state["smollm2"].baseline_rounds == 5
    model.sharpness = 3.0  # the model changed under the same revision
    r = await c.run_round("smollm2")
    assert r is not None and r.verdict["state"] == "collapse", r.verdict["reasons"]
    changes = {ch["measure"]: ch for ch in r.verdict["changes"]}
    assert changes["mean_entropy"]["direction"] == "down" and changes["mean_entropy"]["interval"][1] < 0
    assert any(changes[m]["direction"] == "down" for m in ("distinct_2", "chrf_distance"))
    assert "interval" in " ".join(r.verdict["reasons"])
    st = c.status()["models"]["smollm2"]
    assert st["state"] == "collapse" and st["rounds"] == 7 and st["revision"] == "rev-a"
    law = st["performance_law"]  # one point per round (mean entropy, pass@1), the ceiling a performance
    assert law["rounds"] == 7 and 0.0 <= law["ceiling"] <= 1.0


async def test_no_reference_no_ratio(tmp_path: Path) -> None:
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"include_default": False, "prompts": [{"id": "a", "prompt": "the cat"}]}))
    model = FakeModel()
    r = await _canary(model, str(f)).run_round("smollm2")
    assert r is not None and r.measures["ratio"] is None and r.measures["mean_entropy"] is not None
    assert "/v1/chat/completions" in model.paths and "/v1/completions" not in model.paths  # nothing re-scored


async def test_a_round_the_budget_cannot_cover_is_not_started(prompts_file: str) -> None:
    model = FakeModel()
    c = _canary(model, prompts_file)
    need = c.round_worst_case("smollm2", c.prompts.for_model("smollm2"), 1.0, 5)
    c = _canary(model, prompts_file, budget=need - 1)
    assert await c.run_round("smollm2") is None
    assert c.counts["skipped_budget"] == 1 and model.paths == []
    c = _canary(model, prompts_file, budget=need + 100)
    rounds = 0
    while await c.run_round("smollm2") is not None:  # the clock does not move: the hour's budget runs out
        rounds += 1
        assert c.sampler.tokens_last_hour("canary") <= need + 100
        assert rounds < 20
    assert rounds >= 1 and c.counts["skipped_budget"] == 1
    assert c.sampler.stats()["canary"]["refused"] == 0  # whole rounds were held back, no request cut short


# -- the app ---------------------------------------------------------------------------------------------------------
async def test_the_app_runs_rounds_stores_them_per_revision_and_exports_them(prompts_file: str,
                                                                             tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'audit.db'}"
    async with proxy_client(FakeModel(seed=3), COMPONENTS, **{
            "audit.enabled": True, "audit.url": db, "models": {"smollm2": {"revision": "rev-7"}},
            "canary.enabled": True, "canary.prompts_file": prompts_file, "canary.interval_s": 3600,
            "canary.max_tokens": 10, "top_k": K, "vocab_size": len(WORDS)}) as client:
        app = client.app  # type: ignore[attr-defined]
        assert await app.state.canary.wait_rounds(1, timeout=60)
        status = (await client.get("/v1/entropy/status")).json()
        canary = status["canary"]
        assert canary["models"]["smollm2"]["revision"] == "rev-7"
        assert canary["models"]["smollm2"]["last_round"]["complete"] is True
        assert canary["budget"]["tokens_last_hour"] <= canary["budget"]["budget"]
        text = (await client.get("/metrics")).text
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        got = {(s.labels.get("measure"), s.labels.get("state")): s.value
               for name in ("entropy_proxy_canary_measure", "entropy_proxy_canary_state") for s in fams[name].samples}
        assert got[("mean_entropy", None)] > 0 and got[(None, "unknown")] == 1.0
        tokens = next(s.value for s in fams["entropy_proxy_background_tokens"].samples
                      if s.labels == {"purpose": "canary"} and s.name.endswith("_total"))
        assert tokens > 0
        rows = await app.state.canary.rounds.latest("smollm2")
        assert len(rows) == 1 and rows[0].revision == "rev-7" and rows[0].verdict["state"] == "unknown"
        assert {p.prompt_id for p in rows[0].prompts} == {f"p{i}" for i in range(6)} | {"count"}
        page = await client.get("/audit")
        assert page.status_code == 200, page.text
        assert '<section id="canary">' in page.text
        assert 'class="canary-model" data-model="smollm2" data-state="unknown"' in page.text
        assert "baseline round 1 of 5" in page.text and "rev-7" in page.text


@pytest.mark.parametrize("leader", [True, False])
async def test_only_the_leader_samples(prompts_file: str, leader: bool) -> None:
    from proxy.app import create_app
    s = load_settings({"upstream": "http://fake", "audit.enabled": False, "models": ["smollm2"],
                       "canary.enabled": True, "canary.prompts_file": prompts_file}, environ={})
    model = FakeModel()
    app = create_app(s, transport=httpx.MockTransport(model), components=COMPONENTS)
    app.state.is_leader = leader  # set by `serve --workers N` before the lifespan starts
    async with app.router.lifespan_context(app):
        assert app.state.sampler.running_now is leader
        assert app.state.canary.looping is leader
        if leader:
            assert await app.state.canary.wait_rounds(1, timeout=60)
    assert ("/v1/chat/completions" in model.paths) is leader


def test_a_bad_prompt_file_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    from proxy.app import create_app
    from proxy.settings import SettingsError
    f = tmp_path / "bad.yaml"
    f.write_text("prompts:\n  - {id: x, kind: nonsense, prompt: y}\n")
    s = load_settings({"upstream": "http://fake", "canary.enabled": True, "canary.prompts_file": str(f)}, environ={})
    with pytest.raises(SettingsError, match=r"^canary.prompts_file: .*kind"):
        create_app(s, components=COMPONENTS)


# -- the store, on SQLite and a real PostgreSQL ----------------------------------------------------------------------
@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/audit.db"
    return str(request.getfixturevalue("postgres_db_url"))


async def test_database_rounds_per_revision(store_url: str) -> None:
    from monitors.canary import PromptRound
    from proxy.audit.store import AuditStore
    from proxy.canary.store import DatabaseRounds, RoundRecord

    store = AuditStore(store_url)
    await store.start()
    try:
        rounds = DatabaseRounds(store)
        p = PromptRound("q", "check", 5, 100, 1.2, 2.0, 0.3, 0.6, 0.5, {"prose": 4, "list": 1}, 2, 1.4)

        def rec(rev: str, t: float, created: float, complete: bool = True) -> RoundRecord:
            return RoundRecord("m", rev, t, 5, [p], 120, complete, {"mean_entropy": 1.2, "ratio": None},
                               created=created, verdict={"state": "unknown", "reasons": [], "changes": []})

        for i, (rev, t, ok) in enumerate([("a", 1.0, True), ("a", 1.0, False), ("a", 0.3, True), ("a", 1.0, True),
                                          ("b", 1.0, True), ("a", 1.0, True)]):
            await rounds.add(rec(rev, t, 1000.0 + i, ok))
        base = await rounds.baseline("m", "a", 1.0, 5, 2)
        assert [r.created for r in base] == [1000.0, 1003.0]  # complete, same temperature, oldest first
        assert base[0].prompts == [p] and base[0].verdict == {"state": "unknown", "reasons": [], "changes": []}
        assert await rounds.count("m", "a") == 5 and await rounds.count("m", "b") == 1
        latest = await rounds.latest("m", 2)
        assert [r.revision for r in latest] == ["a", "b"] and latest[0].pk is not None
        assert await rounds.models() == ["m"]
        assert await rounds.revisions("m") == ["a", "b"]  # most recently sampled first
    finally:
        await store.close()


async def test_a_forced_answer_start_is_sent_and_judged_with_the_answer(prompts_file: str) -> None:
    from proxy.canary.runner import Steering

    model = FakeModel()
    bodies: list[dict[str, Any]] = []

    def spy(request: httpx.Request) -> httpx.Response:
        if request.url.path in ("/v1/chat/completions", "/tokenize") and request.content:
            bodies.append(json.loads(request.content))
        return model(request)

    s = load_settings({"upstream": "http://fake", "canary.enabled": True, "canary.prompts_file": prompts_file,
                       "canary.max_tokens": 6, "top_k": K, "vocab_size": len(WORDS)}, environ={})
    client = httpx.AsyncClient(base_url="http://fake", transport=httpx.MockTransport(spy))
    c = Canary(s, BackgroundSampler(client, s), load_prompts(prompts_file), MemoryRounds(),
               models=lambda: ["smollm2"], revision=lambda m: "r")
    r = await c.run_round("smollm2", steer=Steering(prefill="```json\n{"), store=False)
    assert r is not None and all(p.formats == {"code": 5} for p in r.prompts)
    chats = [b for b in bodies if "n" in b]
    assert chats and all(b["continue_final_message"] and not b["add_generation_prompt"] for b in chats)
    assert all(b["messages"][-1] == {"role": "assistant", "content": "```json\n{"} for b in bodies if "messages" in b)
    plain = await c.run_round("smollm2", store=False)
    assert plain is not None and all("code" not in p.formats for p in plain.prompts)


async def test_a_new_revision_is_compared_with_the_previous_revisions_baseline(prompts_file: str) -> None:
    model = FakeModel(sharpness=0.4, seed=5)
    c = _canary(model, prompts_file)
    for _ in range(5):
        await c.run_round("smollm2", revision="rev-a")
    model.sharpness = 3.0  # post-training shipped as a new revision
    r = await c.run_round("smollm2", revision="rev-b")
    assert r is not None and r.verdict["state"] == "collapse", r.verdict["reasons"]
    assert r.verdict["against_revision"] == "rev-a"
    assert r.verdict["reasons"][0] == "baseline round 1 of 5 of revision rev-b: compared with revision rev-a's baseline"
    assert await c.rounds.revisions("smollm2") == ["rev-b", "rev-a"]
    assert len(await c.rounds.baseline("smollm2", "rev-b", 1.0, 5, 5)) == 1  # rev-b builds its own baseline
