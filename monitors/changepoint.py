"""Change detectors for a sustained *fall* of a monitored mean (entropy, forking-token entropy).

Two classic sequential tests, both plain state machines (``update(x) -> alarm``):

- :class:`DownwardCusum` (Page 1954, tabular CUSUM against a reference): learns the in-control mean mu0 and
  standard deviation sigma0 from the first ``warmup`` values (or takes them from a saved baseline), then
  ``S_t = min(cap, max(0, S_{t-1} + (mu0 - x_t) / sigma0 - k))``; alarm while ``S_t > h``.
  With ``batch`` > 1 the test runs on means of ``batch`` consecutive values against sigma0 / sqrt(batch)
  (sigma0 still estimated from single values), which makes skewed inputs closer to normal and the false-alarm rate
  closer to the textbook one; the statistic then moves once per batch. ``k`` is half the shift (in sigmas) the
  test is tuned for; ``h`` sets the false-alarm rate. For i.i.d. normal
  data, k = 0.5 and h = 5 give an in-control average run length of ~930 samples and detect a 1-sigma fall in
  ~10. The cap keeps the statistic able to come back down within ``(cap - h) / k`` in-control samples after
  recovery. ``level = clip(2 S / h - 1, 0, 1)`` is a continuous 0..1 reading for the collapse score: 0 while S
  is below half the alarm line (where in-control noise lives), 1 at the alarm.
- :class:`PageHinkley`: no reference needed; tracks ``m_t = sum (x_bar_t - x_i - delta)`` and alarms when
  ``m_t - min m > lambda`` (a fall of the running mean). Cheaper to set up, but it adapts to the new level, so it
  reports the change rather than the state; kept as a companion for status output.

sigma0 is floored (``min_sigma``) so that near-constant warm-up data does not make the test hair-trigger.
Memory: O(1).
"""

from __future__ import annotations

import math
from typing import Any


class DownwardCusum:
    def __init__(
        self,
        k: float = 0.5,
        h: float = 8.0,
        warmup: int | None = 100,
        cap: float = 16.0,
        min_sigma: float = 0.02,
        min_reference: int = 20,
        batch: int = 1,
    ) -> None:
        # warmup None: the reference is fixed only by freeze() (when the monitor's baseline completes).
        self.k, self.h, self.warmup, self.cap, self.min_sigma = k, h, warmup, cap, min_sigma
        self.min_reference = min_reference
        self.batch = max(1, batch)
        self._bsum = 0.0
        self._bn = 0
        self._n = 0
        self._mean = 0.0
        self._m2 = 0.0
        self.mu0: float | None = None
        self.sigma0: float | None = None
        self.s = 0.0
        self.samples = 0  # samples tested after the reference was fixed
        self.alarms = 0  # rising edges of the alarm
        self._alarm = False

    @property
    def ready(self) -> bool:
        return self.mu0 is not None

    def set_reference(self, mu0: float, sigma0: float) -> None:
        self.mu0, self.sigma0 = float(mu0), max(float(sigma0), self.min_sigma)
        self.s = 0.0

    def freeze(self) -> None:
        """Fix the reference from the values seen so far (called when the baseline completes)."""
        if self.mu0 is None and self._n >= max(2, self.min_reference):
            self.set_reference(self._mean, math.sqrt(self._m2 / (self._n - 1)))

    def update(self, x: float) -> bool:
        if not math.isfinite(x):
            return self._alarm
        if self.mu0 is None or self.sigma0 is None:
            self._n += 1
            d = x - self._mean
            self._mean += d / self._n
            self._m2 += d * (x - self._mean)
            if self.warmup is not None and self._n >= self.warmup:
                self.freeze()
            return False
        self._bsum += x
        self._bn += 1
        if self._bn < self.batch:
            return self._alarm
        x, self._bsum, self._bn = self._bsum / self._bn, 0.0, 0
        self.samples += 1
        z = (self.mu0 - x) / (self.sigma0 / math.sqrt(self.batch))
        self.s = min(self.cap, max(0.0, self.s + z - self.k))
        alarm = self.s > self.h
        if alarm and not self._alarm:
            self.alarms += 1
        self._alarm = alarm
        return alarm

    @property
    def alarm(self) -> bool:
        return self._alarm

    @property
    def level(self) -> float:
        return min(1.0, max(0.0, 2.0 * self.s / self.h - 1.0)) if self.ready else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"mu0": self.mu0, "sigma0": self.sigma0}

    def state(self) -> dict[str, Any]:
        return {
            "reference_mean": self.mu0, "reference_std": self.sigma0, "statistic": round(self.s, 4),
            "alarm": self._alarm, "alarms": self.alarms, "level": round(self.level, 4),
        }


class PageHinkley:
    """Page-Hinkley test for a decrease of the mean: alarm when ``m_t - min_{s<=t} m_s > lam``."""

    def __init__(self, delta: float = 0.005, lam: float = 5.0, min_samples: int = 30) -> None:
        self.delta, self.lam, self.min_samples = delta, lam, min_samples
        self.n = 0
        self.mean = 0.0
        self.m = 0.0
        self.m_min = 0.0
        self.alarms = 0
        self._alarm = False

    def update(self, x: float) -> bool:
        if not math.isfinite(x):
            return self._alarm
        self.n += 1
        self.mean += (x - self.mean) / self.n
        self.m += self.mean - x - self.delta
        self.m_min = min(self.m_min, self.m)
        alarm = self.n >= self.min_samples and self.m - self.m_min > self.lam
        if alarm and not self._alarm:
            self.alarms += 1
        self._alarm = alarm
        return alarm

    @property
    def alarm(self) -> bool:
        return self._alarm
