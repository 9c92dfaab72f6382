"""The baseline side of one model's live monitors (:class:`proxy.monitoring.ModelMonitors` holds one).

- While the model's revision has no baseline in use, a :class:`~proxy.baselines.model.BaselineBuilder` collects
  the warm-up; when it holds the volume (and the text worker has caught up, so the diversity readings cover the
  same responses) the finished baseline goes to ``on_candidate`` (the store, via the poller) or, when nothing
  persists baselines, is applied here directly.
- Once a baseline is in use, every token is compared with its **fixed** forking threshold: two counters
  (``checked``, ``above``) that the alert rules turn into a forking fraction comparable with the baseline's.
- ``missing()`` lists what a verdict still lacks (a baseline, a window's volume): the state is ``unknown``
  until it is empty.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from monitors.diversity import DISTINCT_WINDOW

from .model import Baseline, BaselineBuilder

if TYPE_CHECKING:
    from proxy.monitoring import ModelMonitors
    from proxy.settings import MonitorSettings


class LiveBaseline:
    def __init__(self, model: str, revision: str, settled: bool, settings: MonitorSettings) -> None:
        self.model, self.revision, self.settled = model, revision, settled
        self.settings = settings
        self.baseline: Baseline | None = None
        self.builder: BaselineBuilder | None = None
        self.candidate: Baseline | None = None  # finished, handed over, not yet confirmed by the store
        self.checked = 0  # tokens compared with the baseline's fixed forking threshold
        self.above = 0  # of those, above it
        self.text_done = 0
        self.times: deque[float] = deque(maxlen=settings.window)

    # -- request path ------------------------------------------------------------------------------------------------
    def threshold(self) -> float | None:
        b = self.baseline
        return b.forking_threshold if b is not None else None

    def observe(self, h: NDArray[np.float64]) -> None:
        self.times.append(time.time())
        thr = self.threshold()
        if thr is not None:
            self.checked += int(h.size)
            self.above += int(np.count_nonzero(h > thr))
            return
        if self.candidate is not None or not self.settled:
            return
        if self.builder is None:
            m = self.settings
            self.builder = BaselineBuilder(self.model, self.revision, m.baseline, m.baseline_responses)
        self.builder.add(h)

    # -- worker side ---------------------------------------------------------------------------------------------------
    def maybe_finish(self, mm: ModelMonitors, on_candidate: Callable[[str, Baseline], None] | None) -> Baseline | None:
        """After text work: finish the warm-up when its volume is there and the text readings cover it."""
        self.text_done += 1
        b = self.builder
        if b is None or b.done or self.baseline is not None or not b.volume_reached:
            return None
        if self.text_done < b.min_responses:
            return None
        comparable = mm.text.get("comparable") or {}
        samples = mm.text.get("samples") or {}
        cand = b.finish(comparable, samples)
        self.candidate = cand
        if on_candidate is None:
            apply(mm, cand)
        else:
            on_candidate(self.model, cand)
        return cand

    # -- readings ------------------------------------------------------------------------------------------------------
    def window(self, mm: ModelMonitors) -> dict[str, Any]:
        return {
            "responses": min(mm.responses, mm.drift.window),
            "tokens": mm.drift.window_token_count,
            "size_responses": mm.drift.window,
            "since": self.times[0] if self.times else None,
            "until": self.times[-1] if self.times else None,
        }

    def missing(self, mm: ModelMonitors) -> list[str]:
        out: list[str] = []
        if self.baseline is None:
            b = self.builder
            if not self.settled:
                out.append("revision not known yet (the upstream has not answered /v1/models)")
            elif self.candidate is not None:
                out.append(f"baseline of revision {self.revision} finished, waiting for the store")
            else:
                tok, resp = (b.tokens, b.responses) if b is not None else (0, 0)
                out.append(f"no baseline for revision {self.revision} yet: warm-up {tok}/{self.settings.baseline} "
                           f"tokens, {resp}/{self.settings.baseline_responses} responses")
        w = self.window(mm)
        if w["tokens"] < self.settings.evidence_tokens:
            out.append(f"window holds {w['tokens']} tokens (< {self.settings.evidence_tokens})")
        if w["responses"] < self.settings.evidence_responses:
            out.append(f"window holds {w['responses']} responses (< {self.settings.evidence_responses})")
        return out

    def status(self, mm: ModelMonitors) -> dict[str, Any]:
        b = self.builder
        return {
            "window": self.window(mm),
            "min_tokens": self.settings.evidence_tokens,
            "min_responses": self.settings.evidence_responses,
            "missing": self.missing(mm),
            "warmup": None if self.baseline is not None or b is None else b.progress(),
            "forking_fixed": None if self.baseline is None else {
                "threshold": self.threshold(), "checked_tokens": self.checked, "above": self.above,
                "fraction": round(self.above / self.checked, 5) if self.checked else None,
            },
        }


def apply(mm: ModelMonitors, b: Baseline) -> None:
    """Make ``b`` the baseline the model's monitors compare with: drift histograms, the collapse detectors'
    references, the diversity baseline and the fixed forking threshold."""
    live = mm.live
    assert live is not None
    d = b.drift_dict()
    if d is not None:
        mm.drift.load_dict(d)
        mm.drift.source = b.source
    mm.collapse.load_dict(b.collapse_dict())
    n = b.diversity_samples.get("distinct_2")
    if b.diversity.get("distinct_2") is not None and n:
        mm.diversity.set_distinct_window(n)  # a pin from a run with another warm-up: compare like with like
    live.baseline = b
    live.candidate = None
    live.builder = None


def distinct_window(settings: MonitorSettings) -> int:
    """Responses behind distinct-2: 200, or the warm-up's response count when that is smaller.

    Distinct-n falls as its window grows, so a reading is comparable only with one over as many responses, and it
    is reported as ready only once its window is full. A window longer than the warm-up left every automatic
    baseline (and every ``baseline save`` of a short staging run) without distinct-2; the live reading and the
    baseline now use the same window, full when the warm-up ends.
    """
    return min(DISTINCT_WINDOW, settings.baseline_responses)


def diversity_samples(mm: ModelMonitors) -> dict[str, int]:
    """Responses behind each diversity reading (``entropy_proxy_diversity_samples``); from the worker's thread."""
    div = mm.diversity
    return {
        "distinct_2": len(div._bigram_ring),
        "chrf_distance": sum(len(g.seqs) for g in div._groups.values() if len(g.seqs) >= 2),
        "format_entropy": len(mm.formats),
        "semantic_gram_entropy": mm.grams.planning_responses(),
    }
