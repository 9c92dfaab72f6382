"""Forking-token statistics of one response (Wang et al., "Beyond the 80/20 Rule", arXiv 2506.01939).

A *forking* token is one whose entropy exceeds the forking threshold (fixed, or the rolling 80th percentile of
:mod:`monitors.quantile`). Collapse shows first as lost entropy at forking tokens, not as a uniform dimming, so
the monitor tracks, per response:

- ``fraction``: share of tokens with H > threshold;
- ``mean_forking`` / ``mean_rest``: mean entropy of forking tokens and of the others (nats; None if empty);
- ``near_zero``: share of tokens with H < 0.01 nats (over half of all tokens in the paper);
- ``top20_mean``: mean entropy of the response's own top 20 % tokens (ceil(0.2 T) largest), a threshold-free
  reading of the same thing that does not move when the adaptive threshold itself follows a collapse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

NEAR_ZERO = 0.01
TOP_SHARE = 0.2


@dataclass(frozen=True, slots=True)
class ForkingStats:
    tokens: int
    threshold: float
    fraction: float | None
    mean_forking: float | None
    mean_rest: float | None
    near_zero: float | None
    top20_mean: float | None


def forking_stats(entropies: NDArray[np.float64], threshold: float) -> ForkingStats:
    """Forking statistics of one response's per-token entropies (nats) at ``threshold`` (nats)."""
    h = np.asarray(entropies, dtype=np.float64)
    h = h[~np.isnan(h)]
    t = int(h.size)
    if t == 0:
        return ForkingStats(0, threshold, None, None, None, None, None)
    fork = h > threshold
    nf = int(np.count_nonzero(fork))
    k = max(1, math.ceil(TOP_SHARE * t))
    top = np.partition(h, t - k)[t - k :]
    return ForkingStats(
        tokens=t,
        threshold=threshold,
        fraction=nf / t,
        mean_forking=float(h[fork].mean()) if nf else None,
        mean_rest=float(h[~fork].mean()) if nf < t else None,
        near_zero=float(np.count_nonzero(h < NEAR_ZERO)) / t,
        top20_mean=float(top.mean()),
    )
