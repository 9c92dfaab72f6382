"""OpenTelemetry GenAI export (CONTRACT §9, docs/otel.md): off unless ``otel.enabled``.

``install(app, settings, hub, registry)`` is the component hook. With ``otel.enabled`` false it returns at
once and nothing of the OpenTelemetry SDK is imported (the SDK is the optional extra ``otel``). With it on:
a pure ASGI middleware (``middleware.py``) traces chat/completions requests and continues/forwards W3C
``traceparent``; an observer on the hub hands each request its per-choice entropy summaries; spans are built
after the response (``spans.py``) and exported in batches off the request path (``export.py``).

Later evaluations of a response go through ``app.state.otel.evaluation(response_id, name, value, label)``:
``POST /v1/feedback`` labels (the middleware) and semantic entropy (a sink on ``app.state.semantic``, when the
semantic part is installed before this one, as ``COMPONENTS`` orders it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

SHUTDOWN_S = 5.0  # how long a stop waits for queued spans to be exported


def install(app: Any, settings: Any, hub: Any, registry: Any) -> Any:
    if not settings.otel.enabled:
        return None
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":  # the standard switch wins
        logging.getLogger("entropy_proxy.otel").info("otel.enabled, but OTEL_SDK_DISABLED=true: nothing is traced")
        return None
    try:
        from .export import build
    except ImportError as e:
        raise RuntimeError("otel.enabled needs the OpenTelemetry SDK: pip install 'entropy-proxy[otel]'") from e
    from .middleware import OtelMiddleware, RecordObserver

    tracing = build(settings.upstream, registry)
    app.state.otel = tracing
    hub.add(RecordObserver())
    app.add_middleware(OtelMiddleware, tracing=tracing)
    semantic = getattr(app.state, "semantic", None)
    if semantic is not None and isinstance(getattr(semantic, "sinks", None), list):
        semantic.sinks.append(semantic_sink(tracing, getattr(getattr(settings, "semantic", None), "uncertain_nats",
                                                             None)))

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        import anyio

        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(tracing.shutdown, SHUTDOWN_S)

    return lifespan()


def semantic_sink(tracing: Any, uncertain_nats: float | None) -> Any:
    """A sink for the semantic part's results (``sink(snapshot, result)``): one ``semantic_entropy`` evaluation
    in the response's trace. Label: ``confident_inconsistent`` (token-confident, meanings disagree),
    ``inconsistent`` (at least ``semantic.uncertain_nats``) or ``consistent``."""

    def sink(snap: Any, result: Any) -> None:
        high = uncertain_nats is not None and result.entropy >= uncertain_nats
        label = ("confident_inconsistent" if high and "confident" in snap.flags
                 else "inconsistent" if high else "consistent")
        tracing.evaluation(
            snap.request_id, "semantic_entropy", result.entropy, label,
            f"{result.samples} samples in {len(result.clusters)} meaning clusters, nats",
            event_attributes={"entropy_proxy.choice.index": snap.choice_index,
                              "entropy_proxy.semantic.discrete": result.discrete,
                              "entropy_proxy.semantic.clusters": len(result.clusters)})

    return sink
