"""The canary component: fixed prompts sampled off the request path, rounds kept per (model, revision), compared
with the revision's baseline rounds by intervals (:mod:`proxy.canary.runner`, :mod:`monitors.canary_diagnosis`).

``install`` creates ``app.state.canary`` when ``canary.enabled``; its rounds go to the audit store
(``canary_rounds``) when the audit trail is on, else to memory. The loop runs in the leader worker only
(``app.state.is_leader``, default true). Exports, read at scrape time (labels bounded: ``model`` from the
allow-list, ``measure`` from :data:`monitors.canary.MEASURES`, ``state`` from :data:`CANARY_STATES`):

| metric | meaning |
| --- | --- |
| ``entropy_proxy_canary_measure{model,measure}`` | the last round's value |
| ``entropy_proxy_canary_baseline{model,measure}`` | the mean of the baseline rounds |
| ``entropy_proxy_canary_change{model,measure}`` | last round vs baseline (difference; ratio: factor) |
| ``entropy_proxy_canary_change_lower`` / ``_upper{model,measure}`` | its Bonferroni-adjusted interval |
| ``entropy_proxy_canary_significant{model,measure}`` | 1 when the interval excludes no change |
| ``entropy_proxy_canary_state{model,state}`` | 1 for the canary's verdict |
| ``entropy_proxy_canary_rounds_total{model}`` | rounds kept since start |
| ``entropy_proxy_canary_baseline_rounds{model}`` | rounds in the revision's baseline |
| ``entropy_proxy_canary_last_round_timestamp_seconds{model}`` | when the last round finished |
| ``entropy_proxy_canary_round_tokens{model}`` | tokens the last round cost |
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from monitors.canary import MEASURES

from ..background import ensure_sampler
from ..settings import Settings, SettingsError
from .prompts import PromptError, load_prompts
from .runner import MAX_MODELS, Canary
from .store import DatabaseRounds, MemoryRounds, RoundStore

__all__ = ["CANARY_STATES", "Canary", "install"]

NS = "entropy_proxy_canary"
CANARY_STATES = ("unknown", "healthy", "recognition", "collapse", "drift")


class _CanaryCollector(Collector):
    def __init__(self, canary: Canary) -> None:
        self.c = canary

    def describe(self) -> list[Metric]:
        return self.collect(samples=False)

    def collect(self, samples: bool = True) -> list[Metric]:
        def g(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{NS}_{name}", doc, labels=labels)

        ml = ["model", "measure"]
        measure = g("measure", "Canary: the last round's value of each measure.", ml)
        base = g("baseline", "Canary: mean of the baseline rounds of the model's revision.", ml)
        change = g("change", "Canary: last round minus baseline (ratio: current / baseline).", ml)
        lower = g("change_lower", "Canary: lower end of the change's Bonferroni-adjusted interval.", ml)
        upper = g("change_upper", "Canary: upper end of the change's Bonferroni-adjusted interval.", ml)
        sig = g("significant", "Canary: 1 when the change's interval excludes no change.", ml)
        state = g("state", "Canary verdict: 1 for the current state.", ["model", "state"])
        rounds = CounterMetricFamily(f"{NS}_rounds", "Canary rounds kept since start.", labels=["model"])
        brounds = g("baseline_rounds", "Canary rounds in the revision's baseline.", ["model"])
        ts = g("last_round_timestamp_seconds", "Unix time of the last canary round.", ["model"])
        tokens = g("round_tokens", "Tokens the last canary round cost (upstream usage).", ["model"])
        if samples:
            for model, s in list(self.c.state.items()):
                if s.last is not None:
                    for m in MEASURES:
                        v = s.last.measures.get(m)
                        if v is not None:
                            measure.add_metric([model, m], v)
                        b = s.baseline_measures.get(m)
                        if b is not None:
                            base.add_metric([model, m], b)
                    ts.add_metric([model], s.last.created)
                    tokens.add_metric([model], s.last.tokens)
                verdict = s.verdict or {}
                for ch in verdict.get("changes") or ():
                    if ch.get("measure") in MEASURES and ch.get("change") is not None:
                        key = [model, ch["measure"]]
                        change.add_metric(key, ch["change"])
                        lo, hi = ch.get("interval") or (None, None)
                        if lo is not None and hi is not None:
                            lower.add_metric(key, lo)
                            upper.add_metric(key, hi)
                        sig.add_metric(key, 1.0 if ch.get("significant") else 0.0)
                current = verdict.get("state", "unknown")
                for st in CANARY_STATES:
                    state.add_metric([model, st], 1.0 if st == current else 0.0)
                rounds.add_metric([model], s.rounds)
                brounds.add_metric([model], s.baseline_rounds)
        return [measure, base, change, lower, upper, sig, state, rounds, brounds, ts, tokens]


def _models(app: Any, settings: Settings) -> list[str]:
    if settings.models:
        return list(settings.models)[:MAX_MODELS]
    mon = getattr(app.state, "monitoring", None)
    allowed = getattr(mon, "allowed", None) or ()
    return sorted(allowed)[:MAX_MODELS]  # the upstream's own list, once discovered


def _revision(app: Any, settings: Settings, model: str) -> str:
    revisions = getattr(app.state, "revisions", None)
    if revisions is not None:
        return str(revisions.revision(model))
    return settings.revision_for(model) or "unknown"


def install(
    app: Any, settings: Settings, hub: Any, registry: Any
) -> contextlib.AbstractAsyncContextManager[Any] | None:
    """Create ``app.state.canary`` when ``canary.enabled``; the returned context manager runs its loop."""
    cfg = settings.canary
    mon = getattr(app.state, "monitoring", None)
    sections = getattr(mon, "status_sections", None)
    if not cfg.enabled:
        if sections is not None:
            sections["canary"] = lambda: {"enabled": False}
        return None
    try:
        prompts = load_prompts(cfg.prompts_file)
    except PromptError as e:
        raise SettingsError(f"canary.prompts_file: {e}") from None
    writer = getattr(app.state, "audit_writer", None)
    rounds: RoundStore = DatabaseRounds(writer.store) if writer is not None else MemoryRounds()
    sampler = ensure_sampler(app, settings, registry)
    canary = app.state.canary = Canary(
        settings, sampler, prompts, rounds, models=lambda: _models(app, settings),
        revision=lambda m: _revision(app, settings, m))
    if registry is not None:
        registry.register(_CanaryCollector(canary))
    if sections is not None:
        sections["canary"] = canary.status

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[Canary]:
        if not getattr(app.state, "is_leader", True):
            yield canary
            return
        async with anyio.create_task_group() as tg:
            canary.looping = True
            tg.start_soon(canary.loop)
            try:
                yield canary
            finally:
                canary.looping = False
                tg.cancel_scope.cancel()

    return lifespan()
