"""The estimator against the fresh exact-entropy fixtures (``bench/data/exact``, made by bench/exact_entropy.py).

The medians below are what ``python -m bench.estimator_fresh`` measured on these fixtures, per held-out half,
with a 5% margin: a change to the estimator that loses accuracy fails here (assuming the default vocabulary
size instead of the model's 49,152, for one, raises the K=5 median by 8%). The issue's goals (0.25 nats at
K=5, 0.05 at K=20) are checked as well.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.estimator_fresh import (
    FIXTURES,
    KS,
    NUMERIC_TOLERANCE,
    evaluate,
    load_records,
    positions,
    report,
    signed_errors,
)
from bench.exact_entropy import PROMPTS, truncate_like_vllm

MEASURED_MEDIAN = {
    5: {"A": 0.05325, "B": 0.05546, "all": 0.05437},
    10: {"A": 0.02254, "B": 0.02395, "all": 0.02326},
    20: {"A": 0.01081, "B": 0.01009, "all": 0.01038},
}
MARGIN = 1.05
GOAL_MEDIAN = {5: 0.25, 20: 0.05}


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return load_records()


@pytest.fixture(scope="module")
def result() -> dict:
    return evaluate()


def test_fixtures_are_many_aligned_positions(records: list[dict]) -> None:
    meta = json.loads((FIXTURES / "meta.json").read_text())
    n = sum(len(r["token_ids"]) for r in records)
    assert n >= 2000 and n == meta["positions"]
    assert len({r["prompt_id"] for r in records}) >= 60
    assert meta["alignment"]["max_abs_diff_top"] < 1e-3
    for rec in records:
        t = len(rec["token_ids"])
        assert len(rec["top_logprobs"]) == len(rec["sampled_col"]) == len(rec["exact_entropy_nats"]) == t
        assert PROMPTS[rec["prompt_id"]][1] == rec["request"]["messages"][0]["content"]
        assert all(len(row) == 20 for row in rec["top_logprobs"])
        # vLLM's sampled logprob and the teacher-forced one are the same token at the same position.
        vllm = np.array([row[c] for row, c in zip(rec["top_logprobs"], rec["sampled_col"], strict=True)])
        assert np.abs(vllm - np.array(rec["exact_sampled_logprob"])).max() < 1e-3
        # The exact entropy is at least what the known entries already contribute (up to float noise).
        p = np.exp(np.array(rec["top_logprobs"]))
        assert np.all(-(p * np.log(p)).sum(axis=1) <= np.array(rec["exact_entropy_nats"]) + NUMERIC_TOLERANCE)


def test_truncation_keeps_sampled_first_then_rank_order(records: list[dict]) -> None:
    for row, col in zip(records[0]["top_logprobs"], records[0]["sampled_col"], strict=True):
        for k in (5, 10):
            got = truncate_like_vllm(row, col, k)
            assert len(got) == k and got[0] == row[col]
            assert got[1:] == sorted(got[1:], reverse=True)
            others = sorted((x for i, x in enumerate(row) if i != col), reverse=True)
            assert got[1:] == others[: k - 1]


@pytest.mark.parametrize("k", KS)
def test_bounds_cover_exact_entropy(records: list[dict], k: int) -> None:
    pos = positions(records, k)
    err = signed_errors(pos)
    assert pos.logprobs.shape == (pos.exact.size, k)
    # Within the float32 noise between vLLM and transformers; strict violations only where the top K hold
    # all but a few millionths of the mass, i.e. where the bounds pinch onto the noise.
    assert err["lower"].max() <= NUMERIC_TOLERANCE
    assert err["upper"].min() >= -NUMERIC_TOLERANCE
    strict = (err["lower"] > 0) | (err["upper"] < 0)
    assert np.all(err["tail_mass"][strict] < 1e-4)


@pytest.mark.parametrize("k", KS)
def test_point_estimate_medians(result: dict, k: int) -> None:
    for half in ("A", "B", "all"):
        s = result["by_k"][k][half]
        assert s["point"]["median"] <= MEASURED_MEDIAN[k][half] * MARGIN, (half, s["point"])
        # The tail model must beat ignoring the tail and either bound alone.
        assert s["point"]["median"] < s["lower"]["median"] < s["renormalised"]["median"]
        assert s["point"]["median"] < s["upper"]["median"]
    if k in GOAL_MEDIAN:
        assert result["by_k"][k]["all"]["point"]["median"] <= GOAL_MEDIAN[k]


def test_report_lists_every_k_and_half(result: dict) -> None:
    text = report(result)
    for k in KS:
        for half in ("A", "B", "all"):
            assert f"| {k} | {half} | {result['by_k'][k][half]['positions']} |" in text
