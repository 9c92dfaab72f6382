import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitors.quantile import RollingQuantile

from .synthetic import token_entropies


def test_matches_exact_quantile_on_token_entropies() -> None:
    rng = np.random.default_rng(0)
    rq = RollingQuantile()
    batches = [token_entropies(rng) for _ in range(200)]
    for b in batches:
        rq.update(b)
    exact = np.quantile(np.concatenate(batches), [0.5, 0.8, 0.9])
    got = [rq.quantile(q) for q in (0.5, 0.8, 0.9)]
    assert got == pytest.approx(exact, rel=0.03)


def test_window_forgets_old_values_and_memory_is_fixed() -> None:
    rq = RollingQuantile(buckets=4, bucket_tokens=1_000)
    shape = rq._ring.shape
    for _ in range(50):
        rq.update(np.full(100, 2.0))
    for _ in range(50):  # 5,000 tokens: more than the 4 x 1,000 window
        rq.update(np.full(100, 0.1))
    assert rq.quantile(0.8) == pytest.approx(0.1, rel=0.03)
    assert rq.count <= 4 * 1_000 and rq._ring.shape == shape


def test_empty_default_and_bad_q() -> None:
    rq = RollingQuantile()
    assert rq.quantile(0.8, default=0.672) == 0.672
    rq.update(np.array([np.nan]))
    assert rq.count == 0
    with pytest.raises(ValueError):
        rq.quantile(1.5)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.0, 10.0), min_size=20, max_size=300), st.floats(0.05, 0.95))
def test_quantile_within_one_bin_of_exact(values: list[float], q: float) -> None:
    rq = RollingQuantile()
    arr = np.asarray(values)
    rq.update(arr)
    got = rq.quantile(q)
    srt = np.sort(arr)
    # The sketch's answer lies between neighbouring order statistics, widened by one bin (2.5 % relative, 1e-4 abs).
    lo = srt[max(0, int(np.floor(q * len(arr))) - 1)]
    hi = srt[min(len(arr) - 1, int(np.ceil(q * len(arr))))]
    assert lo / 1.03 - 1e-4 <= got <= hi * 1.03 + 1e-4
