"""Recognition: ratio, surprise and self-check math, the diagnosis rule, and the probe against a fake upstream.

The fake upstream is a tiny deterministic "model" over single-character tokens (token id = code point): the
next-token distribution depends on the previous token only, sharp after a vowel and flat after anything else.
Its chat endpoint generates with logprobs from that distribution and its ``/v1/completions`` answers
``prompt_logprobs`` from the same one, so re-scoring reproduces generation-time entropy exactly.
"""

from __future__ import annotations

import logging
import math
import random

import anyio
import httpx
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitors.entropy import estimate_positions
from monitors.recognition import (
    Evidence,
    RecognitionTracker,
    bootstrap_ratio_interval,
    diagnose,
    input_surprise,
    recognition_ratio,
    rows_from_prompt_logprobs,
    score_rows,
    selfcheck,
)
from proxy.monitoring import Monitoring
from proxy.probe import Probe
from proxy.settings import load_settings
from tests.plugins.recorded import proxy_client
from tests.synthetic import observation, token_entropies

CHAT = "/v1/chat/completions"
MODEL = "smollm2"
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
EOS = "<|im_end|>"


# -- a fake vLLM -----------------------------------------------------------------------------------------------------
def dist(prev: int, k: int) -> list[tuple[str, float]]:
    """Top-k (token, logprob) after token ``prev``, rank order, a vowel first; 1 % of the mass in an unseen tail."""
    alpha = 2.5 if chr(prev) in "aeiou" else 0.15
    first = "aeiou"[prev % 5]
    cands = [first, *(c for c in (LETTERS[(prev * 7 + i) % 26] for i in range(26)) if c != first)][:k]
    w = np.exp(-alpha * np.arange(k))
    p = 0.99 * w / w.sum()
    return [(c, float(math.log(x))) for c, x in zip(cands, p, strict=True)]


def entry_logprob(prev: int, tok: str, k: int) -> float:
    return dict(dist(prev, 26)).get(tok, math.log(1e-4)) if len(tok) == 1 else math.log(1e-4)


def chat_ids(messages: list[dict[str, str]]) -> list[int]:
    return [ord(c) for c in "<" + "|".join(m["content"] for m in messages) + ">"]


def greedy_answer(prev: int, n: int) -> str:
    out = ""
    for _ in range(n):
        tok = dist(prev, 1)[0][0]
        out += tok
        prev = ord(tok)
    return out


class FakeVLLM:
    def __init__(self, answers: dict[str, str] | None = None, *, refuse: str | None = None,
                 max_logprobs: int = 20) -> None:
        self.answers = answers or {}
        self.refuse = refuse
        self.max_logprobs = max_logprobs
        self.paths: list[str] = []
        self.gate: anyio.Event | None = None  # when set, /tokenize waits for it
        self.open = 0
        self.max_open = 0

    def _json(self, obj: object, status: int = 200) -> httpx.Response:
        return httpx.Response(status, content=orjson.dumps(obj), headers={"content-type": "application/json"})

    def _err(self, status: int, msg: str) -> httpx.Response:
        return self._json({"error": {"message": msg, "type": "BadRequestError", "param": None, "code": status}},
                          status)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            if self.gate is not None:
                await self.gate.wait()
            return self.handle(request.url.path, orjson.loads(request.content) if request.content else {})
        finally:
            self.open -= 1

    def handle(self, path: str, body: dict) -> httpx.Response:  # type: ignore[type-arg]
        self.paths.append(path)
        if path == "/tokenize":
            if self.refuse == "tokenize":
                return self._err(404, "Not Found")
            ids = chat_ids(body["messages"]) if "messages" in body else [ord(c) for c in body["prompt"]]
            return self._json({"count": len(ids), "max_model_len": 2048, "tokens": ids, "token_strs": None})
        if path == "/v1/completions":
            k = body["prompt_logprobs"]
            if k > self.max_logprobs:
                return self._err(400, f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                                      f"{self.max_logprobs}")
            if self.refuse == "reject":
                return self._err(400, "prompt_logprobs is not supported by this server")
            ids = body["prompt"]
            plp: list[object] = [None]
            for prev, cur in zip(ids, ids[1:], strict=False):
                e = {str(ord(t)): {"logprob": lp, "rank": r + 1, "decoded_token": t}
                     for r, (t, lp) in enumerate(dist(prev, k))}
                if str(cur) not in e:
                    e[str(cur)] = {"logprob": entry_logprob(prev, chr(cur), k), "rank": 99, "decoded_token": chr(cur)}
                plp.append(e)
            choice = {"index": 0, "text": "x", "finish_reason": "length", "logprobs": None}
            if self.refuse != "ignore":
                choice["prompt_logprobs"] = plp
            return self._json({"id": "cmpl-1", "object": "text_completion", "model": MODEL, "choices": [choice]})
        if path == CHAT:
            ids = chat_ids(body["messages"])
            text = self.answers.get(body["model"]) or greedy_answer(ids[-1], 12)
            k = body.get("top_logprobs") or 0
            content, prev = [], ids[-1]
            for tok in [*text, EOS]:
                top = [{"token": t, "logprob": lp, "bytes": None} for t, lp in dist(prev, k)]
                lp = entry_logprob(prev, tok, k)
                if all(e["token"] != tok for e in top):
                    top = [{"token": tok, "logprob": lp, "bytes": None}, *top[: k - 1]]
                content.append({"token": tok, "logprob": lp, "bytes": None, "top_logprobs": top})
                prev = ord(tok[0])
            n = len(self.paths)
            return self._json({
                "id": f"chatcmpl-{n}", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": {"content": content} if body.get("logprobs") else None,
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(text) + 1},
            })
        return self._err(404, "Not Found")


def _question(i: int) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"question {i}: say something"}]}


def _probe_settings(**kw: object) -> dict[str, object]:
    return {"probe.sample_rate": 1.0, **kw}


COMPONENTS = ("proxy.metrics", "proxy.probe")


def _sample(exposition: str, name: str, **labels: str) -> float | None:
    for fam in text_string_to_metric_families(exposition):
        for smp in fam.samples:
            if smp.name == name and all(smp.labels.get(k) == v for k, v in labels.items()):
                return float(smp.value)
    return None


# -- scoring math ----------------------------------------------------------------------------------------------------
def test_rows_from_prompt_logprobs_finds_the_actual_token_and_pads() -> None:
    entries = [
        None,
        {"5": {"logprob": -0.1, "rank": 1, "decoded_token": "a"}, "7": {"logprob": -2.5, "rank": 2}},
        {"9": {"logprob": -0.01, "rank": 1}, "3": {"logprob": -6.0, "rank": 40}},
    ]
    lp, col, actual = rows_from_prompt_logprobs(entries, [1, 7, 3])
    assert lp.shape == (3, 2) and np.all(np.isnan(lp[0]))
    assert col.tolist() == [-1, 1, 1]
    assert np.isnan(actual[0]) and actual[1:].tolist() == [-2.5, -6.0]
    with pytest.raises(ValueError):
        rows_from_prompt_logprobs(entries, [1, 2])
    s = score_rows(lp, col, actual, vocab_size=100)
    assert s.tokens == 2  # the row without entries is dropped
    assert s.surprise.tolist() == [2.5, 6.0] and s.mean_surprise == pytest.approx(4.25)
    assert np.all(s.lower <= s.entropies) and np.all(s.entropies <= s.upper)


def test_input_surprise_is_minus_logprob_and_inf_for_the_sentinel() -> None:
    s = input_surprise(np.array([-0.5, 0.0, -9999.0, np.nan]))
    assert s[0] == 0.5 and s[1] == 0.0 and math.isinf(s[2]) and np.isnan(s[3])


def _full_rows(p: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lp = np.log(p)
    rows = np.tile(lp, (tokens.size, 1))
    return rows, tokens.astype(np.int64), lp[tokens]


def test_surprise_of_own_samples_is_entropy_and_of_foreign_text_cross_entropy() -> None:
    """E_p[-log p(x)] = H(p); E_q[-log p(x)] = H(q) + KL(q||p) (scipy-style identities, full vocabulary)."""
    rng = np.random.default_rng(3)
    v = 12
    p = rng.dirichlet(np.ones(v) * 0.5)
    q = rng.dirichlet(np.ones(v) * 2.0)
    h_p = float(-(p * np.log(p)).sum())
    cross = float(-(q * np.log(p)).sum())
    n = 20_000
    own = score_rows(*_full_rows(p, rng.choice(v, n, p=p)), vocab_size=v)
    foreign = score_rows(*_full_rows(p, rng.choice(v, n, p=q)), vocab_size=v)
    assert own.entropies == pytest.approx(np.full(n, h_p), abs=1e-9)  # nothing missing: the estimate is exact
    sd = float(np.sqrt(np.var(-np.log(p)[rng.choice(v, n, p=p)]) / n))
    assert abs(own.mean_surprise - h_p) < 4 * sd
    assert foreign.mean_surprise == pytest.approx(cross, abs=0.05)
    assert foreign.mean_surprise > own.mean_surprise  # text the model would not write surprises it more


def test_selfcheck_aligned_dropped_eos_and_misaligned() -> None:
    g = np.array([0.1, 0.5, 1.0, 2.0])
    r = np.array([0.12, 0.45, 1.0])
    c = selfcheck(g, r, drop_last_generated=True)
    assert c.aligned and c.mean_abs_diff == pytest.approx((0.02 + 0.05 + 0.0) / 3)
    assert c.max_abs_diff == pytest.approx(0.05)
    m = selfcheck(g, r)  # without the end-of-turn rule the lengths differ
    assert not m.aligned and m.mean_abs_diff is None
    assert m.mean_diff == pytest.approx(r.mean() - g.mean())


def test_recognition_ratio_and_its_guards() -> None:
    assert recognition_ratio(1.2, 0.4) == pytest.approx(3.0)
    assert recognition_ratio(1.0, 0.0) is None and recognition_ratio(1.0, 1e-5) is None
    assert recognition_ratio(math.nan, 1.0) is None and recognition_ratio(1.0, math.inf) is None


def test_tracker_ratio_of_means_baseline_and_rise() -> None:
    t = RecognitionTracker(window=10, baseline_pairs=4, min_pairs=3)
    t.add_pair(0.0, 1.0)  # a deterministic on-policy answer cannot blow the ratio up
    t.add_pair(1.0, 1.0)
    assert t.ratio() is None  # fewer than min_pairs
    t.add_pair(1.0, 1.0)
    assert t.ratio() == pytest.approx(3.0 / 2.0)
    t.add_pair(0.0, 1.0)
    assert t.baseline() == pytest.approx(4.0 / 2.0) and t.rise() is None  # no pair after the baseline yet
    for _ in range(3):
        t.add_pair(0.25, 1.0)  # on-policy entropy fell, off-policy did not
    assert t.rise() == pytest.approx((1.0 / 0.25) / 2.0)  # only post-baseline pairs count
    t.add_pair(math.nan, 1.0)
    assert t.total_pairs == 7
    lo, hi = t.interval() or (0.0, 0.0)
    assert lo <= t.ratio() <= hi  # type: ignore[operator]


def test_bootstrap_interval_brackets_the_ratio_and_narrows_with_more_pairs() -> None:
    rng = np.random.default_rng(5)
    on = rng.gamma(4.0, 0.1, 400)
    off = on * 2.0 + rng.normal(0.0, 0.05, 400)
    small = bootstrap_ratio_interval(on[:20].tolist(), off[:20].tolist())
    big = bootstrap_ratio_interval(on.tolist(), off.tolist())
    point = float(off.mean() / on.mean())
    assert small and big and big[0] <= point <= big[1] and abs(point - 2.0) < 0.05
    assert big[1] - big[0] < small[1] - small[0]
    assert bootstrap_ratio_interval([1.0], [2.0]) is None


# -- the decision rule -----------------------------------------------------------------------------------------------
DOWN = {"collapse_score": 0.7, "entropy_fall": 1.0, "forking_fall": 0.6}


RISE = {"recognition_ratio": 3.0, "recognition_rise": 2.0, "recognition_rise_interval": (1.4, 2.6)}


@pytest.mark.parametrize(("evidence", "state", "because"), [
    ({}, "healthy", "steady"),
    ({"collapse_score": 0.3, "psi": 0.1, "js": 0.01}, "healthy", "steady"),
    ({"collapse_score": 0.1, "psi": 0.4}, "drift", "PSI"),
    ({"collapse_score": 0.1, "js": 0.2}, "drift", "JS"),
    ({**DOWN, "diversity_fall": 0.6}, "collapse", "narrowed"),
    ({**DOWN, "diversity_fall": 0.6, **RISE}, "collapse", "narrowed"),
    # a rise whose interval lies above 1: the model sharpened on its own samples relative to foreign text
    ({**DOWN, **RISE}, "recognition", "sharpened on its own samples"),
    # the ratio held (its interval holds 1): both sides fell together, and they share the prompt: the traffic
    ({**DOWN, "diversity_fall": 0.0, "recognition_ratio": 1.0, "recognition_rise": 1.05,
      "recognition_rise_interval": (0.9, 1.2)}, "drift", "traffic"),
    # a rise of 1.3 that chance explains is not evidence (the old rule read it as recognition)
    ({**DOWN, "recognition_ratio": 1.3, "recognition_rise": 1.3, "recognition_rise_interval": (0.8, 1.9)},
     "drift", "holds 1"),
    # a rise without an interval (too few pairs) is not read at all
    ({**DOWN, "recognition_ratio": 3.0, "recognition_rise": 2.0}, "collapse", "cannot rule out"),
    ({**DOWN, "diversity_fall": 0.1}, "recognition", "behaviour steady"),
    (DOWN, "collapse", "cannot rule out"),
    ({**DOWN, "psi": 1.0, "diversity_fall": 0.0}, "recognition", "behaviour steady"),
])
def test_diagnose(evidence: dict[str, float], state: str, because: str) -> None:
    d = diagnose(Evidence(**evidence))
    assert d.state == state
    assert any(because in r for r in d.reasons), d.reasons


def test_monitoring_feeds_the_probe_ratio_into_the_state() -> None:
    """Synthetic traffic, then a fall of entropy with diversity steady: the ratio decides between the readings."""
    mon = Monitoring(load_settings({"upstream": "http://u", "models": ["m"], "monitors.window": 200,
                                    "monitors.baseline": 10_000}, environ={}))
    rng = np.random.default_rng(12)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()

    def feed(n: int, scale: float) -> None:
        for _ in range(n):
            text = " ".join(words[i] for i in rng.integers(0, len(words), 30))
            mon.observe(observation(token_entropies(rng, 128, scale), text, prompt=f"p{rng.integers(0, 20)}"))
            mon.process_pending()

    feed(600, 1.0)
    assert mon.models["m"].state() == "healthy"
    feed(150, 0.5)
    assert mon.models["m"].state() == "recognition"  # no probe yet: diversity steady decides
    mon.set_recognition_ratio("m", 0.9)
    mon.set_recognition_rise("m", 1.0, (0.85, 1.15))
    st = mon.status()["models"]["m"]
    assert st["state"] == "drift" and st["recognition_ratio"] == 0.9 and st["recognition_rise"] == 1.0
    assert st["recognition_rise_interval"] == [0.85, 1.15]
    assert any("the traffic changed" in r for r in st["diagnosis"])
    mon.set_recognition_rise("m", 1.6, (1.3, 1.9))
    assert mon.status()["models"]["m"]["state"] == "recognition"
    mon.set_recognition_rise("m", 1.6, (0.9, 2.4))  # the same rise, but chance explains it
    assert mon.status()["models"]["m"]["state"] == "drift"


def test_the_rise_interval_gates_chance_rises() -> None:
    """With the per-pair spread seen on the real model (per-pair ratios 0.4-1.5), a rise >= 1.25 over a 20-pair
    baseline appears by chance in many runs of 5 pairs; the interval claims a rise in few of them."""
    rng = np.random.default_rng(3)
    old_rule = gated = 0
    runs = 200
    for _ in range(runs):
        t = RecognitionTracker(window=50, baseline_pairs=20, min_pairs=5)
        for _ in range(25):  # nothing changes: every pair from the same distribution
            h_on = float(rng.gamma(6.0, 2.33 / 6.0))
            t.add_pair(h_on, h_on * float(rng.lognormal(math.log(0.67), 0.35)))
        rise, ci = t.rise(), t.rise_interval(seed=int(rng.integers(1 << 30)))
        assert rise is not None and ci is not None and ci[0] <= rise <= ci[1]
        old_rule += rise >= 1.25
        gated += ci[0] > 1.0
    assert old_rule / runs > 0.08  # what the old rule claimed
    assert gated / runs <= 0.06  # a 95 % interval: about one run in forty claims a rise, one in forty a fall
    t = RecognitionTracker(window=50, baseline_pairs=20, min_pairs=5)
    for i in range(40):  # a real rise: on-policy entropy halves after the baseline
        h_on = float(rng.gamma(6.0, 2.33 / 6.0))
        t.add_pair(h_on * (0.5 if i >= 20 else 1.0), h_on * float(rng.lognormal(math.log(0.67), 0.35)))
    ci = t.rise_interval()
    assert ci is not None and ci[0] > 1.0


# -- the probe, with the fake upstream -------------------------------------------------------------------------------
async def test_probe_reproduces_generation_entropy_and_measures_a_reference() -> None:
    fake = FakeVLLM()
    async with proxy_client(fake, COMPONENTS, **_probe_settings()) as c:
        probe: Probe = c.app.state.probe  # type: ignore[attr-defined]
        ids, tokens = [], []
        for i in range(4):
            r = await c.post(CHAT, json=_question(i))
            assert r.status_code == 200
            ids.append(r.headers["x-entropy-request-id"])
            tokens.append(r.json()["choices"][0]["entropy"]["tokens"])
        assert await probe.wait_idle(10)
        assert probe.counts["sampled"] == 4 and probe.counts["scored"] == 4
        assert probe.selfcheck_value(MODEL) == pytest.approx(0.0, abs=1e-9)
        # A consonant-heavy reference: flat distributions after consonants, so off-policy entropy is higher.
        assert probe.submit_reference(ids[0], "the quick brown fox jumps")
        assert not probe.submit_reference("unknown-id", "text")
        assert await probe.wait_idle(10)
        res = probe.results[ids[0]]
        assert res.off is not None and res.off["source"] == "reference"
        assert res.ratio == pytest.approx(res.off["mean_entropy"] / res.on["mean_entropy"], rel=1e-4)
        assert res.ratio is not None and res.ratio > 1.5
        assert res.off["input_surprise"] > res.on["input_surprise"]
        # The generation-time list ends with the end-of-turn token, which is not part of the text: left out.
        assert res.selfcheck["aligned"] and res.selfcheck["rescored_tokens"] == tokens[0] - 1
        metrics = (await c.get("/metrics")).text
        assert _sample(metrics, "entropy_proxy_probe_selfcheck_abs_diff", model=MODEL) == pytest.approx(0, abs=1e-9)
        assert _sample(metrics, "entropy_proxy_probe_total", outcome="scored") == 5
        assert _sample(metrics, "entropy_proxy_probe_input_surprise_nats", model=MODEL, policy="off") == \
            pytest.approx(res.off["input_surprise"], abs=1e-4)
        status = (await c.get("/v1/entropy/status")).json()
        assert status["probe"]["enabled"] and status["probe"]["models"][MODEL]["pairs"] == 1
        assert "diagnosis" in status["models"][MODEL]
    assert fake.paths.count(CHAT) == 4  # re-scoring never generates through the chat route


async def test_off_policy_model_pairs_every_sample_and_publishes_the_ratio() -> None:
    fake = FakeVLLM(answers={"other": "the quick brown fox"})
    async with proxy_client(fake, COMPONENTS, **_probe_settings(**{"probe.off_policy_model": "other"})) as c:
        probe: Probe = c.app.state.probe  # type: ignore[attr-defined]
        for i in range(6):
            await c.post(CHAT, json=_question(i))
        assert await probe.wait_idle(10)
        summary = probe.status()["models"][MODEL]
        assert summary["pairs"] == 6 and summary["ratio"] > 1.5
        metrics = (await c.get("/metrics")).text
        assert _sample(metrics, "entropy_proxy_recognition_ratio", model=MODEL) == pytest.approx(summary["ratio"],
                                                                                                abs=1e-4)
        assert c.app.state.monitoring.recognition[MODEL] == pytest.approx(summary["ratio"], abs=1e-4)  # type: ignore
    assert fake.paths.count(CHAT) == 12  # 6 client requests + 6 off-policy answers, straight to the upstream


async def test_the_same_model_is_not_foreign_text() -> None:
    """An "other" answer from the model itself would give a ratio of about 1 by construction: no pair is formed."""
    fake = FakeVLLM()
    async with proxy_client(fake, COMPONENTS, **_probe_settings(**{"probe.off_policy_model": MODEL})) as c:
        probe: Probe = c.app.state.probe  # type: ignore[attr-defined]
        for i in range(5):
            await c.post(CHAT, json=_question(i))
        assert await probe.wait_idle(10)
        summary = probe.status()["models"][MODEL]
        assert probe.counts["scored"] == 5 and summary["pairs"] == 0 and summary["ratio"] is None
        assert "entropy_proxy_recognition_ratio{" not in (await c.get("/metrics")).text
    assert fake.paths.count(CHAT) == 5  # no "other" answer was asked for


@pytest.mark.parametrize("refuse", ["tokenize", "reject", "ignore"])
async def test_probe_stops_cleanly_when_the_upstream_refuses(refuse: str, caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeVLLM(refuse=refuse)
    with caplog.at_level(logging.WARNING, logger="entropy_proxy.probe"):
        async with proxy_client(fake, COMPONENTS, **_probe_settings()) as c:
            probe: Probe = c.app.state.probe  # type: ignore[attr-defined]
            for i in range(5):
                r = await c.post(CHAT, json=_question(i))
                assert r.status_code == 200 and r.json()["choices"][0]["entropy"]["tokens"] > 0
                await probe.wait_idle(10)
            metrics = (await c.get("/metrics")).text
    assert not probe.enabled and probe.refused
    assert probe.counts["refused"] == 1 and probe.counts["sampled"] == 1  # nothing sampled after the refusal
    assert _sample(metrics, "entropy_proxy_probe_enabled") == 0
    assert [r.message for r in caplog.records].count(f"recognition probe disabled: {probe.refused}") == 1


async def test_probe_learns_a_lower_prompt_logprobs_limit() -> None:
    fake = FakeVLLM(max_logprobs=5)
    async with proxy_client(fake, COMPONENTS, **_probe_settings()) as c:
        probe: Probe = c.app.state.probe  # type: ignore[attr-defined]
        await c.post(CHAT, json=_question(1))
        assert await probe.wait_idle(10)
    assert probe.counts["scored"] == 1 and probe.enabled
    # Scored with K=5 while generation used K=20: the estimate differs a little, but stays close.
    assert probe.selfcheck_value(MODEL) is not None and probe.selfcheck_value(MODEL) < 0.5  # type: ignore[operator]


def _obs(i: int, endpoint: str = "chat", text: str = "abc") -> object:
    o = observation(np.array([0.1, 0.2, 0.3]), text, model=MODEL, prompt="q", request_id=f"r{i}")
    o.endpoint = endpoint
    return o


async def test_queue_is_bounded_and_concurrency_respected() -> None:
    fake = FakeVLLM()
    fake.gate = anyio.Event()
    s = load_settings({"upstream": "http://u", "models": [MODEL], "probe.sample_rate": 1.0,
                       "probe.concurrency": 2}, environ={})
    async with httpx.AsyncClient(transport=httpx.MockTransport(fake), base_url="http://u") as client:
        probe = Probe(s, lambda: client, queue_size=3)
        async with probe.running():
            await anyio.sleep(0.05)  # let both workers reach their receive
            for i in range(20):
                probe.observe(_obs(i))  # type: ignore[arg-type]
            await anyio.sleep(0.1)
            # 2 jobs taken by the workers (blocked upstream), 3 waiting, the rest dropped.
            assert probe.counts["sampled"] == 20 and probe.counts["dropped"] == 15
            assert fake.open == 2
            fake.gate.set()
            assert await probe.wait_idle(10)
        assert probe.counts["scored"] == 5 and fake.max_open == 2


async def test_sampling_rate_and_what_is_never_sampled() -> None:
    s = load_settings({"upstream": "http://u", "probe.sample_rate": 0.3}, environ={})
    probe = Probe(s, lambda: None, rng=random.Random(1), queue_size=10_000)  # type: ignore[arg-type,return-value]
    send, recv = anyio.create_memory_object_stream[object](10_000)
    probe._send = send
    for i in range(2_000):
        probe.observe(_obs(i))  # type: ignore[arg-type]
    n = probe.counts["sampled"]
    assert abs(n - 600) < 4 * math.sqrt(2_000 * 0.3 * 0.7)
    probe.observe(_obs(9_001, endpoint="completions"))  # type: ignore[arg-type]
    probe.observe(_obs(9_002, text=""))  # type: ignore[arg-type]
    assert probe.counts["sampled"] == n and "r9001" not in probe.recent and "r9002" not in probe.recent
    assert len(probe.recent) == 1024  # bounded memory of recent responses
    send.close()
    recv.close()


async def test_rate_zero_installs_nothing_on_the_request_path() -> None:
    fake = FakeVLLM()
    async with proxy_client(fake, COMPONENTS) as c:
        probe: Probe = c.app.state.probe  # type: ignore[attr-defined]
        r = await c.post(CHAT, json=_question(0))
        assert probe not in c.app.state.hub.observers  # type: ignore[attr-defined]
        assert not probe.submit_reference(r.headers["x-entropy-request-id"], "text")
        assert (await c.get("/v1/entropy/status")).json()["probe"]["enabled"] is False
    assert fake.paths == [CHAT]


def test_estimator_is_the_proxy_one() -> None:
    """score_rows is estimate_positions with the actual token as the sampled column (same numbers as the proxy)."""
    rows = np.array([[-0.2, -2.0, -3.0], [-1.0, -1.5, -4.0]])
    col = np.array([2, 0])
    s = score_rows(rows, col, np.array([-3.0, -1.0]), vocab_size=1000)
    ref = estimate_positions(rows, 1000, sampled_col=col)
    assert s.entropies.tolist() == ref.point.tolist()
