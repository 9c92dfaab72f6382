"""OpenTelemetry GenAI export (CONTRACT §9, docs/otel.md): off unless ``otel.enabled``.

``install(app, settings, hub, registry)`` is the component hook. With ``otel.enabled`` false it returns at
once and nothing of the OpenTelemetry SDK is imported (the SDK is the optional extra ``otel``). With it on:
a pure ASGI middleware (``middleware.py``) traces chat/completions requests and continues/forwards W3C
``traceparent``; an observer on the hub hands each request its per-choice entropy summaries; spans are built
after the response (``spans.py``) and exported in batches off the request path (``export.py``).

Other parts add later evaluations of a response through ``app.state.otel.evaluation(response_id, name, value,
label)`` (e.g. semantic entropy); ``POST /v1/feedback`` labels are exported that way by the middleware.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

SHUTDOWN_S = 5.0  # how long a stop waits for queued spans to be exported


def install(app: Any, settings: Any, hub: Any, registry: Any) -> Any:
    if not settings.otel.enabled:
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

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        import anyio

        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(tracing.shutdown, SHUTDOWN_S)

    return lifespan()
