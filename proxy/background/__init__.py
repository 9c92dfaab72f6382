"""Background sampling: the upstream requests the proxy makes on its own (canary prompts, semantic-entropy samples).

One :class:`~proxy.background.sampler.BackgroundSampler` per app (``app.state.sampler``), shared by every purpose,
each purpose with its own sliding-hour token budget. Components that need it call :func:`ensure_sampler` at
install time and :meth:`~BackgroundSampler.add_purpose`; :func:`install` (a component of the app) returns the
context manager that runs the sampler's task group for the app's lifetime - only when a purpose was added, and
only in the leader worker (``app.state.is_leader``, default true) so that ``serve --workers N`` samples once.

Metrics (labels: ``purpose``, fixed in code): ``entropy_proxy_background_tokens_total`` (tokens charged: the
upstream's ``usage``), ``entropy_proxy_background_refused_total`` (requests the budget could not cover),
``entropy_proxy_background_errors_total``, ``entropy_proxy_background_budget_tokens`` (per hour) and
``entropy_proxy_background_tokens_last_hour``. Status: ``"background"`` in ``GET /v1/entropy/status``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..settings import Settings
from .sampler import BackgroundSampler

__all__ = ["BackgroundSampler", "ensure_sampler", "install"]

NS = "entropy_proxy_background"


class _SamplerCollector(Collector):
    def __init__(self, sampler: BackgroundSampler) -> None:
        self.s = sampler

    def describe(self) -> list[Metric]:
        return self.collect(samples=False)

    def collect(self, samples: bool = True) -> list[Metric]:
        tokens = CounterMetricFamily(f"{NS}_tokens", "Tokens charged to background sampling (upstream usage).",
                                     labels=["purpose"])
        refused = CounterMetricFamily(f"{NS}_refused", "Background requests not sent: the purpose's budget for "
                                      "the last hour could not cover their worst case.", labels=["purpose"])
        errors = CounterMetricFamily(f"{NS}_errors", "Background requests or tasks that failed.", labels=["purpose"])
        budget = GaugeMetricFamily(f"{NS}_budget_tokens", "Tokens per sliding hour a purpose may use.",
                                   labels=["purpose"])
        hour = GaugeMetricFamily(f"{NS}_tokens_last_hour", "Tokens charged in the last 3,600 s.", labels=["purpose"])
        if samples:
            for name, st in self.s.stats().items():
                tokens.add_metric([name], st["tokens_total"])
                refused.add_metric([name], st["refused"])
                errors.add_metric([name], st["errors"])
                budget.add_metric([name], st["budget"])
                hour.add_metric([name], st["tokens_last_hour"])
        return [tokens, refused, errors, budget, hour]


def ensure_sampler(app: Any, settings: Settings, registry: Any = None) -> BackgroundSampler:
    """The app's sampler, created on first use (idempotent: every component that needs it may call this)."""
    sampler: BackgroundSampler | None = getattr(app.state, "sampler", None)
    if sampler is None:
        def k() -> int:
            up = getattr(app.state, "upstream", None)
            return int(up.k) if up is not None else settings.top_k

        sampler = BackgroundSampler(lambda: app.state.upstream.client, settings, k=k)
        app.state.sampler = sampler
        mon = getattr(app.state, "monitoring", None)
        if mon is not None and hasattr(mon, "status_sections"):
            mon.status_sections["background"] = sampler.status
    if registry is not None and not sampler.collected:
        registry.register(_SamplerCollector(sampler))
        sampler.collected = True
    return sampler


def install(app: Any, settings: Settings, hub: Any, registry: Any) -> contextlib.AbstractAsyncContextManager[Any]:
    """Create the sampler; the returned context manager runs it while the app lives, if any purpose is on."""
    sampler = ensure_sampler(app, settings, registry)

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        if not sampler.purposes or not getattr(app.state, "is_leader", True):
            yield
            return
        async with sampler.running():
            yield

    return lifespan()
