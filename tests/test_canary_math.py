"""Canary math: pass@k (unbiased form), the Student quantile, per-prompt measures, interval decisions on
synthetic rounds (no change: no claim; a change: the claim, with its interval)."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest

from monitors.canary import PromptRound, measure_prompt, pass_at_k, pass_k_for, ratio_of_means, round_measures
from monitors.canary_diagnosis import compare, diagnose_canary, t_quantile
from monitors.formats import FORMATS


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_is_the_share_of_k_subsets_holding_a_correct_sample(n: int) -> None:
    for c in range(n + 1):
        flags = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(combinations(flags, k))
            assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)
        assert pass_at_k(n, c, 1) == pytest.approx(c / n)


@pytest.mark.parametrize("n, k, p", [(5, 3, 0.3), (10, 4, 0.1), (4, 2, 0.8)])
def test_pass_at_k_is_unbiased(n: int, k: int, p: float) -> None:
    # E over c ~ Binomial(n, p) of the estimator equals the true pass@k = 1 - (1 - p)^k; the naive plug-in
    # 1 - (1 - c/n)^k does not.
    pmf = [math.comb(n, c) * p**c * (1 - p) ** (n - c) for c in range(n + 1)]
    expected = sum(w * pass_at_k(n, c, k) for c, w in enumerate(pmf))
    plug_in = sum(w * (1 - (1 - c / n) ** k) for c, w in enumerate(pmf))
    assert expected == pytest.approx(1 - (1 - p) ** k, abs=1e-12)
    assert abs(plug_in - (1 - (1 - p) ** k)) > 1e-3


def test_pass_at_k_rejects_impossible_counts() -> None:
    for n, c, k in [(5, 6, 1), (5, 2, 0), (5, 2, 6), (3, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)
    assert pass_k_for(5) == 3 and pass_k_for(4) == 2 and pass_k_for(1) == 1


@pytest.mark.parametrize("p, df, want", [(0.975, 9, 2.262157), (0.975, 1, 12.706205), (0.995, 5, 4.032143),
                                          (0.975, 1000, 1.962339), (0.9997, 11, 4.749680), (0.999, 7, 4.785290)])
def test_t_quantile(p: float, df: int, want: float) -> None:
    # reference values: scipy.stats.t.ppf (scipy is not a run-time dependency)
    assert t_quantile(p, df) == pytest.approx(want, rel=2e-4)
    assert t_quantile(1 - p, df) == pytest.approx(-want, rel=2e-4)


def test_measure_prompt_on_texts() -> None:
    texts = ["The capital of France is Paris.", "Paris is the capital of France.", "The capital of France is Paris."]
    h = [np.array([0.1, 2.0, 0.0, 0.5]), np.array([1.0, 1.0]), np.array([0.2, 0.2, np.nan])]
    p = measure_prompt("paris", "check", texts, h, threshold=0.672, correct=[True, True, True], h_off=1.5)
    assert p.n == 3 and p.tokens == 8 and p.correct == 3
    assert p.mean_entropy == pytest.approx((0.65 + 1.0 + 0.2) / 3)
    assert p.forking_fraction == pytest.approx(3 / 8)
    assert 0 < p.distinct_2 < 1 and 0 < p.chrf_distance < 1
    assert p.formats == {"prose": 3}
    same = measure_prompt("same", "open", ["a b c d"] * 4, [np.ones(3)] * 4, threshold=0.5)
    assert same.chrf_distance == pytest.approx(0.0) and same.distinct_2 == pytest.approx(3 / 12)
    assert same.correct is None and same.h_off is None
    assert PromptRound.from_dict(p.to_dict()) == p


def test_no_ratio_without_a_foreign_reference() -> None:
    p = measure_prompt("q", "open", ["x y", "y z"], [np.ones(2), np.ones(2)], threshold=0.6)
    assert round_measures([p])["ratio"] is None
    assert ratio_of_means([None, None], [1.0, 2.0]) is None
    assert ratio_of_means([3.0, None], [1.5, 2.0]) == pytest.approx(2.0)


# -- synthetic rounds ------------------------------------------------------------------------------------------------
PROMPTS = 10
N = 5


def synthetic_round(rng: np.random.Generator, *, entropy: float = 1.0, diversity: float = 1.0,
                    formats: float = 1.0, off: float = 1.0) -> list[PromptRound]:
    """One round of PROMPTS prompts whose per-prompt levels are fixed (prompt p's own baseline), with sampling
    noise of the size a 5-sample round has; the factors scale the levels (1 = no change)."""
    out = []
    for p in range(PROMPTS):
        level = 0.8 + 0.15 * p  # prompts differ a lot from each other, as real prompts do
        h = level * entropy + rng.normal(0, 0.12)
        mix = np.array([1, 1, 2, 1, 1, 2, 6], float)
        mix[-1] += 40 * (1 - formats)  # concentrate on prose
        counts = rng.multinomial(N, mix / mix.sum())
        q = 0.2 + 0.06 * p
        out.append(PromptRound(
            prompt_id=f"p{p}", kind="check", n=N, tokens=N * 40, mean_entropy=h,
            forking_entropy=2.2 * level * entropy + rng.normal(0, 0.2),
            forking_fraction=min(1.0, max(0.0, 0.3 * entropy + rng.normal(0, 0.04))),
            distinct_2=min(1.0, (0.55 + 0.02 * p) * diversity + rng.normal(0, 0.04)),
            chrf_distance=min(1.0, (0.6 + 0.01 * p) * diversity + rng.normal(0, 0.03)),
            formats={f: int(c) for f, c in zip(FORMATS, counts, strict=True) if c},
            correct=int(rng.binomial(N, q)), h_off=(0.9 + 0.1 * p) * off + rng.normal(0, 0.01),
        ))
    return out


def test_unchanged_rounds_rarely_claim_anything() -> None:
    rng = np.random.default_rng(7)
    claims = 0
    trials = 60
    for t in range(trials):
        base = [synthetic_round(rng) for _ in range(5)]
        ch = compare([synthetic_round(rng)], base, seed=t)
        assert len(ch) == 9  # every measure tested
        claims += diagnose_canary(ch, baseline_rounds=5).state != "healthy"
    assert claims <= 6  # family-wise 5 % per round; 60 rounds -> about 3 expected at most


def test_a_collapse_is_claimed_with_the_intervals_named() -> None:
    rng = np.random.default_rng(1)
    base = [synthetic_round(rng) for _ in range(5)]
    now = synthetic_round(rng, entropy=0.6, diversity=0.6, formats=0.0)
    ch = compare([now], base)
    v = diagnose_canary(ch, baseline_rounds=5)
    assert v.state == "collapse"
    sig = {c.measure: c for c in ch if c.significant}
    assert sig["mean_entropy"].direction == "down" and sig["distinct_2"].direction == "down"
    assert sig["mean_entropy"].upper < 0
    assert sig["ratio"].direction == "up" and sig["ratio"].lower > 1  # on-policy entropy fell, foreign text did not
    text = " ".join(v.reasons)
    assert "interval" in text and "Bonferroni over 9 measures" in text


def test_sharpening_on_own_samples_alone_reads_recognition() -> None:
    rng = np.random.default_rng(2)
    base = [synthetic_round(rng) for _ in range(5)]
    # the foreign text's entropy rose, the model's own did not move: the ratio H_off / H_on rose
    v = diagnose_canary(compare([synthetic_round(rng, off=1.4)], base), baseline_rounds=5)
    assert v.state == "recognition", v.reasons
    assert "sharpened on its own samples" in v.reasons[0]


def test_a_change_in_one_family_only_reads_drift() -> None:
    rng = np.random.default_rng(3)
    base = [synthetic_round(rng) for _ in range(5)]
    v = diagnose_canary(compare([synthetic_round(rng, entropy=1.5, off=1.5)], base), baseline_rounds=5)
    assert v.state == "drift", v.reasons
    assert "mean_entropy" in v.reasons[0]


def test_no_verdict_before_the_baseline_exists() -> None:
    rng = np.random.default_rng(4)
    base = [synthetic_round(rng) for _ in range(2)]
    v = diagnose_canary(compare([synthetic_round(rng, entropy=0.3)], base), baseline_rounds=2)
    assert v.state == "unknown" and "2 of 5" in v.reasons[0]
    assert compare([], base) == [] and compare([synthetic_round(rng)[:2]], base) == []
