r"""Per-token entropy from truncated (top-K) logprobs: rigorous bounds and a tail-model point estimate.

The upstream returns, for each generated position, only the K most probable tokens (plus the sampled token
when it falls outside them). With known probabilities ``p_1..p_n`` (any order), vocabulary size ``V`` and

.. math::

    H_K = -\sum_i p_i \log p_i, \qquad r = \max(0, 1 - \sum_i p_i),

the full-vocabulary entropy is ``H = H_K + H_tail`` where ``H_tail = -sum_j q_j log q_j`` runs over the
``M = V - n`` unseen tokens, whose probabilities ``q_j`` sum to ``r`` and are each at most a cap ``c``.
All values are in nats.

* Upper bound (entropy is maximal for the even spread): ``H_tail <= r log(M / r)``.
* Lower bound (entropy is Schur-concave, so the most concentrated admissible tail is the minimum):
  ``m = floor(r / c)`` tokens at ``c`` and the remainder ``rho = r - m c`` in one,
  ``H_tail >= -m c log c - rho log rho``. The cap ``c`` is the smallest probability among the entries that are
  not the sampled token (vLLM lists the sampled token plus the top K-1 when the sampled token is outside the top
  K, so the missing rank-K token may be more probable than the sampled one). Rows whose entries may have been
  merged (``collapsed``: the completions API keys ``top_logprobs`` by token string, and for a duplicate string
  the later entry, in rank order, overwrites the earlier) get ``c = 1``: the overwritten token may be more
  probable than every listed entry, so only ``c >= r`` is safe and the bound is ``H_K - r log r``. A dict of K
  keys is such a row too whenever the sampled token may lie below rank K (its value is not above every other
  entry): K+1 tokens were sent and one is gone (``proxy.logprobs`` flags these rows). Without
  the sampled column, any one entry may be a sampled token from below rank K, so ``c`` is the second-smallest
  entry (and ``c = 1`` for a single entry).
* Point estimate (``topk-tail-v1``): the logits of the unseen tokens are modelled as the upper order statistics
  of V draws from a Gaussian, so the token of rank k > n has probability

  .. math:: q_k = p_n \exp(\sigma (z_k - z_n)), \qquad z_k = \Phi^{-1}(1 - (k - 1/2) / V),

  pinned at the last known rank ``n`` (level ``p_n``, the smallest top entry) with the scale ``sigma`` solved
  so that the tail holds its mass ``R``. Replacing the sum over ranks by its integral
  (``z_a = Phi^{-1}(1 - n / V)``, ``lambda = phi / Phi`` the inverse Mills ratio):

  .. math::

      \log \frac{R}{p_n} = \log V + \frac{\sigma^2}{2} + \log\Phi(z_a - \sigma) - \sigma z_n,
      \qquad H_{tail} = R \left[-\log p_n + \sigma (z_n - \sigma + \lambda(z_a - \sigma))\right].

  Nothing is fitted to data: the two parameters are fixed by ``p_n`` and ``R``. Because only
  ``s = log((V - n) p_n / R)`` matters, ``H_tail / R + log p_n`` is tabulated once per (V, n) on a grid of ``s``
  and interpolated (error below 2e-4 nats). When no decaying tail fits (``R >= (V - n) p_n``) the even spread
  (the upper bound) is used. The result is clipped into ``[lower, upper]``. Against exact full-vocabulary
  entropy on real vLLM responses it is within a median 0.05 nats at K=20 and 0.16 at K=5
  (``python -m bench.estimator_accuracy``), where renormalising the top K is off by 1.6 and 2.4.

The sampled token outside the top K: when its probability is below every other entry, the other entries are
ranks ``1..n`` and the sampled token is one of the tail tokens, so the tail mass is ``R = r + p_sampled`` and the
sampled token's own ``-p log p`` moves from ``H_K`` into ``H_tail``. Otherwise ``R = r``.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from functools import lru_cache
from operator import mul
from statistics import NormalDist

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "ESTIMATOR_NAME",
    "PositionEstimates",
    "estimate_positions",
    "renormalised_entropy",
]

ESTIMATOR_NAME = "topk-tail-v1"
DEFAULT_VOCAB_SIZE = 262_144

#: vLLM writes -inf logprobs as -9999.0; anything at or below is probability 0.
NEG_INF_SENTINEL = -9999.0
_NEWTON_STEPS = 16
# Tail-model lookup: G(s) on s = log((V - n) p_n / mass) in [0, _S_MAX], step _S_STEP (interpolation error
# below 2e-4 nats); past _S_MAX the tail mass is below V e^-64 and its entropy is negligible.
_S_STEP = 1.0 / 16.0
_S_MAX = 64.0
_TABLE_MAX_N = 64
# Up to this many rows per call the scalar path is faster than the vectorised one (bench/estimator_accuracy.py).
_SMALL_MAX_ROWS = 16
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_SQRT_HALF = math.sqrt(0.5)
_exp, _log, _floor = math.exp, math.log, math.floor
_SQRT_HALF_PI = math.sqrt(0.5 * math.pi)  # phi(x) / Phi(x) = 2 / (sqrt(2 pi) t) e^-P(t) for x < 0
# Numerical Recipes `erfcc` Chebyshev coefficients (fractional error < 1.2e-7 everywhere), evaluated in log space
# so that log Phi(x) stays finite far into the lower tail.
_ERFC_COEF = (
    0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807,
    -0.18628806, 0.09678418, 0.37409196, 1.00002368, -1.26551223,
)

F64 = NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class PositionEstimates:
    """Per-position entropy estimates (all entropies in nats), each array of shape ``(T,)``."""

    point: F64  #: ``topk-tail-v1`` point estimate, ``lower <= point <= upper``
    lower: F64  #: rigorous lower bound
    upper: F64  #: rigorous upper bound
    tail_mass: F64  #: ``r = max(0, 1 - sum of known p)``
    top1_prob: F64  #: largest known probability
    margin: F64  #: ``p(1st) - p(2nd)`` among known entries (``p(1st)`` if only one entry)
    n_known: NDArray[np.int64]  #: entries used (0 for a row without any)


def _xlogx(p: F64) -> F64:
    """``-p log p`` elementwise with ``0 log 0 = 0``."""
    safe = np.where(p > 0.0, p, 1.0)
    out: F64 = -p * np.log(safe)
    return out


def _log_ndtr_mills(x: F64) -> tuple[F64, F64]:
    """``log Phi(x)`` and the inverse Mills ratio ``phi(x) / Phi(x)``, accurate in both tails.

    Uses the Numerical Recipes ``erfcc`` form ``erfc(z) = t exp(-z^2 + P(t))``, ``t = 1 / (1 + z/2)``
    (relative error < 1.2e-7 for ``z >= 0``). For ``x < 0`` the ``exp(-x^2/2)`` factors of ``phi`` and ``Phi``
    cancel analytically, so neither value overflows however far into the lower tail ``x`` goes.
    """
    z = np.abs(x) * _SQRT_HALF
    t = 1.0 / (1.0 + 0.5 * z)
    poly = np.full_like(z, _ERFC_COEF[0])
    for c in _ERFC_COEF[1:]:
        poly = poly * t + c
    log_tail = np.log(0.5 * t) - z * z + poly  # log Phi(-|x|)
    lower = x < 0.0
    log_cdf: F64 = np.where(lower, log_tail, np.log1p(-np.exp(log_tail)))
    upper_mills = np.exp(-z * z - _LOG_SQRT_2PI - log_cdf)  # x >= 0: no cancellation needed
    mills: F64 = np.where(lower, np.exp(-poly) / (t * _SQRT_HALF_PI), upper_mills)
    return log_cdf, mills


def _log_ndtr(x: F64) -> F64:
    """``log Phi(x)``, the log of the standard normal CDF (see :func:`_log_ndtr_mills`)."""
    return _log_ndtr_mills(x)[0]


@lru_cache(maxsize=64)
def _quantiles(vocab_size: int, width: int) -> tuple[F64, F64]:
    """Gaussian scores per count of known ranks ``n = 0..width``: ``z_n`` (rank n's own) and ``z_a`` (boundary)."""
    nd = NormalDist()
    v = float(vocab_size)
    n = np.arange(width + 1, dtype=np.float64)
    z_n = np.array([nd.inv_cdf(min(max(1.0 - (k - 0.5) / v, 1e-300), 1 - 1e-16)) for k in n])
    z_a = np.array([nd.inv_cdf(min(max(1.0 - k / v, 1e-300), 1 - 1e-16)) for k in n])
    z_n.flags.writeable = False
    z_a.flags.writeable = False
    return z_n, z_a


def _gaussian_tail_entropy(p_last: F64, n_top: NDArray[np.int64], mass: F64, vocab_size: int) -> F64:
    """``H_tail`` of the Gaussian-logit tail model (nats); rows must satisfy ``0 < mass < (V - n) p_last``.

    Solves ``f(sigma) = log V + sigma^2/2 + log Phi(z_a - sigma) - sigma z_n - log(mass / p_last) = 0``
    by Newton's method from ``sigma = 0``. ``f`` is convex and decreasing (``f'`` is the tilted mean of
    ``z - z_n``, ``f''`` its variance), so the iterates rise monotonically to the root without overshooting.
    """
    z_n_tab, z_a_tab = _quantiles(vocab_size, int(n_top.max()))
    z_n = z_n_tab[n_top]
    z_a = z_a_tab[n_top]
    target = np.log(mass / p_last) - math.log(vocab_size)
    sigma = np.zeros_like(mass)
    slope = np.full_like(mass, -1.0)
    for _ in range(_NEWTON_STEPS):
        x = z_a - sigma
        log_cdf, mills = _log_ndtr_mills(x)
        slope = sigma - mills - z_n  # f'(sigma) < 0
        f = 0.5 * sigma * sigma + log_cdf - sigma * z_n - target
        sigma = sigma - f / slope
    out: F64 = mass * (-np.log(p_last) - sigma * slope)
    return out


@lru_cache(maxsize=32)
def _tail_table(vocab_size: int, n_max: int) -> F64:
    """``G[n, i]`` with ``H_tail = mass (G(s) - log p_n)`` at ``s = i * _S_STEP``, for ``n = 0..n_max``.

    The model is scale-free in ``p_n``: only ``s = log((V - n) p_n / mass)`` matters, so one solve per grid
    point and rank count serves every position (row ``n = 0`` is unused).
    """
    s = np.arange(0.0, _S_MAX + _S_STEP / 2, _S_STEP)
    n = np.arange(n_max + 1, dtype=np.int64)
    n_fit = np.clip(n, 1, max(vocab_size - 1, 1))  # rows n >= V never reach the model
    nn, ss = np.meshgrid(n_fit, s, indexing="ij")
    rel_mass = (vocab_size - nn) * np.exp(-ss) * (1.0 - 1e-12)  # mass / p_n, just inside the flat tail
    g = _gaussian_tail_entropy(np.ones(nn.size), nn.ravel(), rel_mass.ravel(), vocab_size)
    tab: F64 = (g / rel_mass.ravel()).reshape(nn.shape)
    tab[:, 0] = 0.0  # s = 0 is the flat tail: every token at p_n
    tab.flags.writeable = False
    return tab


def _tail_entropy(p_last: F64, n_top: NDArray[np.int64], mass: F64, vocab_size: int) -> F64:
    """Tabulated :func:`_gaussian_tail_entropy` (same conditions), linear in ``s`` between grid points."""
    n_max = int(n_top.max())
    if n_max > _TABLE_MAX_N:  # unusually wide rows: solve directly rather than tabulate every rank count
        return _gaussian_tail_entropy(p_last, n_top, mass, vocab_size)
    tab = _tail_table(vocab_size, max(32, 1 << (n_max - 1).bit_length()))
    log_p = np.log(p_last)
    pos = (np.log(np.maximum(vocab_size - n_top, 1)) + log_p - np.log(mass)) * (1.0 / _S_STEP)
    pos = np.clip(pos, 0.0, tab.shape[1] - 1.0)
    i = np.minimum(pos.astype(np.int64), tab.shape[1] - 2)
    frac = pos - i
    g = tab[n_top, i] * (1.0 - frac) + tab[n_top, i + 1] * frac
    out: F64 = mass * (g - log_p)
    return out


def _packed_lower(r: F64, cap: F64) -> F64:
    """Smallest tail entropy for mass ``r`` in tokens of probability ``<= cap``: ``floor(r/cap)`` full, one rest."""
    with np.errstate(over="ignore"):  # a subnormal cap: floor(r/cap) = inf tokens, lower = upper after clipping
        full = np.floor(r / cap)
    rest = np.clip(r - full * cap, 0.0, None)
    out: F64 = full * _xlogx(cap) + _xlogx(rest)
    return out


def estimate_positions(
    logprobs: NDArray[np.float64],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    sampled_col: NDArray[np.integer] | None = None,
    collapsed: NDArray[np.bool_] | None = None,
) -> PositionEstimates:
    """Entropy bounds and point estimate for each generated position from its known top-K logprobs.

    Parameters
    ----------
    logprobs : ndarray, shape (T, W)
        Known logprobs (natural log), one row per position, entries in any order; NaN marks padding.
        Values ``<= -9999.0`` are probability 0. Positive values (logits mode) are clamped so that no
        probability exceeds 1 and each row sums to at most 1.
    vocab_size : int
        Vocabulary size V (all tokens the model can emit).
    sampled_col : ndarray of int, shape (T,), optional
        Column of the sampled token in each row, -1 when unknown. Unknown rows are taken as the top-n set for
        the point estimate, while the lower bound caps unseen tokens at the second-smallest entry (any one entry
        may be a sampled token from below rank K; with a single entry there is no cap).
    collapsed : ndarray of bool, shape (T,), optional
        Rows whose entries may have been merged (duplicate token strings): the lower bound then lets one
        unseen token hold the whole tail mass, ``H_K - r log r``.

    Returns
    -------
    PositionEstimates
        ``lower <= point <= upper`` per position (nats); see the module docstring for the formulas.
        A row without any entry gets ``lower = 0``, ``upper = log V`` and their midpoint as the point.

    Notes
    -----
    Calls with at most ``_SMALL_MAX_ROWS`` rows (a stream chunk: vLLM sends one token per chunk) take a scalar
    path, the same formulas over Python floats, which costs a few microseconds where the vectorised path's
    numpy calls cost about a hundred; the two agree to rounding (``tests/test_entropy*.py`` hold them to 1e-9).
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.ndim != 2:
        raise ValueError(f"logprobs must be 2-D (T, W), got shape {lp.shape}")
    t, w = lp.shape
    v = int(vocab_size)
    if v < 1:
        raise ValueError("vocab_size must be positive")
    if 0 < t <= _SMALL_MAX_ROWS and 0 < w <= _TABLE_MAX_N:
        small = _estimate_small(lp, v, sampled_col, collapsed)
        if small is not None:
            return small
    return _estimate_vectorised(lp, v, sampled_col, collapsed)


def _estimate_vectorised(
    lp: F64, v: int, sampled_col: NDArray[np.integer] | None, collapsed: NDArray[np.bool_] | None
) -> PositionEstimates:
    """:func:`estimate_positions` over whole arrays (``lp`` already validated as 2-D float64)."""
    t, w = lp.shape
    if t == 0 or w == 0:
        empty = np.zeros(t)
        return PositionEstimates(
            point=empty + 0.5 * math.log(v), lower=empty, upper=empty + math.log(v), tail_mass=empty + 1.0,
            top1_prob=empty, margin=empty, n_known=np.zeros(t, dtype=np.int64),
        )

    known = ~np.isnan(lp)
    p = np.exp(np.minimum(lp, 0.0))  # NaN stays NaN; positive logits clamp to p = 1
    p[~(lp > NEG_INF_SENTINEL)] = 0.0  # padding and vLLM's -inf sentinel
    total = p.sum(axis=1)
    over = total > 1.0
    if over.any():  # logits mode or rounding: scale the row back to a sub-distribution
        p[over] /= total[over, None]
        total = np.minimum(total, 1.0)
    n_known = known.sum(axis=1)
    r = np.maximum(1.0 - total, 0.0)
    h_known = _xlogx(p).sum(axis=1)

    # Positive entries other than the sampled token are the true top ranks 1..n (vLLM lists the sampled token
    # plus the top K-1); the sampled token is itself one of them unless it is the least probable entry.
    pos = np.where(p > 0.0, p, np.inf)
    if sampled_col is None:
        has_s = np.zeros(t, dtype=bool)
        p_s = np.zeros(t)
    else:
        scol = np.asarray(sampled_col, dtype=np.int64)
        has_s = (scol >= 0) & (scol < w)
        has_s[has_s] = known[has_s, scol[has_s]]
        rows = np.nonzero(has_s)[0]
        p_s = np.zeros(t)
        p_s[rows] = p[rows, scol[rows]]
        pos[rows, scol[rows]] = np.inf
    min_o = pos.min(axis=1)  # smallest positive entry other than the sampled token (inf if none)
    n_pos_o = np.count_nonzero(pos < np.inf, axis=1)

    # Bounds. The cap on an unseen token's probability: the smallest other entry (1 if there is none). Without
    # the sampled column any one entry may be a sampled token below rank K, so the second smallest is the cap.
    cap = np.where(n_pos_o > 0, min_o, 1.0)
    unknown = ~has_s & (n_pos_o > 0)
    if unknown.any():
        second = np.partition(pos, 1, axis=1)[:, 1] if w > 1 else np.full(t, np.inf)
        cap = np.where(unknown, np.where(second < np.inf, second, 1.0), cap)
    if collapsed is not None:  # a merged-away entry can hold any part of r (see the module docstring)
        cap = np.where(np.asarray(collapsed, dtype=bool), 1.0, cap)
    upper = h_known + _xlogx(r) + r * np.log(np.maximum(v - n_known, 1))
    lower = np.minimum(h_known + _packed_lower(r, cap), upper)

    # Point: Gaussian-logit tail below the top set (the sampled token moves into the tail below the others).
    s_in_tail = (p_s < min_o) & (p_s > 0.0) & (n_pos_o > 0)
    s_top = (p_s > 0.0) & ~s_in_tail
    n_top = n_pos_o + s_top
    p_last = np.where(s_top, np.minimum(min_o, p_s), min_o)
    mass = np.where(s_in_tail, r + p_s, r)
    h_top = np.where(s_in_tail, h_known - _xlogx(p_s), h_known)
    model = (n_top > 0) & (mass > 0.0) & (mass < (v - n_top) * p_last)
    point = np.where(mass > 0.0, upper, h_known)  # no fitting tail: an even spread (or no tail at all)
    if model.any():
        h_tail = _tail_entropy(  # rows outside the model get harmless stand-in inputs
            np.where(model, p_last, 1.0), np.where(model, n_top, 1), np.where(model, mass, 0.5), v
        )
        point = np.where(model, h_top + h_tail, point)
    point = np.where(n_top > 0, point, 0.5 * (lower + upper))
    point = np.clip(point, lower, upper)

    srt = -np.sort(-p, axis=1)  # descending; padding is 0
    top1 = srt[:, 0]
    margin = top1 - srt[:, 1] if w > 1 else top1.copy()
    return PositionEstimates(
        point=point, lower=lower, upper=upper, tail_mass=r, top1_prob=top1, margin=margin,
        n_known=n_known.astype(np.int64),
    )


@lru_cache(maxsize=512)
def _tail_row(vocab_size: int, n: int) -> list[float]:
    """Row ``n`` of the table :func:`_tail_entropy` would use for a lone row of ``n`` top ranks, as floats."""
    row: list[float] = _tail_table(vocab_size, max(32, 1 << (n - 1).bit_length()))[n].tolist()
    return row


_Row = tuple[float, float, float, float, float, float, int]


def _estimate_row(row: list[float], v: int, scol: int, collapsed: bool) -> _Row:
    """One position of :func:`_estimate_vectorised` in scalar Python: the same formulas in the same order.

    Returns ``(point, lower, upper, tail_mass, top1_prob, margin, n_known)``. ``log p`` of an entry is its own
    logprob, except in rows that had to be rescaled (positive logprobs or a sum above 1).
    """
    w = len(row)
    try:
        p = list(map(_exp, row))  # exp(<= -9999) is 0 like the sentinel rule; NaN, positive, -inf: see below
        total = sum(p)
    except OverflowError:  # a logit above 709: the general rules below
        p, total = [], math.inf
    h_known = -sum(map(mul, p, row)) if total <= 1.0 else math.nan  # NaN total: padding
    n_known = w
    if h_known != h_known:  # padding, positive logprobs, or -inf (0 * -inf): the general rules
        p = [(_exp(x) if x < 0.0 else 1.0) if x > NEG_INF_SENTINEL else 0.0 for x in row]
        total = sum(p)
        if total > 1.0:
            p = [x / total for x in p]
            total = 1.0
        h_known = -sum([x * _log(x) for x in p if x > 0.0], 0.0)
        n_known = w - sum([1 for x in row if x != x])
    r = 1.0 - total if total < 1.0 else 0.0

    srt = sorted(p)
    k0 = bisect_right(srt, 0.0)  # srt[k0:] are the positive entries
    has_s = 0 <= scol < w and row[scol] == row[scol]
    p_s = p[scol] if has_s else 0.0
    n_pos_o = w - k0 - (p_s > 0.0)  # positive entries other than the sampled token
    if n_pos_o == 0:
        min_o = math.inf
    else:
        min_o = srt[k0 + 1] if p_s > 0.0 and srt[k0] == p_s else srt[k0]
    if collapsed or n_pos_o == 0:
        cap = 1.0
    elif has_s:
        cap = min_o
    else:  # any entry may be a sampled token from below rank K: the second smallest caps the tail
        cap = srt[k0 + 1] if n_pos_o > 1 else 1.0
    m = v - n_known
    upper = h_known
    lower = h_known
    if r > 0.0:
        upper = h_known - r * _log(r) + r * _log(m if m > 1 else 1)
        q = r / cap
        full = _floor(q) if q < 4503599627370496.0 else q  # beyond 2^52 (or inf) q is already integral
        rest = r - full * cap
        lower = h_known + (full * (-cap * _log(cap)) + (-rest * _log(rest) if rest > 0.0 else 0.0))
    if lower > upper:
        lower = upper

    if 0.0 < p_s < min_o and n_pos_o > 0:  # the sampled token sits in the tail below the top set
        n_top, p_last, mass, h_top = n_pos_o, min_o, r + p_s, h_known + p_s * _log(p_s)
    else:
        n_top, mass, h_top = n_pos_o + (p_s > 0.0), r, h_known
        p_last = p_s if 0.0 < p_s <= min_o else min_o
    if n_top == 0:
        point = 0.5 * (lower + upper)
    elif mass <= 0.0:
        point = h_known
    elif mass < (v - n_top) * p_last:
        g = _tail_row(v, n_top)
        log_p = _log(p_last)
        last = len(g) - 1
        pos = (_log(max(v - n_top, 1)) + log_p - _log(mass)) * (1.0 / _S_STEP)
        pos = 0.0 if pos < 0.0 else (pos if pos < last else float(last))
        i = min(int(pos), last - 1)
        frac = pos - i
        point = h_top + mass * ((g[i] * (1.0 - frac) + g[i + 1] * frac) - log_p)
    else:
        point = upper
    point = lower if point < lower else (upper if point > upper else point)
    top1 = srt[-1]
    return point, lower, upper, r, top1, top1 - srt[-2] if w > 1 else top1, n_known


def _estimate_small(
    lp: F64, v: int, sampled_col: NDArray[np.integer] | None, collapsed: NDArray[np.bool_] | None
) -> PositionEstimates | None:
    """:func:`estimate_positions` row by row in scalar Python, for the few rows of one stream chunk.

    numpy costs about a microsecond per array operation whatever the size, and the vectorised path takes
    some 80 of them, so below a few dozen rows plain floats win. ``None`` when the optional arrays have a
    shape other than ``(T,)`` (the vectorised path then applies its own broadcasting or raises).
    """
    rows: list[list[float]] = lp.tolist()
    t = len(rows)
    if sampled_col is None:
        cols: list[int] = [-1] * t
    else:
        scol = np.asarray(sampled_col, dtype=np.int64)
        if scol.shape != (t,):
            return None
        cols = scol.tolist()
    if collapsed is None:
        coll: list[bool] = [False] * t
    else:
        c = np.asarray(collapsed, dtype=bool)
        if c.shape != (t,):
            return None
        coll = c.tolist()
    out = [_estimate_row(rows[j], v, cols[j], coll[j]) for j in range(t)]
    a = np.array(out, dtype=np.float64).T  # (7, T); n_known < 2^53 is exact as a float
    if t > 1:
        a = a.copy()  # each field contiguous, as from the vectorised path
    n_known = a[6].astype(np.int64)
    return PositionEstimates(
        point=a[0], lower=a[1], upper=a[2], tail_mass=a[3], top1_prob=a[4], margin=a[5], n_known=n_known
    )


def estimate_rows(
    rows: list[list[float]], vocab_size: int, sampled_cols: list[int]
) -> tuple[list[float], list[float], list[float], list[float]] | None:
    """``(point, lower, upper, tail_mass)`` of :func:`estimate_positions` for a stream chunk's rows given as Python
    floats (every entry known, none merged), as lists: the very numbers that call returns, without building and
    unpacking arrays (a few microseconds a chunk). ``None`` when that call would take the vectorised path (too
    many rows, too wide, ragged or empty rows): call :func:`estimate_positions` then.
    """
    t = len(rows)
    if not 0 < t <= _SMALL_MAX_ROWS or len(sampled_cols) != t:
        return None
    w = len(rows[0])
    if not 0 < w <= _TABLE_MAX_N or any(len(r) != w for r in rows):
        return None
    v = int(vocab_size)
    if v < 1:
        raise ValueError("vocab_size must be positive")
    if t == 1:
        o = _estimate_row(rows[0], v, sampled_cols[0], False)
        return [o[0]], [o[1]], [o[2]], [o[3]]
    out = [_estimate_row(r, v, c, False) for r, c in zip(rows, sampled_cols, strict=True)]
    return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out], [o[3] for o in out]


def renormalised_entropy(logprobs: NDArray[np.float64]) -> F64:
    """Naive baseline: entropy (nats) of the known entries renormalised to sum 1 (ignores the tail).

    ``H = -sum_i (p_i / s) log(p_i / s)`` with ``s = sum_i p_i``; 0 for a row without entries.
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    p = np.where(~np.isnan(lp) & (lp > NEG_INF_SENTINEL), np.exp(np.minimum(np.nan_to_num(lp), 0.0)), 0.0)
    s = p.sum(axis=1, keepdims=True)
    q = p / np.where(s > 0.0, s, 1.0)
    out: F64 = _xlogx(q).sum(axis=1)
    return out
