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
    pf = PerformanceFit(min_points=30)
    for x, y in zip(h[:29], r[:29], strict=True):
        pf.add(float(x), float(y))
    assert pf.fit() is None
    pf.add(float(h[29]), float(r[29]))
    assert pf.fit() is not None
