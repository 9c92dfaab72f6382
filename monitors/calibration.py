"""Calibration of the proxy's confidence against correctness labels from feedback (RESEARCH §8).

Inputs are two equal-length arrays: ``confidence`` q_i in [0, 1] (the response's ``confidence`` field, the
geometric-mean probability of its sampled tokens) and ``correct`` c_i in {0, 1} (the user's label).

- Brier score        B = (1/N) Σ_i (q_i - c_i)²                           0 is perfect, 0.25 is a coin at 0.5
- ECE (10 bins)      E = Σ_b (n_b / N) |mean(q in b) - mean(c in b)|      bins of equal width on [0, 1]
- AUROC              P(q_wrong < q_right) + ½ P(q_wrong = q_right)        0.5 is no discrimination
- saturation rate    S = (1/N) Σ_i [q_i >= 0.99]                           RLVR-trained models drive this to 1

Bins are half-open ``[k/10, (k+1)/10)`` except the last, which also holds q = 1. AUROC is the Mann-Whitney
statistic with ties counted one half (the trapezoidal area under the ROC curve), computed with average ranks.

Edge cases, all returning ``None`` rather than a number that would mislead a dashboard:

- no labels (N = 0): every measure is ``None``;
- one class only (all correct or all wrong): ``auroc`` is ``None`` (there is no pair to rank); Brier, ECE and the
  saturation rate are still defined and returned.

Inputs are validated: shapes must match, confidences must be finite and within [0, 1], labels 0/1 or bool.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

Floats = NDArray[np.float64]

N_BINS = 10
SATURATION = 0.99


@dataclass(frozen=True, slots=True)
class ReliabilityBin:
    """One bin of the reliability diagram: [lo, hi), its count, mean confidence and accuracy (None if empty)."""

    lo: float
    hi: float
    count: int
    confidence: float | None
    accuracy: float | None


@dataclass(frozen=True, slots=True)
class Calibration:
    n: int
    positives: int  # labels marked correct
    brier: float | None
    ece: float | None
    auroc: float | None
    saturation: float | None
    bins: tuple[ReliabilityBin, ...]


def _validate(confidence: ArrayLike, correct: ArrayLike) -> tuple[Floats, Floats]:
    q = np.asarray(confidence, dtype=np.float64).reshape(-1)
    c = np.asarray(correct, dtype=np.float64).reshape(-1)
    if q.shape != c.shape:
        raise ValueError(f"confidence and correct differ in length: {q.shape[0]} != {c.shape[0]}")
    if not np.all(np.isfinite(q)) or np.any((q < 0.0) | (q > 1.0)):
        raise ValueError("confidence must be finite and within [0, 1]")
    if np.any((c != 0.0) & (c != 1.0)):
        raise ValueError("correct must hold 0/1 labels")
    return q, c


def _bin_index(q: Floats, n_bins: int) -> NDArray[np.intp]:
    return np.minimum(np.floor(q * n_bins), n_bins - 1).astype(np.intp)


def brier(confidence: ArrayLike, correct: ArrayLike) -> float | None:
    """Mean squared error of confidence against the 0/1 label; ``None`` without labels."""
    q, c = _validate(confidence, correct)
    if q.size == 0:
        return None
    return float(np.mean((q - c) ** 2))


def reliability_bins(confidence: ArrayLike, correct: ArrayLike, n_bins: int = N_BINS) -> tuple[ReliabilityBin, ...]:
    """Equal-width bins over [0, 1] with their count, mean confidence and accuracy."""
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    q, c = _validate(confidence, correct)
    idx = _bin_index(q, n_bins)
    counts = np.bincount(idx, minlength=n_bins)
    sum_q = np.bincount(idx, weights=q, minlength=n_bins)
    sum_c = np.bincount(idx, weights=c, minlength=n_bins)
    out = []
    for b in range(n_bins):
        n = int(counts[b])
        out.append(
            ReliabilityBin(
                lo=b / n_bins,
                hi=(b + 1) / n_bins,
                count=n,
                confidence=float(sum_q[b] / n) if n else None,
                accuracy=float(sum_c[b] / n) if n else None,
            )
        )
    return tuple(out)


def ece(confidence: ArrayLike, correct: ArrayLike, n_bins: int = N_BINS) -> float | None:
    """Expected calibration error Σ_b (n_b/N)|conf_b - acc_b| over equal-width bins; ``None`` without labels."""
    bins = reliability_bins(confidence, correct, n_bins)
    n = sum(b.count for b in bins)
    if n == 0:
        return None
    total = 0.0
    for b in bins:
        if b.count and b.confidence is not None and b.accuracy is not None:
            total += b.count / n * abs(b.confidence - b.accuracy)
    return float(total)


def _average_ranks(x: Floats) -> Floats:
    """1-based ranks with ties given the mean of the ranks they span (scipy's ``rankdata(method='average')``)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Start of each run of equal values, and its length.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    lengths = np.diff(np.r_[starts, xs.size])
    avg = starts + (lengths + 1) / 2.0  # mean of ranks starts+1 .. starts+lengths
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, lengths)
    return ranks


def auroc(confidence: ArrayLike, correct: ArrayLike) -> float | None:
    """Area under the ROC curve of confidence as a score for correctness, ties counted one half.

    Computed as the Mann-Whitney U of the correct responses divided by n_correct * n_wrong. ``None`` when there
    are no labels or only one class.
    """
    q, c = _validate(confidence, correct)
    n_pos = int(np.sum(c == 1.0))
    n_neg = int(q.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(q)
    u = float(np.sum(ranks[c == 1.0])) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def saturation_rate(confidence: ArrayLike, threshold: float = SATURATION) -> float | None:
    """Share of responses whose confidence is at least ``threshold`` (0.99); ``None`` for no responses."""
    q = np.asarray(confidence, dtype=np.float64).reshape(-1)
    if q.size == 0:
        return None
    return float(np.mean(q >= threshold))


def calibration(confidence: ArrayLike, correct: ArrayLike, n_bins: int = N_BINS) -> Calibration:
    """All measures at once, for the report, the page and the gauges."""
    q, c = _validate(confidence, correct)
    return Calibration(
        n=int(q.size),
        positives=int(np.sum(c == 1.0)),
        brier=brier(q, c),
        ece=ece(q, c, n_bins),
        auroc=auroc(q, c),
        saturation=saturation_rate(q),
        bins=reliability_bins(q, c, n_bins),
    )
