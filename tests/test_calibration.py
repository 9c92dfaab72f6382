"""Calibration math against values computed by hand, edge cases, and a brute-force AUROC property."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from monitors.calibration import auroc, brier, calibration, ece, reliability_bins, saturation_rate

# Four responses: (confidence, correct) = (0.9, 1), (0.8, 0), (0.3, 0), (0.6, 1).
Q = [0.9, 0.8, 0.3, 0.6]
C = [1, 0, 0, 1]


def test_brier_by_hand() -> None:
    # (0.1² + 0.8² + 0.3² + 0.4²) / 4 = (0.01 + 0.64 + 0.09 + 0.16) / 4
    assert brier(Q, C) == pytest.approx(0.225)


def test_ece_by_hand_one_response_per_bin() -> None:
    # Each response sits alone in bins 9, 8, 3, 6: (|0.9-1| + |0.8-0| + |0.3-0| + |0.6-1|) / 4
    assert ece(Q, C) == pytest.approx((0.1 + 0.8 + 0.3 + 0.4) / 4)


def test_ece_by_hand_shared_bin() -> None:
    # All three in bin [0.8, 0.9): mean confidence 0.85, accuracy 2/3.
    assert ece([0.82, 0.88, 0.85], [1, 1, 0]) == pytest.approx(abs(0.85 - 2 / 3))
    # Two bins: [0.2,0.3) holds (0.25, 0) and (0.25, 1): conf .25 acc .5; [0.9,1] holds (0.95, 1): |0.95-1|.
    assert ece([0.25, 0.25, 0.95], [0, 1, 1]) == pytest.approx(2 / 3 * 0.25 + 1 / 3 * 0.05)


def test_perfectly_calibrated_bins_give_zero_ece() -> None:
    q = [0.75] * 4 + [0.25] * 4
    c = [1, 1, 1, 0] + [1, 0, 0, 0]
    assert ece(q, c) == pytest.approx(0.0)
    assert brier(q, c) == pytest.approx((3 * 0.0625 + 0.5625 + 0.5625 + 3 * 0.0625) / 8)


def test_bin_edges() -> None:
    bins = reliability_bins([0.0, 0.1, 0.0999, 0.5, 0.9, 1.0], [0, 0, 0, 1, 1, 1])
    counts = [b.count for b in bins]
    # 0.0 and 0.0999 in bin 0; 0.1 opens bin 1; 0.9 and 1.0 both in the last bin.
    assert counts == [2, 1, 0, 0, 0, 1, 0, 0, 0, 2]
    assert bins[9].confidence == pytest.approx(0.95)
    assert bins[9].accuracy == 1.0
    assert bins[2].confidence is None and bins[2].accuracy is None
    assert [b.lo for b in bins] == pytest.approx([k / 10 for k in range(10)])


def test_auroc_by_hand() -> None:
    # Correct {0.9, 0.6} vs wrong {0.8, 0.3}: 0.9>0.8, 0.9>0.3, 0.6<0.8, 0.6>0.3 -> 3 of 4 pairs.
    assert auroc(Q, C) == pytest.approx(0.75)


def test_auroc_ties_count_half() -> None:
    # Correct {0.7, 0.7} vs wrong {0.7, 0.2}: each correct one ties the 0.7 (1/2) and beats 0.2 (1).
    assert auroc([0.7, 0.7, 0.7, 0.2], [1, 0, 1, 0]) == pytest.approx(0.75)
    # Everything tied: no discrimination.
    assert auroc([0.5] * 6, [1, 0, 1, 0, 0, 1]) == pytest.approx(0.5)


def test_auroc_extremes() -> None:
    assert auroc([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0


def test_saturation_rate() -> None:
    assert saturation_rate([0.99, 1.0, 0.5, 0.989]) == pytest.approx(0.5)
    assert saturation_rate([]) is None


def test_no_labels_gives_none_everywhere() -> None:
    cal = calibration([], [])
    assert (cal.n, cal.brier, cal.ece, cal.auroc, cal.saturation) == (0, None, None, None, None)
    assert all(b.count == 0 for b in cal.bins)


def test_one_class_auroc_none_others_defined() -> None:
    cal = calibration([0.9, 0.95, 0.4], [1, 1, 1])
    assert cal.auroc is None
    assert cal.brier == pytest.approx((0.01 + 0.0025 + 0.36) / 3)
    assert cal.ece == pytest.approx((0.1 + 0.05 + 0.6) / 3)
    assert cal.positives == 3
    assert auroc([0.2, 0.3], [0, 0]) is None


@pytest.mark.parametrize(
    ("q", "c"),
    [([0.5, 0.2], [1]), ([1.2], [1]), ([-0.1], [0]), ([math.nan], [1]), ([0.5], [2]), ([0.5], [0.5])],
)
def test_invalid_inputs_raise(q: list[float], c: list[float]) -> None:
    with pytest.raises(ValueError):
        calibration(q, c)


def _brute_auroc(q: list[float], c: list[int]) -> float:
    pos = [x for x, y in zip(q, c, strict=True) if y]
    neg = [x for x, y in zip(q, c, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@given(
    st.lists(
        st.tuples(st.sampled_from([0.0, 0.1, 0.35, 0.5, 0.77, 0.9, 0.99, 1.0]), st.integers(0, 1)),
        min_size=2,
        max_size=40,
    )
)
def test_auroc_matches_pair_counting(pairs: list[tuple[float, int]]) -> None:
    q = [p for p, _ in pairs]
    c = [y for _, y in pairs]
    got = auroc(q, c)
    if len(set(c)) < 2:
        assert got is None
    else:
        assert got == pytest.approx(_brute_auroc(q, c))


@given(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 1)), min_size=1, max_size=60))
def test_ece_and_brier_bounds(pairs: list[tuple[float, int]]) -> None:
    q = [p for p, _ in pairs]
    c = [y for _, y in pairs]
    e, b = ece(q, c), brier(q, c)
    assert e is not None and b is not None
    assert 0.0 <= e <= 1.0 and 0.0 <= b <= 1.0
    # ECE is at most the mean absolute error (Jensen, per bin).
    assert e <= sum(abs(x - y) for x, y in pairs) / len(pairs) + 1e-12
