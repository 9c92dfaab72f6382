"""A cap on the CPU the monitors' text work may take, as a share of one core (``monitors.text_work_share``).

The text work (format classification, distinct-2, chrF against earlier answers to the same prompt, strategic
grams) runs in a thread of the proxy's own interpreter: every millisecond it computes is a millisecond the event
loop does not relay tokens. The budget is a token bucket of CPU seconds: it fills at ``share`` CPU-seconds per
wall-clock second up to ``share * burst_s`` and each job's measured CPU time (``time.thread_time``) is taken out
of it. A job that finds the bucket empty is skipped and counted; the monitors' readings then stand on the
responses that were processed (``entropy_proxy_diversity_samples`` says how many), a sample spread over time
rather than chosen by content. Under light traffic nothing is skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TextBudget:
    def __init__(self, share: float, burst_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        if share <= 0:
            raise ValueError("share must be positive (0 means no cap: use no budget)")
        self.share = share
        self.capacity = share * burst_s
        self.clock = clock
        self.credit = self.capacity
        self._last = clock()

    def allow(self) -> bool:
        """True when a job may run now (the bucket holds credit)."""
        now = self.clock()
        self.credit = min(self.capacity, self.credit + (now - self._last) * self.share)
        self._last = now
        return self.credit > 0.0

    def charge(self, cpu_s: float) -> None:
        """Take a finished job's CPU time out of the bucket (it may go below zero: later jobs wait it out)."""
        self.credit -= cpu_s
