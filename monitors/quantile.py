"""A bounded streaming quantile sketch for token entropy: the adaptive forking-token threshold.

The forking cut-off of Wang et al. (arXiv 2506.01939) is the 80th percentile of token entropy over a batch
(0.672 nats on Qwen3-8B, but model- and data-specific), so the proxy keeps a *rolling* 80th percentile per model.

Design: a fixed-bin histogram over a ring of count buckets.

- Bins: one bin ``[0, floor)`` for the near-zero mass (over half of all tokens sit there), then ``n_bins``
  log-spaced bins from ``floor`` to ``ceiling``, and one overflow bin. Log spacing gives a constant relative
  resolution: with the defaults (1e-4 .. 16 nats, 480 bins) a bin spans 2.5 % of its lower edge, and the quantile
  is interpolated linearly inside the bin, so the error is well under that.
- Window: ``buckets`` ring slots of ``bucket_tokens`` tokens each. When the newest slot is full the oldest is
  subtracted from the running total and reused. The window therefore covers the last
  ``(buckets - 1) * bucket_tokens`` to ``buckets * bucket_tokens`` tokens (defaults: 35,000 - 40,000).
- Memory: ``(buckets + 1) * (n_bins + 2)`` int64 counters, fixed at construction (defaults: 8 x 482 + 482, ~35 kB),
  whatever the traffic.
- Cost: ``update`` is one ``searchsorted`` and one ``bincount`` per response, O(T log n_bins).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

Floats = NDArray[np.float64]


class RollingQuantile:
    """Rolling quantiles of a non-negative quantity (nats) over the last N values, in bounded memory."""

    def __init__(
        self,
        *,
        buckets: int = 8,
        bucket_tokens: int = 5_000,
        n_bins: int = 480,
        floor: float = 1e-4,
        ceiling: float = 16.0,
    ) -> None:
        if buckets < 2 or bucket_tokens < 1 or n_bins < 2 or not 0 < floor < ceiling:
            raise ValueError("RollingQuantile: need buckets >= 2, bucket_tokens >= 1, n_bins >= 2, 0 < floor < ceiling")
        # Edges: 0, floor, ..., ceiling, +inf  -> n_bins + 2 bins.
        log_edges = np.geomspace(floor, ceiling, n_bins + 1)
        self.edges: Floats = np.concatenate(([0.0], log_edges, [np.inf]))
        self._inner: Floats = self.edges[1:-1]  # searchsorted against the interior edges
        self.n = len(self.edges) - 1
        self.bucket_tokens = bucket_tokens
        self._ring = np.zeros((buckets, self.n), dtype=np.int64)
        self._fill = np.zeros(buckets, dtype=np.int64)
        self._head = 0
        self._total = np.zeros(self.n, dtype=np.int64)

    @property
    def count(self) -> int:
        """Values currently in the window."""
        return int(self._fill.sum())

    def update(self, values: Floats) -> None:
        """Add a batch of values (NaN ignored, negatives clamped to 0)."""
        v = np.asarray(values, dtype=np.float64)
        v = v[~np.isnan(v)]
        if v.size == 0:
            return
        idx = np.searchsorted(self._inner, np.maximum(v, 0.0), side="right")
        counts = np.bincount(idx, minlength=self.n)
        if self._fill[self._head] >= self.bucket_tokens:
            self._rotate()
        # A batch lands in one slot even if it overfills it a little: slots are a granularity, not a hard cap.
        self._ring[self._head] += counts
        self._total += counts
        self._fill[self._head] += v.size

    def _rotate(self) -> None:
        self._head = (self._head + 1) % len(self._fill)
        self._total -= self._ring[self._head]
        self._ring[self._head] = 0
        self._fill[self._head] = 0

    def quantile(self, q: float, default: float = float("nan")) -> float:
        """The q-quantile (0 <= q <= 1) of the window, linearly interpolated inside its bin; ``default`` if empty."""
        if not 0.0 <= q <= 1.0:
            raise ValueError("q must be in [0, 1]")
        total = int(self._total.sum())
        if total == 0:
            return default
        cum = np.cumsum(self._total)
        target = q * total
        b = int(np.searchsorted(cum, target, side="left"))
        b = min(b, self.n - 1)
        before = float(cum[b - 1]) if b > 0 else 0.0
        inside = float(self._total[b])
        lo = float(self.edges[b])
        hi = float(self.edges[b + 1])
        if not np.isfinite(hi):  # overflow bin: report its lower edge, the ceiling
            return lo
        frac = (target - before) / inside if inside > 0 else 0.0
        return lo + min(max(frac, 0.0), 1.0) * (hi - lo)

    def state(self) -> dict[str, Any]:
        return {"count": self.count, "window_tokens": self.bucket_tokens * len(self._fill)}
