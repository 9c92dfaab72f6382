"""The values of the `entropy` summary (CONTRACT §3.2), against computations written here from the definitions.

Nothing below calls the code under test to get an expected value: entropies come from full distributions
(``-sum p log p``, where every bound equals the exact entropy), percentiles and means are computed by hand.
Definitions: ``mean``/``max`` over generated tokens; ``p90`` the 90th percentile with linear interpolation
between order statistics (numpy's default, Hyndman-Fan type 7); ``mean_logprob`` the mean sampled logprob
(vLLM's -9999 sentinel as is), ``confidence = exp(mean_logprob)``; ``min_token_prob`` the smallest sampled
probability (0 for the sentinel); ``low_confidence_tokens`` the sampled tokens with probability below
``low_confidence_prob``; forking tokens those with entropy above the forking threshold; flags: ``confident``
mean <= ``confident_mean``, ``uncertain`` mean >= ``uncertain_mean``, ``forking_heavy`` forking fraction >=
``forking_heavy_fraction``, ``truncated_tail`` mean missing top-K mass >= ``tail_mass``. Values rounded to 4
decimals.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitors.summary import SummaryThresholds, summarize
from proxy.annotate import Annotator, ResponseAnnotator
from proxy.rewrite import ClientAsk

ROUNDING = 0.5e-4 + 1e-9  # a value rounded to 4 decimals is within half a unit of the last place


def p90(xs: list[float]) -> float:
    s = sorted(xs)
    h = (len(s) - 1) * 0.9
    lo = math.floor(h)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (h - lo) * (s[hi] - s[lo])


def close(got: float | None, want: float) -> bool:
    return got is not None and abs(got - want) <= ROUNDING


# -- monitors/summary.py ------------------------------------------------------------------------------------------
DEFAULT = SummaryThresholds()


def _summ(point, lp, tail=None, thr=DEFAULT, fork=0.672):
    point = np.asarray(point, dtype=np.float64)
    tail = np.zeros_like(point) if tail is None else np.asarray(tail, dtype=np.float64)
    return summarize(point, point - 0.1, point + 0.1, tail, np.asarray(lp, dtype=np.float64),
                     forking_threshold=fork, thresholds=thr, estimator="e", top_k=20)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 8.0), st.floats(-20.0, 0.0)), min_size=1, max_size=60),
       st.floats(0.0, 3.0))
def test_summary_values_match_the_definitions(rows, fork):
    ent = [h for h, _ in rows]
    lps = [lp for _, lp in rows]
    s = _summ(ent, lps, fork=fork)
    n = len(rows)
    mean = sum(ent) / n
    mean_lp = sum(lps) / n
    probs = [math.exp(x) for x in lps]
    forking = sum(1 for h in ent if h > fork)
    assert s["tokens"] == n
    assert close(s["mean"], mean) and close(s["max"], max(ent)) and close(s["p90"], p90(ent))
    assert close(s["mean_lower"], mean - 0.1) and close(s["mean_upper"], mean + 0.1)
    assert close(s["mean_logprob"], mean_lp) and close(s["confidence"], math.exp(mean_lp))
    assert close(s["min_token_prob"], min(probs))
    assert s["low_confidence_tokens"] == sum(1 for p in probs if p < 0.1)
    assert s["forking_tokens"] == forking and close(s["forking_fraction"], forking / n)


def test_the_sentinel_counts_as_probability_zero():
    s = _summ([0.5, 0.5], [-9999.0, math.log(0.5)])
    assert s["min_token_prob"] == 0.0 and s["low_confidence_tokens"] == 1
    assert close(s["mean_logprob"], (-9999.0 + math.log(0.5)) / 2) and s["confidence"] == 0.0


def test_p90_interpolates_between_order_statistics():
    ent = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]  # h = 9: exactly the 10th value
    assert _summ(ent, [0.0] * 11)["p90"] == 9.0
    assert _summ([0.0, 1.0], [0.0, 0.0])["p90"] == 0.9  # h = 0.9 between 0 and 1
    assert _summ([2.0], [0.0])["p90"] == 2.0


@pytest.mark.parametrize(("flag", "field", "at"), [
    ("confident", "confident_mean", "mean"), ("uncertain", "uncertain_mean", "mean"),
    ("truncated_tail", "tail_mass", "tail"),
])
def test_each_mean_flag_is_inclusive_at_its_threshold(flag, field, at):
    value = 0.75  # exact in binary: the mean of [0.5, 1.0]
    pair = [0.5, 1.0]
    for thr, want in ((value, True), (math.nextafter(value, -1.0), flag == "uncertain" or flag == "truncated_tail"),
                      (math.nextafter(value, 2.0), flag == "confident")):
        t = SummaryThresholds(**{field: thr})
        if at == "mean":
            s = _summ(pair, [0.0, 0.0], thr=t, fork=10.0)
        else:
            s = _summ([5.0, 5.0], [0.0, 0.0], tail=pair, thr=t, fork=10.0)
        assert (flag in s["flags"]) is want, (thr, s["flags"])


def test_forking_is_strictly_above_the_threshold_and_heavy_is_inclusive():
    ent = [0.5, 0.5, 1.0, 1.0]  # two tokens fork above 0.5; fraction 0.5
    s = _summ(ent, [0.0] * 4, fork=0.5, thr=SummaryThresholds(forking_heavy_fraction=0.5))
    assert s["forking_tokens"] == 2 and "forking_heavy" in s["flags"]
    s = _summ(ent, [0.0] * 4, fork=0.5, thr=SummaryThresholds(forking_heavy_fraction=math.nextafter(0.5, 1.0)))
    assert "forking_heavy" not in s["flags"]
    assert _summ(ent, [0.0] * 4, fork=1.0)["forking_tokens"] == 0  # equal to the threshold: not forking


def test_low_confidence_is_strictly_below_its_probability():
    lp = [math.log(0.25), math.log(0.5)]
    assert _summ([1.0, 1.0], lp, thr=SummaryThresholds(low_confidence_prob=math.exp(lp[0])))[
        "low_confidence_tokens"] == 0
    assert _summ([1.0, 1.0], lp, thr=SummaryThresholds(low_confidence_prob=math.nextafter(math.exp(lp[0]), 1.0)))[
        "low_confidence_tokens"] == 1


def test_no_tokens_gives_nulls_and_no_flags():
    s = _summ([], [])
    assert s["tokens"] == 0 and s["flags"] == [] and s["forking_tokens"] == 0 and s["low_confidence_tokens"] == 0
    assert all(s[k] is None for k in ("mean", "max", "p90", "confidence", "min_token_prob", "mean_logprob"))


# -- proxy/annotate.py: whole bodies and streams, from distributions whose entropy is exact ------------------------
@st.composite
def responses(draw: st.DrawFn):
    n = draw(st.integers(1, 24))
    positions = []
    for _ in range(n):
        w = draw(st.lists(st.floats(0.01, 1.0), min_size=1, max_size=6))
        tail = draw(st.sampled_from([0.0, 0.0, 0.31, 0.62]))  # unseen mass; n <= 24 never puts the mean at 0.25 exactly
        p = [x / sum(w) * (1.0 - tail) for x in w]
        positions.append((p, draw(st.integers(0, len(p) - 1))))
    return positions


def _chat_body(positions) -> dict:
    content = []
    for j, (p, s) in enumerate(positions):
        order = [s, *sorted((i for i in range(len(p)) if i != s), key=lambda i: -p[i])]  # vLLM: sampled first
        top = [{"token": f"t{j}.{i}", "logprob": math.log(p[i]), "bytes": None} for i in order]
        content.append({"token": f"t{j}.{s}", "logprob": math.log(p[s]), "bytes": None, "top_logprobs": top})
    return {"id": "chatcmpl-x", "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"},
                                            "logprobs": {"content": content}, "finish_reason": "stop"}]}


def _annotator(thr: SummaryThresholds, fork: float) -> Annotator:
    return Annotator(thr, 10, lambda model: fork)


def _ask(stream: bool) -> ClientAsk:
    return ClientAsk(endpoint="chat", model="m", stream=stream, n=1, logprobs=False, top=0, echo=False,
                     prompt_logprobs=False, include_usage=False, detail_tokens=True, prompt=[])


def _annotate_body(positions, thr=DEFAULT, fork=0.672) -> dict:
    body = _chat_body(positions)
    ra = ResponseAnnotator(_annotator(thr, fork), _ask(False), 6, "m")
    ra.annotate_body(body)
    return body["choices"][0]["entropy"]


def _annotate_stream(positions, thr=DEFAULT, fork=0.672) -> dict:
    content = _chat_body(positions)["choices"][0]["logprobs"]["content"]
    ra = ResponseAnnotator(_annotator(thr, fork), _ask(True), 6, "m")
    last: dict = {}
    for j, pos in enumerate(content):
        finish = "stop" if j == len(content) - 1 else None
        chunk = {"id": "chatcmpl-x", "choices": [{"index": 0, "delta": {"content": "x"},
                                                  "logprobs": {"content": [pos]}, "finish_reason": finish}]}
        ra.annotate_chunk(chunk)
        last = chunk["choices"][0]["entropy"]
    return last


def _expected(positions, fork: float) -> dict:
    full = [sum(p) > 0.999 for p, _ in positions]
    ent = [-sum(x * math.log(x) for x in p) for p, _ in positions]
    lps = [math.log(p[s]) for p, s in positions]
    n = len(positions)
    forking = sum(1 for h in ent if h > fork)
    return {"full": all(full), "ent": ent, "mean": sum(ent) / n, "max": max(ent), "p90": p90(ent),
            "mean_logprob": sum(lps) / n, "confidence": math.exp(sum(lps) / n),
            "min_token_prob": min(math.exp(x) for x in lps),
            "low": sum(1 for x in lps if math.exp(x) < 0.1), "forking": forking, "fraction": forking / n,
            "tail": sum(1.0 - sum(p) for p, _ in positions) / n}


@settings(max_examples=80, deadline=None)
@given(responses(), st.floats(0.0, 1.5), st.booleans())
def test_annotation_values_match_the_definitions(positions, fork, stream):
    ent = (_annotate_stream if stream else _annotate_body)(positions, fork=fork)
    want = _expected(positions, fork)
    assert ent["tokens"] == len(positions) and ent["top_k"] == 6
    if want["full"]:  # every distribution fully listed: the per-token values are the exact entropies
        assert all(close(g, w) for g, w in zip(ent["per_token"], want["ent"], strict=True))
        assert close(ent["mean"], want["mean"]) and close(ent["max"], want["max"]) and close(ent["p90"], want["p90"])
        assert ent["forking_tokens"] == want["forking"] and close(ent["forking_fraction"], want["fraction"])
    assert close(ent["mean_logprob"], want["mean_logprob"]) and close(ent["confidence"], want["confidence"])
    assert close(ent["min_token_prob"], want["min_token_prob"])
    assert ent["low_confidence_tokens"] == want["low"]
    assert ("truncated_tail" in ent["flags"]) is (want["tail"] >= 0.25)


@pytest.mark.parametrize("stream", [False, True])
def test_annotation_flags_flip_at_their_thresholds(stream):
    positions = [([0.5, 0.5], 0), ([0.25] * 4, 1), ([0.9, 0.1], 1), ([0.6, 0.2], 0)]  # the last: 0.2 unseen
    ann = _annotate_stream if stream else _annotate_body
    ent_full = [-sum(x * math.log(x) for x in p) for p, _ in positions[:3]]
    tail = 0.2 / 4
    eps = 1e-9
    base = ann(positions)
    mean = base["mean"]  # the 4th token's entropy is a point estimate: take the mean the proxy reported
    assert all(close(g, w) for g, w in zip(base["per_token"][:3], ent_full, strict=True))
    assert "confident" in ann(positions, SummaryThresholds(confident_mean=mean + ROUNDING + eps))["flags"]
    assert "confident" not in ann(positions, SummaryThresholds(confident_mean=mean - ROUNDING - eps))["flags"]
    assert "uncertain" in ann(positions, SummaryThresholds(uncertain_mean=mean - ROUNDING - eps))["flags"]
    assert "uncertain" not in ann(positions, SummaryThresholds(uncertain_mean=mean + ROUNDING + eps))["flags"]
    assert "truncated_tail" in ann(positions, SummaryThresholds(tail_mass=tail - eps))["flags"]
    assert "truncated_tail" not in ann(positions, SummaryThresholds(tail_mass=tail + eps))["flags"]
    # forking at log 2 (the first token): strictly above the threshold forks
    lo, hi = math.log(2) - eps, math.log(2) + eps
    n_lo = ann(positions, fork=lo)["forking_tokens"]
    n_hi = ann(positions, fork=hi)["forking_tokens"]
    assert n_lo == n_hi + 1
    frac = n_lo / 4
    assert "forking_heavy" in ann(positions, SummaryThresholds(forking_heavy_fraction=frac), fork=lo)["flags"]
    assert "forking_heavy" not in ann(positions, SummaryThresholds(forking_heavy_fraction=frac + eps),
                                      fork=lo)["flags"]
    # low confidence: sampled probabilities 0.5, 0.25, 0.1, 0.6
    assert ann(positions, SummaryThresholds(low_confidence_prob=0.25 + eps))["low_confidence_tokens"] == 2
    assert ann(positions, SummaryThresholds(low_confidence_prob=0.25 - eps))["low_confidence_tokens"] == 1
    assert close(base["min_token_prob"], 0.1)
    assert close(base["confidence"], math.exp((math.log(0.5) + math.log(0.25) + math.log(0.1) + math.log(0.6)) / 4))
