"""Live monitors per model, fed from Observations: forking threshold, drift, collapse, diversity, formats, planning.

Two paths:
- the request path (:meth:`Monitoring.observe`, called by the ObserverHub): numpy-only updates that cost a few
  tens of microseconds per response - the rolling quantile, forking statistics, drift histograms, CUSUMs;
- a background thread (bounded queue of ``QUEUE_SIZE`` jobs; when full, jobs are dropped and counted; at most
  ``monitors.text_work_share`` of a core, beyond which jobs are skipped and counted: proxy.hotpath.textbudget): the text
  work - format classification, distinct-2, chrF groups, strategic-gram matching and the planning/execution
  split of token entropy, whose results reach :attr:`Monitoring.token_class_sinks` (the Prometheus histograms).
  The worker publishes its readings as one dict per model (replaced whole), so readers never see a half update.

Monitors are kept per *label* (an allow-listed model name or ``other``): their number is bounded by the config.
Diagnosis (``state``): :func:`monitors.recognition.diagnose` over the collapse components, drift and the
recognition probe's ratio (when the probe runs). Without a probe ratio: ``collapse`` when the collapse score is
>= 0.5 and diversity fell (or is not measured yet), ``recognition`` when the score is >= 0.5 but diversity has not
fallen (its component < 0.25) - entropy down, behaviour steady; ``drift`` when PSI >= 0.25 (or JS >= 0.1); else
``healthy``. With a probe ratio, entropy down and diversity steady reads ``recognition`` only when the ratio's rise
over its baseline has a bootstrap interval above 1 (the model sharpened on its own samples relative to foreign
text), and ``drift`` when the interval holds 1 (both sides fell: they share the prompt, so the traffic changed).
Before any of that, ``unknown`` while the model's revision has no baseline in use or the window holds too little
(``monitors.evidence_tokens`` / ``evidence_responses``): :mod:`proxy.baselines.live`, docs/baselines.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np

from monitors.collapse import CollapseMonitor, PerformanceFit, combine
from monitors.diversity import DISTINCT_WINDOW, Diversity, prompt_key
from monitors.drift import DriftMonitor, validate_drift_dict
from monitors.forking import forking_stats
from monitors.formats import FormatMix, classify_format
from monitors.planning import PlanningClassifier, SemanticGramWindow, load_lexicon
from monitors.quantile import RollingQuantile
from monitors.recognition import Diagnosis, Evidence, diagnose

from .baselines import live as baseline_live
from .baselines.model import Baseline
from .hotpath.textbudget import TextBudget
from .observe import Observation
from .settings import Settings, SettingsError

log = logging.getLogger("entropy_proxy.monitoring")

DEFAULT_FORKING = 0.672  # Wang et al.'s 80th percentile, used until the sketch holds MIN_QUANTILE_TOKENS
MIN_QUANTILE_TOKENS = 500
FORKING_QUANTILE = 0.8
QUEUE_SIZE = 1_000
# The text work of a response waits until this long after the response was queued: a stream's end is when its
# client (or the next client) sends the next request, and the text work slows that request's first milliseconds
# whatever the GIL's switch interval (measured: docs/benchmarks.md §3). A backlog older than this runs at once.
TEXT_GRACE_S = 0.01
PSI_ALERT, JS_ALERT = 0.25, 0.1
STATES = ("healthy", "recognition", "collapse", "drift", "unknown")
BASELINE_FORMAT = "entropy-proxy-baseline"
TokenClassSink = Callable[[str, np.ndarray, np.ndarray], None]


def _mean(xs: deque[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


class ModelMonitors:
    def __init__(
        self, window: int, baseline_tokens: int, planner: PlanningClassifier, collapse_reference: int = 400,
        live: baseline_live.LiveBaseline | None = None, distinct_window: int = DISTINCT_WINDOW,
    ) -> None:
        # The baseline in use (per revision, from the store), its warm-up and the verdict's evidence gate.
        self.live = live
        self.quantile = RollingQuantile()
        self.drift = DriftMonitor(window=window, baseline_tokens=baseline_tokens)
        self.collapse = CollapseMonitor(min_reference=collapse_reference)
        self.diversity = Diversity(window=window, distinct_window=distinct_window)
        self.formats = FormatMix(window=window)
        self.grams = SemanticGramWindow(window=window)
        self.planner = planner
        self.fit = PerformanceFit()
        self.recent: dict[str, deque[float]] = {
            k: deque(maxlen=window) for k in ("fraction", "mean_forking", "mean_rest", "near_zero", "top20_mean")
        }
        self.responses = 0
        self.tokens = 0
        self.text: dict[str, Any] = {}  # published by the worker
        # Set by the recognition probe (proxy.probe): the window ratio H_off / H_on and its rise over the baseline.
        self.recognition_ratio: float | None = None
        self.recognition_rise: float | None = None
        self.recognition_rise_interval: tuple[float, float] | None = None

    def observe(self, h: np.ndarray, threshold: float) -> None:
        self.responses += 1
        self.tokens += int(h.size)
        self.quantile.update(h)
        fixed = self.live.threshold() if self.live is not None else None
        fs = forking_stats(h, threshold if fixed is None else fixed)  # the baseline's fixed cut-off, once there
        if self.live is not None:
            self.live.observe(h)
        for k, dq in self.recent.items():
            v = getattr(fs, k)
            if v is not None:
                dq.append(v)
        self.drift.update(h)
        if self.drift.frozen:
            self.collapse.freeze()  # no-op once the references are fixed
        self.collapse.update(float(h.mean()), fs.top20_mean)

    def text_work(self, text: str, prompt: Any, finish: str | None, tokens: list[str], h: np.ndarray) -> np.ndarray:
        self.formats.update(classify_format(text, finish))
        self.diversity.add(text, prompt_key(prompt) if prompt is not None else None)
        mask, grams = self.planner.classify(tokens) if len(tokens) == h.size else (np.zeros(h.size, bool), None)
        if grams is not None:
            self.grams.update(grams)
        chrf = self.diversity.chrf_stats()
        current = {
            "distinct_2": self.diversity.distinct_2() if self.diversity.distinct_ready else None,
            "chrf_distance": chrf["chrf_distance"] if (chrf["pairs"] or 0) >= 10 else None,
            "format_entropy": self.formats.entropy() if len(self.formats) >= 50 else None,
        }
        if self.live is None or self.live.baseline is None:
            self.collapse.note_diversity(current, self.drift.frozen)
        self.text = {
            "samples": baseline_live.diversity_samples(self),
            "distinct_2": self.diversity.distinct_2(),
            "chrf_distance": chrf["chrf_distance"],
            "chrf": chrf,
            "format_entropy": self.formats.entropy(),
            "formats": self.formats.shares(),
            "semantic_gram_entropy": self.grams.entropy(),
            "planning_responses": self.grams.planning_responses(),
            "comparable": current,
        }
        return mask

    def diversity_values(self) -> dict[str, float | None]:
        """Gauge values (latest readings, even before they are comparable with the baseline)."""
        t = self.text
        return {m: t.get(m) for m in ("distinct_2", "chrf_distance", "format_entropy", "semantic_gram_entropy")}

    def collapse_components(self) -> dict[str, float | None]:
        return self.collapse.components(self.text.get("comparable", {}))

    def collapse_score(self) -> float:
        return self.collapse.score(self.text.get("comparable", {}))

    # -- diagnosis (rule and evidence: monitors.recognition.diagnose) ------------------------------------------------
    def evidence(self) -> Evidence:
        comps = self.collapse_components()
        d = self.drift.drift()
        return Evidence(
            collapse_score=combine(comps), entropy_fall=comps.get("entropy"), forking_fall=comps.get("forking"),
            diversity_fall=comps.get("diversity"), psi=d["psi"], js=d["js"],
            recognition_ratio=self.recognition_ratio, recognition_rise=self.recognition_rise,
            recognition_rise_interval=self.recognition_rise_interval,
        )

    def diagnosis(self) -> Diagnosis:
        missing = self.live.missing(self) if self.live is not None else []
        if missing:  # never a verdict (least of all `healthy`) on no baseline or too little evidence
            return Diagnosis("unknown", tuple(missing))
        return diagnose(self.evidence())

    def state(self) -> str:
        return self.diagnosis().state


class Monitoring:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.allowed = set(settings.models)
        m = settings.monitors
        try:
            self.planner = PlanningClassifier(load_lexicon(m.strategic_grams_file))
        except (OSError, ValueError) as e:
            raise SettingsError(f"monitors.strategic_grams_file: {e}") from None
        self.models: dict[str, ModelMonitors] = {}
        self.recognition: dict[str, float] = {}
        # Extra top-level sections of status(), e.g. "probe" (name -> callable returning JSON-able data).
        self.status_sections: dict[str, Callable[[], Any]] = {}
        self.token_class_sinks: list[TokenClassSink] = []
        self._q: queue.Queue[tuple[float, tuple[str, str, Any, str | None, list[str], np.ndarray]]] = queue.Queue(
            QUEUE_SIZE)
        self.dropped = 0
        self.processed = 0
        # The text work's CPU cap (monitors.text_work_share; None: no cap) and the jobs it skipped, per label.
        self.text_budget = TextBudget(m.text_work_share) if m.text_work_share > 0 else None
        self.skipped: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Set by proxy.baselines when it runs: the revision lookup, and where finished warm-ups go (None: used here).
        self.revisions: Any = None
        self.on_candidate: Callable[[str, Baseline], None] | None = None
        self.file_baselines: dict[str, Baseline] = {}
        if m.baseline_file:
            try:
                self.load_baseline(json.loads(Path(m.baseline_file).read_text()))
            except (OSError, ValueError) as e:
                raise SettingsError(f"monitors.baseline_file: {e}") from None

    def label(self, model: str) -> str:
        return model if model in self.allowed else "other"

    def _get(self, label: str) -> ModelMonitors:
        mm = self.models.get(label)
        if mm is None:
            m = self.settings.monitors
            rv = self.revisions
            revision = rv.revision(label) if rv is not None else (self.settings.revision_for(label) or "unknown")
            live = baseline_live.LiveBaseline(label, revision, rv.settled(label) if rv is not None else True, m)
            mm = self.models[label] = ModelMonitors(m.window, m.baseline, self.planner, m.collapse_reference, live,
                                                    baseline_live.distinct_window(m))
            if label in self.file_baselines:
                baseline_live.apply(mm, dataclasses.replace(self.file_baselines[label], revision=revision))
        return mm

    # -- the request path ------------------------------------------------------------------------------------------
    def current_forking_threshold(self, model: str) -> float:
        fixed = self.settings.thresholds.forking
        if fixed != "adaptive":
            return float(fixed)
        mm = self.models.get(self.label(model))
        if mm is None or mm.quantile.count < MIN_QUANTILE_TOKENS:
            return DEFAULT_FORKING
        return mm.quantile.quantile(FORKING_QUANTILE, DEFAULT_FORKING)

    def observe(self, obs: Observation) -> None:
        h = np.asarray(obs.entropies, dtype=np.float64)
        h = h[np.isfinite(h)] if h.size else h
        if h.size == 0:
            return
        label = self.label(obs.model)
        thr = obs.summary.get("forking_threshold")
        thr = float(thr) if isinstance(thr, (int, float)) else self.current_forking_threshold(obs.model)
        self._get(label).observe(h, thr)
        try:
            self._q.put_nowait(
                (time.monotonic(), (label, obs.completion_text, obs.prompt, obs.finish_reason, obs.tokens, h)))
        except queue.Full:
            self.dropped += 1

    # -- the background side -------------------------------------------------------------------------------------
    def _process(self, job: tuple[str, str, Any, str | None, list[str], np.ndarray]) -> None:
        label, text, prompt, finish, tokens, h = job
        mm = self._get(label)
        mask = mm.text_work(text, prompt, finish, tokens, h)
        if mm.live is not None:
            mm.live.maybe_finish(mm, self.on_candidate)
        self.processed += 1
        for sink in self.token_class_sinks:
            sink(label, h[mask], h[~mask])

    def process_pending(self) -> int:
        """Run queued text work in the caller's thread (tests, or when no worker runs); returns jobs done."""
        n = 0
        while True:
            try:
                _, job = self._q.get_nowait()
            except queue.Empty:
                return n
            self._process(job)
            n += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                queued, job = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            wait = queued + TEXT_GRACE_S - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            budget = self.text_budget
            if budget is not None and not budget.allow():
                self.skipped[job[0]] = self.skipped.get(job[0], 0) + 1
                continue
            t0 = time.thread_time()
            try:
                self._process(job)
            except Exception:  # noqa: BLE001 - one bad response must not stop the monitors
                log.exception("monitor text work failed")
            if budget is not None:
                budget.charge(time.thread_time() - t0)

    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Monitoring]:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="entropy-monitors", daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None

    # -- inputs from other components -----------------------------------------------------------------------------
    def feedback(self, model: str, mean_entropy: float, score: float, key: Any = None) -> None:
        """A label for the entropy-performance fit; ``key`` (the response id) makes a relabel replace, not add."""
        self._get(self.label(model)).fit.add(mean_entropy, score, key=key)

    def set_recognition_ratio(self, model: str, value: float) -> None:
        label = self.label(model)
        self.recognition[label] = value
        self._get(label).recognition_ratio = value

    def set_recognition_rise(
        self, model: str, rise: float | None, interval: tuple[float, float] | None = None
    ) -> None:
        """The probe's window ratio over its baseline ratio (None until both exist) and its bootstrap interval;
        the diagnosis reads the rise only through the interval."""
        mm = self._get(self.label(model))
        mm.recognition_rise, mm.recognition_rise_interval = rise, interval

    # -- readings --------------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        models: dict[str, Any] = {}
        for label, mm in list(self.models.items()):
            fit = mm.fit.fit()
            diag = mm.diagnosis()
            live = mm.live
            fixed = live.threshold() if live is not None else None
            models[label] = {
                "state": diag.state,
                "diagnosis": list(diag.reasons),
                "revision": live.revision if live is not None else None,
                "evidence": live.status(mm) if live is not None else None,
                "responses": mm.responses,
                "tokens": mm.tokens,
                "forking_threshold": round(self.current_forking_threshold(label) if fixed is None else fixed, 4),
                "forking": {k: _mean(v) for k, v in mm.recent.items()},
                "drift": {k: (None if v is None else round(v, 5)) for k, v in mm.drift.values().items()},
                "baseline": {
                    "complete": mm.drift.frozen, "source": mm.drift.source,
                    "tokens": int(mm.drift.base_tokens.sum()), "target_tokens": mm.drift.baseline_tokens,
                    "in_use": live.baseline.summary() if live is not None and live.baseline is not None else None,
                },
                "collapse": {
                    "score": round(mm.collapse_score(), 4), "components": mm.collapse_components(),
                    "entropy_cusum": mm.collapse.entropy.state(), "forking_cusum": mm.collapse.forking.state(),
                    "diversity_baseline": dict(mm.collapse.diversity_base),
                },
                "diversity": {k: v for k, v in mm.text.items() if k != "comparable"},
                "recognition_ratio": self.recognition.get(label),
                "recognition_rise": mm.recognition_rise,
                "recognition_rise_interval": (None if mm.recognition_rise_interval is None
                                              else [round(x, 4) for x in mm.recognition_rise_interval]),
                "performance_law": None if fit is None else {
                    "a": fit.a, "b": fit.b, "ceiling": fit.ceiling, "points": fit.n, "r2": fit.r2,
                    "labels": fit.labels, "window": mm.fit.window,
                },
            }
        out: dict[str, Any] = {
            "models": models,
            "worker": {"queued": self._q.qsize(), "dropped": self.dropped, "processed": self.processed,
                       "skipped": self.skipped_total()},
        }
        for name, section in list(self.status_sections.items()):
            out[name] = section()
        return out

    def baseline_snapshot(self) -> dict[str, Any]:
        return {
            "format": BASELINE_FORMAT, "version": 1, "created": time.time(),
            "models": {
                label: {"drift": mm.drift.to_dict(), "collapse": mm.collapse.to_dict(),
                        **({"baseline": mm.live.baseline.to_dict()} if mm.live and mm.live.baseline else {})}
                for label, mm in self.models.items()
                if mm.drift.base_tokens.sum() > 0
            },
        }

    def load_baseline(self, data: Any) -> None:
        for label, entry in validate_baseline(data)["models"].items():
            # Compared with whatever revision the model runs: the operator chose this file on purpose.
            self.file_baselines[label] = Baseline.from_file_entry(
                label, self.settings.revision_for(label) or "unknown", "file", entry)
            mm = self._get(label)
            if mm.live is not None:
                baseline_live.apply(mm, dataclasses.replace(self.file_baselines[label], revision=mm.live.revision))


def validate_baseline(data: Any) -> dict[str, Any]:
    """Check a baseline file's content; raises ValueError with one line naming the bad field."""
    if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT:
        raise ValueError(f"not an {BASELINE_FORMAT} file (field 'format')")
    if data.get("version") != 1:
        raise ValueError("unsupported version (field 'version', expected 1)")
    models = data.get("models")
    if not isinstance(models, dict):
        raise ValueError("field 'models' must be an object")
    for label, entry in models.items():
        if not isinstance(entry, dict):
            raise ValueError(f"models.{label}: must be an object")
        try:
            validate_drift_dict(entry.get("drift"))
        except ValueError as e:
            raise ValueError(f"models.{label}.{e}") from None
    return data


def install(app: Any, settings: Settings, hub: Any, registry: Any) -> contextlib.AbstractAsyncContextManager[Any]:
    """Create the monitors (``app.state.monitoring``), observe traffic, add the status and baseline routes.

    The returned context manager runs the background text worker for the app's lifetime.
    """
    from fastapi import APIRouter, Depends

    from .access import require_client_key

    mon = Monitoring(settings)
    app.state.monitoring = mon
    hub.add(mon)
    router = APIRouter(dependencies=[Depends(require_client_key(settings))])  # /v1 routes: api_keys apply

    @router.get("/v1/entropy/status")
    async def entropy_status() -> dict[str, Any]:
        return mon.status()

    @router.get("/v1/entropy/baseline")
    async def entropy_baseline() -> dict[str, Any]:
        return mon.baseline_snapshot()

    app.include_router(router)
    return mon.running()
