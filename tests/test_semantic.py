"""Meaning clusters and semantic entropy (monitors/semantic.py) on hand-made answer sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from monitors.semantic import (
    cluster,
    cluster_by_similarity,
    cluster_probabilities,
    discrete_semantic_entropy,
    max_entropy,
    mean_logprob,
    normalise,
    semantic_entropy,
)

# A hand-made equivalence: two answers mean the same when they name the same city. It stands in for the
# entailment or embedding test, which the tier with the real model checks.
CITIES = ("paris", "lyon", "marseille", "berlin")


def same_city(a: str, b: str) -> bool:
    ca = {c for c in CITIES if c in normalise(a).split()}
    cb = {c for c in CITIES if c in normalise(b).split()}
    return bool(ca) and ca == cb


PARAPHRASES = ["Paris.", "The capital of France is Paris.", "It's Paris", "paris", "Paris, of course."]
CONTRADICTIONS = ["Paris.", "Lyon.", "The capital is Marseille.", "Berlin"]


def test_paraphrases_form_one_cluster() -> None:
    ids = cluster(PARAPHRASES, same_city)
    assert ids == [0, 0, 0, 0, 0]
    assert semantic_entropy(ids, [-0.1, -0.5, -1.0, -0.2, -2.0]) == 0.0
    assert discrete_semantic_entropy(ids) == 0.0


def test_contradictions_form_separate_clusters() -> None:
    ids = cluster(CONTRADICTIONS, same_city)
    assert ids == [0, 1, 2, 3]
    assert discrete_semantic_entropy(ids) == pytest.approx(math.log(4))
    assert discrete_semantic_entropy(ids) == pytest.approx(max_entropy(4))
    # Equal likelihoods: the weighted form is the discrete one.
    assert semantic_entropy(ids, [-0.7] * 4) == pytest.approx(math.log(4))


def test_mixed_set_discrete_and_weighted_forms() -> None:
    answers = ["Paris", "It is Paris.", "Lyon", "Paris!", "Lyon, I think"]
    ids = cluster(answers, same_city)
    assert ids == [0, 0, 1, 0, 1]
    # Discrete: sizes 3 and 2 of 5.
    p = np.array([3 / 5, 2 / 5])
    assert discrete_semantic_entropy(ids) == pytest.approx(float(-(p * np.log(p)).sum()))
    # Weighted: the Lyon answers are much more likely per token than the Paris ones.
    lps = [-3.0, -3.0, -0.1, -3.0, -0.1]
    w = np.exp(np.array(lps))
    pc = np.array([w[[0, 1, 3]].sum(), w[[2, 4]].sum()]) / w.sum()
    assert semantic_entropy(ids, lps) == pytest.approx(float(-(pc * np.log(pc)).sum()))
    assert cluster_probabilities(ids, lps)[1] > 0.9
    # The weighted form is lower than the count form here: most of the mass sits in one meaning.
    assert semantic_entropy(ids, lps) < discrete_semantic_entropy(ids)


def test_identical_normalised_answers_skip_the_equivalence_call() -> None:
    calls: list[tuple[str, str]] = []

    def never(a: str, b: str) -> bool:
        calls.append((a, b))
        return False

    ids = cluster(["Paris.", "paris", "The Paris", "Lyon"], never)
    assert ids == [0, 0, 0, 1]
    assert calls == [("Paris.", "Lyon")]  # only the new text was compared, once, against the one representative


def test_greedy_compares_against_representatives_only() -> None:
    # A non-transitive similarity: b is close to a and c, a and c are not close; c joins nothing through b.
    sims = np.array([[1.0, 0.9, 0.1], [0.9, 1.0, 0.9], [0.1, 0.9, 1.0]])
    assert cluster_by_similarity(sims, 0.8) == [0, 0, 1]
    assert cluster_by_similarity(sims, 0.95) == [0, 1, 2]
    assert cluster_by_similarity(sims, 0.05) == [0, 0, 0]


def test_likelihoods_are_shift_invariant_and_finite() -> None:
    ids = [0, 1, 1]
    a = semantic_entropy(ids, [-1.0, -2.0, -3.0])
    b = semantic_entropy(ids, [-1001.0, -1002.0, -1003.0])  # exp() alone would underflow to 0/0
    assert a == pytest.approx(b)
    with pytest.raises(ValueError):
        semantic_entropy(ids, [-1.0, float("nan"), -1.0])
    with pytest.raises(ValueError):
        semantic_entropy(ids, [-1.0, -1.0])


def test_empty_and_single() -> None:
    assert discrete_semantic_entropy([]) == 0.0
    assert discrete_semantic_entropy([0]) == 0.0
    assert mean_logprob([]) == 0.0
    assert mean_logprob([-1.0, -3.0]) == pytest.approx(-2.0)
    assert mean_logprob([-1.0, -1e9]) == pytest.approx((-1.0 - 9999.0) / 2)  # vLLM's -9999 floor


def test_normalise() -> None:
    assert normalise("  The Capital is BOGOTÁ!  ") == "capital is bogota"
    assert normalise("an apple, a day") == "apple day"


@given(st.lists(st.integers(0, 5), min_size=1, max_size=30), st.data())
def test_bounds_and_permutation(ids: list[int], data: st.DataObject) -> None:
    # Relabel to 0..M-1 in order of appearance, as cluster() produces.
    order: dict[int, int] = {}
    ids = [order.setdefault(i, len(order)) for i in ids]
    lps = data.draw(st.lists(st.floats(-20, 0), min_size=len(ids), max_size=len(ids)))
    m = max(ids) + 1
    for h in (discrete_semantic_entropy(ids), semantic_entropy(ids, lps)):
        assert -1e-12 <= h <= math.log(m) + 1e-9
    perm = np.random.default_rng(len(ids)).permutation(len(ids))
    assert discrete_semantic_entropy([ids[i] for i in perm]) == pytest.approx(discrete_semantic_entropy(ids))
    assert semantic_entropy([ids[i] for i in perm], [lps[i] for i in perm]) == pytest.approx(
        semantic_entropy(ids, lps))


def test_auroc_wrong_and_ranking() -> None:
    from monitors.calibration import auroc
    from monitors.semantic import auroc_wrong, rank_scores

    rng = np.random.default_rng(3)
    conf = rng.uniform(0, 1, 200).round(2)  # ties on purpose
    correct = rng.uniform(0, 1, 200) < conf
    # The calibration AUROC of confidence for correctness is the AUROC of 1 - confidence for wrong answers.
    assert auroc_wrong(1 - conf, ~correct) == pytest.approx(auroc(conf, correct.astype(float)))
    assert auroc_wrong([0.1, 0.9], [False, True]) == 1.0
    assert auroc_wrong([0.5, 0.5], [False, True]) == 0.5
    assert auroc_wrong([1.0, 2.0], [True, True]) is None
    se: list[float | None] = [None if i % 2 else float(not c) for i, c in enumerate(correct)]
    ranked = rank_scores({"1 - confidence": list(1 - conf), "semantic entropy": se}, list(correct))
    assert [r[0] for r in ranked] == ["semantic entropy", "1 - confidence"]  # the perfect one first
    assert ranked[0][1:] == (1.0, 100)
