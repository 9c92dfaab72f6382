import math

import numpy as np
import pytest

from monitors.collapse import (
    CollapseMonitor,
    PerformanceFit,
    combine,
    diversity_drop,
    fit_entropy_performance,
)

from .synthetic import token_entropies


def test_combine_is_weighted_mean_of_available() -> None:
    assert combine({"entropy": None, "forking": None, "diversity": None}) == 0.0
    assert combine({"entropy": 1.0, "forking": 1.0, "diversity": 1.0}) == pytest.approx(1.0)
    assert combine({"entropy": 1.0, "forking": 1.0, "diversity": 0.0}) == pytest.approx(0.7)
    assert combine({"entropy": 1.0, "forking": None, "diversity": None}) == pytest.approx(1.0)
    assert combine({"entropy": 2.0, "forking": -1.0, "diversity": None}) == pytest.approx(0.4 / 0.7)


def test_diversity_drop() -> None:
    base = {"distinct_2": 0.4, "chrf_distance": 0.6, "format_entropy": 0.0}
    assert diversity_drop(base, {"distinct_2": 0.4, "chrf_distance": 0.6, "format_entropy": 0.0}) == 0.0
    assert diversity_drop(base, {"distinct_2": 0.3, "chrf_distance": 0.6}) == pytest.approx(0.5)  # 25 % fall
    assert diversity_drop(base, {"chrf_distance": 0.0}) == 1.0
    assert diversity_drop({"format_entropy": 0.01}, {"format_entropy": 0.0}) is None  # base too small


def _feed(cm: CollapseMonitor, rng: np.random.Generator, n: int, **kw: float) -> list[float]:
    out = []
    for _ in range(n):
        h = token_entropies(rng, **kw)
        k = math.ceil(0.2 * h.size)
        cm.update(float(h.mean()), float(np.sort(h)[-k:].mean()))
        cm.freeze()
        out.append(cm.score({}))
    return out


def test_stationary_score_near_zero_then_forking_loss() -> None:
    rng = np.random.default_rng(5)
    cm = CollapseMonitor()
    s = np.asarray(_feed(cm, rng, 20_000))
    episodes = int(np.sum((s[1:] >= 0.5) & (s[:-1] < 0.5)))  # false alarms: rises through 0.5
    assert episodes <= 2 and float(s[400:].mean()) < 0.01
    after = _feed(cm, rng, 200, fork_scale=0.5)
    first = next(i for i, s in enumerate(after) if s >= 0.5)
    assert first < 40


def test_entropy_performance_law_fit() -> None:
    rng = np.random.default_rng(6)
    h = rng.uniform(0.1, 1.5, 400)
    r = -0.2 * np.exp(h) + 0.95 + rng.normal(0, 0.01, h.size)
    fit = fit_entropy_performance(h, r)
    assert fit is not None
    assert fit.a == pytest.approx(0.2, abs=0.01) and fit.b == pytest.approx(0.95, abs=0.02)
    assert fit.ceiling == pytest.approx(0.75, abs=0.02) and fit.r2 > 0.95
    assert fit_entropy_performance(np.ones(10), np.ones(10)) is None  # no spread in H
    steep = fit_entropy_performance(h, -0.2 * np.exp(h) + 1.4)
    assert steep is not None and steep.b - steep.a > 1 and steep.ceiling == 1.0  # a performance: clipped


def test_performance_fit_over_windows_of_labels() -> None:
    """0/1 labels drawn with accuracy -0.2 exp(H) + 0.95 of the window's entropy: the windowed fit recovers the
    law; a fit on the single labels (what the monitor did before) does not, and cannot reach r2 > 0.5."""
    rng = np.random.default_rng(8)
    pf = PerformanceFit(window=100, min_windows=4)
    all_h, all_y = [], []
    for level in np.linspace(0.2, 1.4, 12):  # the model's entropy drifts over time, one level per window
        for _ in range(100):
            h = float(level + rng.normal(0, 0.1))
            y = float(rng.random() < -0.2 * np.exp(level) + 0.95)
            pf.add(h, y, key=f"r{len(all_h)}")
            all_h.append(h)
            all_y.append(y)
        if len(pf.windows()) == 3:
            assert pf.fit() is None  # fewer than min_windows points
    fit = pf.fit()
    assert fit is not None and fit.n == 12 and fit.labels == 1200
    assert fit.a == pytest.approx(0.2, abs=0.06) and fit.ceiling == pytest.approx(0.75, abs=0.06) and fit.r2 > 0.8
    per_label = fit_entropy_performance(np.asarray(all_h), np.asarray(all_y))
    assert per_label is not None and per_label.r2 < 0.5


def test_a_relabelled_response_counts_once() -> None:
    pf = PerformanceFit(window=2, min_windows=1)
    pf.add(1.0, 0.0, key="a")
    pf.add(1.0, 1.0, key="a")  # the label flipped: it replaces the first
    assert len(pf) == 1 and pf.windows() == []
    pf.add(3.0, 0.0, key="b")
    assert pf.windows() == [(2.0, 0.5)]
    pf.add(5.0, 1.0)  # without a key every label is its own response
    pf.add(5.0, 1.0)
    assert len(pf) == 4
