import numpy as np
import pytest

from monitors.diversity import Diversity, chrf, chrf_distance, prompt_key, upgma_clusters

from .synthetic import prose


def test_chrf_hand_computed() -> None:
    # orders 1 and 2 only ("ab" has no 3-gram). hyp "ab" vs ref "abc":
    # n=1: P=1, R=2/3 -> F2 = 5*(2/3)/(4+2/3) = 10/14; n=2: P=1, R=1/2 -> 2.5/4.5
    assert chrf("ab", "abc") == pytest.approx(100 * (10 / 14 + 2.5 / 4.5) / 2)
    # reversed: n=1: P=2/3, R=1 -> (10/3)/(11/3); n=2: P=1/2, R=1 -> 2.5/3
    assert chrf("abc", "ab") == pytest.approx(100 * (10 / 11 + 2.5 / 3) / 2)
    assert chrf_distance("ab", "abc") == pytest.approx(1 - (chrf("ab", "abc") + chrf("abc", "ab")) / 200)
    assert chrf("the same text", "the same  text") == pytest.approx(100.0)  # whitespace removed
    assert chrf("abc", "xyz") == 0.0
    assert chrf_distance("abc", "xyz") == 1.0


def test_upgma() -> None:
    sim = [[100, 90, 10, 10], [90, 100, 20, 10], [10, 20, 100, 70], [10, 10, 70, 100]]
    assert upgma_clusters(sim) == 2
    assert upgma_clusters(sim, threshold=95) == 4
    assert upgma_clusters(sim, threshold=5) == 1
    # average linkage: {0,1} vs 2 averages (10+20)/2 = 15 < 60, so 2 stays apart at 60
    assert upgma_clusters([[100, 90, 10], [90, 100, 20], [10, 20, 100]]) == 2


def test_prompt_key_normalises() -> None:
    a = prompt_key([{"role": "user", "content": "What  is 2+2?"}])
    b = prompt_key([{"role": "user", "content": "what is 2+2? "}])
    assert a == b and a != prompt_key([{"role": "system", "content": "what is 2+2?"}])
    assert prompt_key("x") == prompt_key("X")


def test_repeated_identical_answers_collapse_distance_and_distinct2() -> None:
    rng = np.random.default_rng(0)
    d = Diversity(window=300, distinct_window=100)
    for i in range(300):
        d.add(prose(rng), f"p{i % 10}")
    healthy = d.chrf_stats()
    d2 = d.distinct_2()
    assert healthy["chrf_distance"] is not None and healthy["chrf_distance"] > 0.4
    assert healthy["clusters_mean"] == pytest.approx(d.group_size)  # random texts: every answer its own cluster
    n = 0
    for n in range(1, 300):  # now every prompt gets one fixed answer
        d.add(f"the fixed answer to question {n % 10}", f"p{n % 10}")
        if (d.chrf_stats()["chrf_distance"] or 1.0) < 0.5 * healthy["chrf_distance"]:
            break
    assert n <= 60
    for _ in range(100):
        d.add("the fixed answer to question 1", "p1")
    assert d.chrf_stats()["clusters_mean"] < 2
    assert d.distinct_2() < 0.5 * d2


def test_bounded_groups_and_window() -> None:
    rng = np.random.default_rng(1)
    d = Diversity(window=50, distinct_window=20, max_groups=8, group_size=3, max_chars=100)
    for i in range(500):
        d.add(prose(rng), f"p{i % 40}")
    assert len(d._groups) <= 8
    assert all(len(g.seqs) <= 3 for g in d._groups.values())
    assert len(d._bigram_ring) == 20


def test_a_shorter_distinct_window_equals_one_measured_over_that_window_from_the_start() -> None:
    rng = np.random.default_rng(3)
    texts = [prose(rng) for _ in range(150)]
    resized, fresh = Diversity(distinct_window=200), Diversity(distinct_window=60)
    for t in texts:
        resized.add(t, None)
        fresh.add(t, None)
    assert resized.distinct_2() != pytest.approx(fresh.distinct_2())  # distinct-2 depends on its window
    resized.set_distinct_window(60)
    assert resized.distinct_ready and resized.distinct_2() == pytest.approx(fresh.distinct_2())
    for t in texts[:30]:
        resized.add(t, None)
        fresh.add(t, None)
    assert resized.distinct_2() == pytest.approx(fresh.distinct_2())
