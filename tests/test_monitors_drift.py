import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitors.drift import DriftMonitor, js_divergence, psi, validate_drift_dict

from .synthetic import token_entropies


def test_psi_and_js_hand_computed() -> None:
    p, q = np.array([0.5, 0.5]), np.array([0.25, 0.75])
    # PSI = (0.5-0.25) ln(0.5/0.25) + (0.5-0.75) ln(0.5/0.75) = 0.25 ln 2 + 0.25 ln 1.5
    assert psi(p, q, eps=0) == pytest.approx(0.25 * math.log(2) + 0.25 * math.log(1.5))
    # m = (p + q) / 2 = (0.375, 0.625)
    js = 0.5 * (0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)) + 0.5 * (
        0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)
    )
    assert js_divergence(p, q, eps=0) == pytest.approx(js)
    # counts are normalised: the same as probabilities
    assert psi([10, 10], [5, 15], eps=0) == pytest.approx(psi(p, q, eps=0))
    # disjoint supports: JS reaches ln 2, PSI stays finite thanks to eps
    assert js_divergence([1, 0], [0, 1], eps=0) == pytest.approx(math.log(2))
    assert math.isfinite(psi([1, 0], [0, 1]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=3, max_size=12).flatmap(
    lambda a: st.tuples(st.just(a), st.lists(st.integers(0, 50), min_size=len(a), max_size=len(a)))))
def test_identities(pair: tuple[list[int], list[int]]) -> None:
    a, b = (np.asarray(x, dtype=float) for x in pair)
    if a.sum() == 0 or b.sum() == 0:
        return
    p = a / a.sum() * 0.99 + 0.01 / a.size
    q = b / b.sum() * 0.99 + 0.01 / b.size
    kl = lambda x, y: float(np.sum(x * np.log(x / y)))  # noqa: E731
    assert psi(p, q, eps=0) == pytest.approx(kl(p, q) + kl(q, p))  # PSI = J-divergence
    assert psi(p, q) == pytest.approx(psi(q, p))
    assert 0 <= js_divergence(p, q) <= math.log(2) + 1e-12
    assert psi(p, p) == pytest.approx(0, abs=1e-12)


def test_stationary_no_drift_then_step_detected() -> None:
    rng = np.random.default_rng(3)
    d = DriftMonitor(window=200, baseline_tokens=10_000)
    worst = 0.0
    for _ in range(3_000):
        d.update(token_entropies(rng))
        v = d.drift()["psi"]
        worst = max(worst, v or 0.0)
    assert d.frozen and worst < 0.05
    def crossed() -> bool:
        d.update(token_entropies(rng, scale=0.5))
        return (d.drift()["psi"] or 0) >= 0.25

    n = next(i for i in range(1, 400) if crossed())
    assert n <= 200  # once the 200-response window has (mostly) turned over


def test_baseline_round_trip() -> None:
    rng = np.random.default_rng(4)
    d = DriftMonitor(window=50, baseline_tokens=1_000)
    for _ in range(20):
        d.update(token_entropies(rng))
    snap = d.to_dict()
    e = DriftMonitor(window=50, baseline_tokens=10**9)
    e.load_dict(snap)
    assert e.frozen and e.source == "file"
    assert (e.base_tokens == d.base_tokens).all()
    with pytest.raises(ValueError, match="token_counts"):
        validate_drift_dict({**snap, "token_counts": [1, 2]})
    with pytest.raises(ValueError, match="edges"):
        validate_drift_dict({**snap, "edges": [0, 1, 0.5]})
