"""All Prometheus metrics (CONTRACT section 6), on an injected ``CollectorRegistry``.

- Counters and per-response histograms are updated by :class:`Metrics` as an observer of the ObserverHub.
- ``entropy_proxy_token_entropy_nats`` is a histogram kept as numpy bucket counts (one ``searchsorted`` per
  response instead of one ``Histogram.observe`` per token) and exposed by the custom collector; its buckets are
  fine near 0, where over half of all tokens sit. ``token_class="all"`` is counted on the request path; the
  ``planning``/``execution`` split comes from the monitors' background worker, so it lags by a queue's length
  (and misses responses the worker dropped under overload).
- Gauges (drift, collapse, diversity, recognition ratio, calibration, state, the entropy-performance ceiling)
  are read from the monitors at scrape time by the same collector.

Labels: ``model`` is the configured allow-list (``models``) or ``other``; every other label takes values from a
fixed set here (anything else becomes ``other``). No free text reaches a label.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np
from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from . import monitoring as monitoring_mod
from .baselines import export as baseline_export
from .monitoring import STATES, Monitoring
from .observe import Observation, RequestEvent
from .settings import Settings

NS = "entropy_proxy"
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
RESPONSE_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
PROB_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
FRACTION_BUCKETS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.75)
OVERHEAD_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
SEMANTIC_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)  # log 5 = 1.61, log 32 = 3.47

ENDPOINTS = frozenset({"chat", "completions"})
FLAGS = ("confident", "uncertain", "forking_heavy", "truncated_tail")
ERROR_KINDS = frozenset({"bad_response", "unavailable", "timeout", "status_4xx", "status_5xx", "stream"})
TOKEN_CLASSES = ("all", "planning", "execution")
DIVERSITY_MEASURES = ("distinct_2", "chrf_distance", "format_entropy", "semantic_gram_entropy")
CALIBRATION_MEASURES = frozenset({"ece", "brier", "auroc"})
AUDIT_DROP_REASONS = frozenset({"queue_full", "store_down", "store_error", "encode_error", "shutdown"})


def _pick(value: str, allowed: Iterable[str]) -> str:
    return value if value in allowed else "other"


class TokenHistogram:
    """Prometheus-style cumulative histogram of token entropy per (model, token_class), as numpy counts."""

    def __init__(self) -> None:
        self.edges = np.asarray(TOKEN_BUCKETS, dtype=np.float64)
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], np.ndarray] = {}
        self._sums: dict[tuple[str, str], float] = {}

    def zero(self, model: str, token_class: str) -> None:
        """Create the (model, token_class) series at zero, so a scrape shows it before its first token."""
        with self._lock:
            if (model, token_class) not in self._counts:
                self._counts[(model, token_class)] = np.zeros(len(self.edges) + 1, dtype=np.int64)
                self._sums[(model, token_class)] = 0.0

    def add(self, model: str, token_class: str, values: np.ndarray) -> None:
        if values.size == 0:
            return
        # Bucket i holds edges[i-1] < v <= edges[i] (Prometheus `le`); the last one is +Inf.
        idx = np.searchsorted(self.edges, values, side="left")
        counts = np.bincount(idx, minlength=len(self.edges) + 1)
        key = (model, token_class)
        with self._lock:
            if key not in self._counts:
                self._counts[key] = np.zeros(len(self.edges) + 1, dtype=np.int64)
                self._sums[key] = 0.0
            self._counts[key] += counts
            self._sums[key] += float(values.sum())

    def family(self) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(
            f"{NS}_token_entropy_nats", "Per-token entropy (nats) of generated tokens.", labels=["model", "token_class"]
        )
        with self._lock:
            items = [(k, v.copy(), self._sums[k]) for k, v in self._counts.items()]
        les = [repr(float(e)) for e in self.edges] + ["+Inf"]
        for (model, cls), counts, total in sorted(items, key=lambda i: i[0]):
            cum = np.cumsum(counts).tolist()
            fam.add_metric([model, cls], buckets=list(zip(les, cum, strict=True)), sum_value=total)
        return fam


class _MonitorCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def describe(self) -> list[Metric]:
        return self._families(with_samples=False)

    def collect(self) -> list[Metric]:
        return self._families(with_samples=True)

    def _families(self, with_samples: bool) -> list[Metric]:
        m = self.m
        drift = GaugeMetricFamily(f"{NS}_entropy_drift", "Token-entropy drift, window vs baseline.",
                                  labels=["model", "method"])
        collapse = GaugeMetricFamily(f"{NS}_collapse_score", "Collapse score, 0 healthy .. 1 collapsed.",
                                     labels=["model"])
        diversity = GaugeMetricFamily(f"{NS}_diversity", "Diversity of responses over the window.",
                                      labels=["model", "measure"])
        recog = GaugeMetricFamily(f"{NS}_recognition_ratio", "Off-policy / on-policy mean entropy from probes.",
                                  labels=["model"])
        calib = GaugeMetricFamily(f"{NS}_calibration", "Calibration of confidence over the labelled window.",
                                  labels=["model", "measure"])
        state = GaugeMetricFamily(f"{NS}_entropy_state", "1 for the diagnosed entropy state of the model.",
                                  labels=["model", "state"])
        ceiling = GaugeMetricFamily(f"{NS}_performance_ceiling",
                                    "Predicted score at zero entropy, b - a of R = -a exp(H) + b.", labels=["model"])
        fams: list[Metric] = [m.token_hist.family() if with_samples else HistogramMetricFamily(
            f"{NS}_token_entropy_nats", "Per-token entropy (nats) of generated tokens.",
            labels=["model", "token_class"])]
        skipped = CounterMetricFamily(f"{NS}_monitor_text_skipped", "Responses left out of the text monitors "
                                      "(formats, diversity, grams) by monitors.text_work_share.", labels=["model"])
        fams += [drift, collapse, diversity, recog, calib, state, ceiling, skipped]
        fams += baseline_export.families(m.monitoring, with_samples)  # baselines, fixed-threshold forking counts
        if not with_samples:
            return fams
        mon = m.monitoring
        for label, mm in list(mon.models.items()) if mon is not None else []:
            for method, v in mm.drift.drift().items():
                if v is not None:
                    drift.add_metric([label, method], v)
            collapse.add_metric([label], mm.collapse_score())
            for measure, v in mm.diversity_values().items():
                if v is not None:
                    diversity.add_metric([label, measure], v)
            current = m.state_override.get(label) or mm.state()
            for s in STATES:
                state.add_metric([label, s], 1.0 if s == current else 0.0)
            fit = mm.fit.fit()
            if fit is not None:
                ceiling.add_metric([label], fit.ceiling)
        # Every monitored label at 0 from its first response: a counter born with its first skip inside would
        # never be counted by rate(), and the series set stays the same however the CPU cap bites.
        skips = dict(getattr(mon, "skipped", {})) if mon is not None else {}
        for label in sorted(set(skips) | set(mon.models if mon is not None else ())):
            skipped.add_metric([label], skips.get(label, 0))
        for label, v in list(m.recognition.items()):
            recog.add_metric([label], v)
        for (label, measure), v in list(m.calibration.items()):
            calib.add_metric([label, measure], v)
        return fams


class Metrics:
    def __init__(self, settings: Settings, registry: CollectorRegistry, monitoring: Monitoring | None = None) -> None:
        self.allowed = frozenset(settings.models)
        self.registry = registry
        self.monitoring = monitoring
        r = registry
        self.requests = Counter(f"{NS}_requests_total", "Client requests.", ["model", "endpoint", "status"], registry=r)
        self.tokens = Counter(f"{NS}_tokens_total", "Generated tokens annotated.", ["model"], registry=r)
        self.response_entropy = Histogram(f"{NS}_response_entropy_nats", "Per-response mean token entropy (nats).",
                                          ["model"], buckets=RESPONSE_BUCKETS, registry=r)
        self.response_confidence = Histogram(f"{NS}_response_confidence", "Per-response confidence.",
                                             ["model"], buckets=PROB_BUCKETS, registry=r)
        self.forking_fraction = Histogram(f"{NS}_forking_fraction", "Per-response share of forking tokens.",
                                          ["model"], buckets=FRACTION_BUCKETS, registry=r)
        self.flagged = Counter(f"{NS}_responses_flagged_total", "Responses by flag.", ["model", "flag"], registry=r)
        self.logprobs_missing = Counter(f"{NS}_logprobs_missing_total", "Choices that could not be annotated.",
                                        ["model"], registry=r)
        self.upstream_errors = Counter(f"{NS}_upstream_errors_total", "Upstream failures by kind.",
                                       ["model", "kind"], registry=r)
        self.overhead = Histogram(f"{NS}_overhead_seconds", "Time the proxy itself adds to a request.",
                                  ["endpoint"], buckets=OVERHEAD_BUCKETS, registry=r)
        self.feedback_total = Counter(f"{NS}_feedback_total", "Correctness labels received.", ["model", "label"],
                                      registry=r)
        self.confident_wrong_total = Counter(
            f"{NS}_confident_wrong_total", "Responses flagged confident and labelled incorrect.", ["model"], registry=r
        )
        self.audit_dropped_total = Counter(f"{NS}_audit_dropped_total", "Audit records not written.", ["reason"],
                                           registry=r)
        self.semantic_entropy = Histogram(f"{NS}_semantic_entropy_nats", "Semantic entropy (nats) of shadow-sampled "
                                          "responses: entropy over the meanings of their samples.", ["model"],
                                          buckets=SEMANTIC_BUCKETS, registry=r)
        self.token_hist = TokenHistogram()
        self.recognition: dict[str, float] = {}
        self.calibration: dict[tuple[str, str], float] = {}
        self.state_override: dict[str, str] = {}
        self._seen: set[str] = set()
        registry.register(_MonitorCollector(self))
        # A series born with its first response in it loses that response to rate(): configured models start at 0.
        for name in sorted(self.allowed):
            self._first(name)

    def model_label(self, model: str) -> str:
        return model if model in self.allowed else "other"

    def _first(self, label: str) -> None:
        # Zero series for every flag, so rate() and absent() work from the first scrape.
        if label not in self._seen:
            self._seen.add(label)
            for f in FLAGS:
                self.flagged.labels(label, f)
            self.tokens.labels(label)
            self.logprobs_missing.labels(label)
            for lab in ("correct", "incorrect"):
                self.feedback_total.labels(label, lab)
            self.confident_wrong_total.labels(label)
            self.token_hist.zero(label, "all")

    # -- observers ------------------------------------------------------------------------------------------------
    def observe(self, obs: Observation) -> None:
        label = self.model_label(obs.model)
        self._first(label)
        h = np.asarray(obs.entropies, dtype=np.float64)
        h = h[np.isfinite(h)]
        self.tokens.labels(label).inc(int(h.size))
        self.token_hist.add(label, "all", h)
        s = obs.summary
        for key, hist in (("mean", self.response_entropy), ("confidence", self.response_confidence),
                          ("forking_fraction", self.forking_fraction)):
            v = s.get(key)
            if isinstance(v, (int, float)):
                hist.labels(label).observe(float(v))
        for f in s.get("flags") or ():
            if f in FLAGS:
                self.flagged.labels(label, f).inc()

    def observe_token_classes(self, label: str, planning: np.ndarray, execution: np.ndarray) -> None:
        self.token_hist.add(label, "planning", planning)
        self.token_hist.add(label, "execution", execution)

    def request_done(self, ev: RequestEvent) -> None:
        label = self.model_label(ev.model)
        endpoint = _pick(ev.endpoint, ENDPOINTS)
        status = str(ev.status) if 100 <= ev.status <= 599 else "other"
        self.requests.labels(label, endpoint, status).inc()
        self.overhead.labels(endpoint).observe(max(0.0, ev.overhead_s))
        if ev.upstream_error:
            self.upstream_errors.labels(label, _pick(ev.upstream_error, ERROR_KINDS)).inc()
        if ev.logprobs_missing:
            self.logprobs_missing.labels(label).inc(ev.logprobs_missing)

    # -- called by other components ---------------------------------------------------------------------------------
    def feedback(
        self, model: str, correct: bool, *, confident: bool = False,
        mean_entropy: float | None = None, score: float | None = None, key: Any = None,
    ) -> None:
        """A correctness label arrived; ``confident``: the response had the `confident` flag. With
        ``mean_entropy`` the (entropy, score or correct) pair also feeds the entropy-performance fit, where
        ``key`` (the response id) counts a relabelled response once."""
        label = self.model_label(model)
        self.feedback_total.labels(label, "correct" if correct else "incorrect").inc()
        if confident and not correct:
            self.confident_wrong_total.labels(label).inc()
        if mean_entropy is not None and self.monitoring is not None:
            self.monitoring.feedback(model, mean_entropy, float(correct) if score is None else score, key=key)

    def observe_semantic(self, model: str, nats: float) -> None:
        self.semantic_entropy.labels(self.model_label(model)).observe(max(0.0, float(nats)))

    def audit_dropped(self, reason: str, n: int = 1) -> None:
        self.audit_dropped_total.labels(_pick(reason, AUDIT_DROP_REASONS)).inc(n)

    def set_calibration(self, model: str, measure: str, value: float) -> None:
        if measure not in CALIBRATION_MEASURES:
            raise ValueError(f"calibration measure must be one of {sorted(CALIBRATION_MEASURES)}")
        self.calibration[(self.model_label(model), measure)] = float(value)

    def set_recognition_ratio(self, model: str, value: float) -> None:
        self.recognition[self.model_label(model)] = float(value)
        if self.monitoring is not None:
            self.monitoring.set_recognition_ratio(model, value)

    def set_state(self, model: str, state: str | None) -> None:
        """Override the monitors' diagnosed state for a model (None: back to the monitors' diagnosis)."""
        label = self.model_label(model)
        if state is None:
            self.state_override.pop(label, None)
        elif state in STATES:
            self.state_override[label] = state
        else:
            raise ValueError(f"state must be one of {STATES}")


def install(
    app: Any, settings: Settings, hub: Any, registry: CollectorRegistry
) -> contextlib.AbstractAsyncContextManager[Any] | None:
    """Add ``GET /metrics`` and the metrics observer; installs the monitors too unless already installed.

    Sets ``app.state.metrics`` (and ``app.state.monitoring``); returns the monitors' worker context manager when
    this call created them.
    """

    cm = None
    mon = getattr(app.state, "monitoring", None)
    if mon is None:
        cm = monitoring_mod.install(app, settings, hub, registry)
        mon = app.state.monitoring
    metrics = Metrics(settings, registry, mon)
    app.state.metrics = metrics
    hub.add(metrics)
    mon.token_class_sinks.append(metrics.observe_token_classes)
    router = APIRouter()

    @router.get("/metrics", response_class=Response, summary="Prometheus exposition")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(router)
    return cm
