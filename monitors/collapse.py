"""Collapse score in [0, 1] and the entropy-performance law fit.

**Collapse score.** Three components, each in [0, 1]:

- ``entropy``:   ``DownwardCusum.level`` on the per-response mean entropy (a *sustained* fall against the baseline
  reference, in baseline standard deviations; not a single threshold);
- ``forking``:   the same on the per-response mean entropy of its top-20 % tokens (loss of entropy at forking
  tokens, which is where collapse shows first, RESEARCH section 2);
- ``diversity``: the largest relative fall of a diversity measure (distinct-2, chrF distance, format entropy)
  against its baseline value, ``clip((base - now) / base / DIVERSITY_FULL_DROP, 0, 1)``: a 50 % fall reads 1.
  Measures whose baseline is below ``MIN_BASE`` (e.g. a single-format model) are skipped.

``score = sum(w_c * c) / sum(w_c)`` over the components that have a reading, with weights entropy 0.4, forking
0.3, diversity 0.3. So a uniform fall of entropy alone (entropy + forking, diversity steady) reads at most 0.7,
and reaching 1 needs diversity to fall as well: "entropy down + diversity down + forking entropy down =
collapse; entropy down with diversity steady = recognition" (RESEARCH section 7). Healthy stationary traffic
reads ~0. ``COLLAPSE_THRESHOLD`` = 0.5 is the line the diagnosis and the default alert use.

**Entropy-performance law** (Cui et al., arXiv 2505.22617): R = -a exp(H) + b, performance saturating as H -> 0
with ceiling R(0) = b - a. The paper relates a *policy's* entropy to its accuracy across checkpoints, not one
response's entropy to its own 0/1 label, so the fit runs over aggregates: :class:`PerformanceFit` groups the
labelled responses of a model into consecutive time windows of ``window`` labels and fits one point per window
(mean entropy, mean score = accuracy); canary rounds give such points directly (mean entropy, pass@1). It is
linear in (a, b) with regressor x = exp(H), so ordinary least squares fits it in closed form. The ceiling is a
performance, so it is clipped to [0, 1]. A response labelled again (feedback replaces the earlier label) counts
once, with its latest label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .changepoint import DownwardCusum

WEIGHTS = {"entropy": 0.4, "forking": 0.3, "diversity": 0.3}
DIVERSITY_FULL_DROP = 0.5
MIN_BASE = 0.05
COLLAPSE_THRESHOLD = 0.5
DIVERSITY_MEASURES = ("distinct_2", "chrf_distance", "format_entropy")


def combine(components: dict[str, float | None]) -> float:
    """Weighted mean of the available components (see module docstring); 0 when none is available."""
    num = den = 0.0
    for name, w in WEIGHTS.items():
        c = components.get(name)
        if c is not None:
            num += w * min(1.0, max(0.0, c))
            den += w
    return num / den if den else 0.0


def diversity_drop(baseline: dict[str, float | None], current: dict[str, float | None]) -> float | None:
    """Largest relative fall of a diversity measure against its baseline, scaled to [0, 1]; None if none comparable."""
    out: float | None = None
    for m in DIVERSITY_MEASURES:
        b, c = baseline.get(m), current.get(m)
        if b is None or c is None or b < MIN_BASE:
            continue
        v = min(1.0, max(0.0, (b - c) / b / DIVERSITY_FULL_DROP))
        out = v if out is None else max(out, v)
    return out


class CollapseMonitor:
    """Per-model collapse state: two CUSUMs and the diversity baseline."""

    def __init__(
        self, warmup: int | None = None, k: float = 0.5, h: float = 10.0, batch: int = 4, min_reference: int = 400
    ) -> None:
        # The reference needs >= min_reference responses; tests run on means of `batch` responses.
        self.entropy = DownwardCusum(k=k, h=h, warmup=warmup, batch=batch, min_reference=min_reference)
        self.forking = DownwardCusum(k=k, h=h, warmup=warmup, batch=batch, min_reference=min_reference)
        self.diversity_base: dict[str, float | None] = {m: None for m in DIVERSITY_MEASURES}

    def update(self, mean_entropy: float, top20_mean: float | None) -> None:
        self.entropy.update(mean_entropy)
        if top20_mean is not None:
            self.forking.update(top20_mean)

    def freeze(self) -> None:
        """Fix the CUSUM references (the drift baseline completed)."""
        self.entropy.freeze()
        self.forking.freeze()

    def note_diversity(self, current: dict[str, float | None], baseline_ready: bool) -> None:
        """Capture each diversity measure's baseline the first time it is available after the baseline is ready."""
        if not baseline_ready:
            return
        for m in DIVERSITY_MEASURES:
            if self.diversity_base.get(m) is None and current.get(m) is not None:
                self.diversity_base[m] = current[m]

    def components(self, current_diversity: dict[str, float | None]) -> dict[str, float | None]:
        return {
            "entropy": self.entropy.level if self.entropy.ready else None,
            "forking": self.forking.level if self.forking.ready else None,
            "diversity": diversity_drop(self.diversity_base, current_diversity),
        }

    def score(self, current_diversity: dict[str, float | None]) -> float:
        return combine(self.components(current_diversity))

    def to_dict(self) -> dict[str, Any]:
        return {"entropy": self.entropy.to_dict(), "forking": self.forking.to_dict(), "diversity": self.diversity_base}

    def load_dict(self, data: dict[str, Any]) -> None:
        for name, det in (("entropy", self.entropy), ("forking", self.forking)):
            ref = data.get(name) or {}
            mu, sd = ref.get("mu0"), ref.get("sigma0")
            if isinstance(mu, (int, float)) and isinstance(sd, (int, float)):
                det.set_reference(float(mu), float(sd))
        div = data.get("diversity") or {}
        for m in DIVERSITY_MEASURES:
            v = div.get(m)
            self.diversity_base[m] = float(v) if isinstance(v, (int, float)) else None


@dataclass(frozen=True, slots=True)
class LawFit:
    a: float
    b: float
    ceiling: float  # b - a, clipped to [0, 1]: predicted performance at H = 0
    n: int  # points fitted (windows or rounds)
    r2: float
    labels: int = 0  # labelled responses behind the points (0 when the points are not windows of labels)


def fit_entropy_performance(h: NDArray[np.float64], r: NDArray[np.float64]) -> LawFit | None:
    """Least-squares fit of R = -a exp(H) + b; None with fewer than 3 points or no spread in exp(H)."""
    h = np.asarray(h, dtype=np.float64)
    r = np.asarray(r, dtype=np.float64)
    ok = np.isfinite(h) & np.isfinite(r)
    h, r = h[ok], r[ok]
    if h.size < 3:
        return None
    x = np.exp(np.minimum(h, 50.0))
    xm, rm = x.mean(), r.mean()
    sxx = float(np.sum((x - xm) ** 2))
    if sxx <= 1e-12 * max(1.0, float(xm) ** 2) * h.size:
        return None
    slope = float(np.sum((x - xm) * (r - rm))) / sxx  # = -a
    a = -slope
    b = float(rm) - slope * float(xm)
    ss_res = float(np.sum((r - (b - a * x)) ** 2))
    ss_tot = float(np.sum((r - rm) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return LawFit(a=a, b=b, ceiling=min(1.0, max(0.0, b - a)), n=int(h.size), r2=r2)


class PerformanceFit:
    """Labelled responses of one model (the last ``max_points``), each counted once, fitted over time windows.

    :meth:`add` takes a response's mean entropy and its score (1/0 for correct/incorrect, or a score in [0, 1]);
    ``key`` identifies the response, so a later label for it replaces the earlier one. :meth:`fit` splits the
    labels, in arrival order, into consecutive windows of ``window`` labels (a last, partial window is left out
    until it fills), one point each - (mean entropy, mean score) - and fits once ``min_windows`` points exist.
    """

    def __init__(self, max_points: int = 5_000, window: int = 50, min_windows: int = 4) -> None:
        self.window, self.min_windows, self.max_points = window, min_windows, max_points
        self._pts: dict[Any, tuple[float, float]] = {}  # insertion order = arrival order of the first label
        self._seq = 0

    def add(self, mean_entropy: float, score: float, *, key: Any = None) -> None:
        if not (math.isfinite(mean_entropy) and math.isfinite(score)):
            return
        if key is None:
            key, self._seq = ("_anonymous", self._seq), self._seq + 1
        self._pts[key] = (mean_entropy, score)  # a repeated key keeps its place and takes the new label
        while len(self._pts) > self.max_points:
            del self._pts[next(iter(self._pts))]

    def __len__(self) -> int:
        return len(self._pts)

    def windows(self) -> list[tuple[float, float]]:
        """(mean entropy, mean score) of each complete window of ``window`` labels, oldest first."""
        arr = np.asarray(list(self._pts.values()), dtype=np.float64).reshape(-1, 2)
        full = arr.shape[0] // self.window
        if full == 0:
            return []
        means = arr[: full * self.window].reshape(full, self.window, 2).mean(axis=1)
        return [(float(h), float(r)) for h, r in means]

    def fit(self) -> LawFit | None:
        w = self.windows()
        if len(w) < self.min_windows:
            return None
        arr = np.asarray(w, dtype=np.float64)
        got = fit_entropy_performance(arr[:, 0], arr[:, 1])
        return None if got is None else replace(got, labels=len(w) * self.window)
