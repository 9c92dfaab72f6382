"""The audit trail (CONTRACT §7): records flagged and sampled responses, takes feedback, reports calibration.

``install(app, settings, hub, registry)`` adds ``POST /v1/feedback`` and ``GET /audit``, registers the
:class:`~proxy.audit.writer.AuditWriter` as an observer and returns the async context manager that starts the
store and the background writer and, on shutdown, flushes the queue. The writer is kept on
``app.state.audit_writer``. Metrics go through ``app.state.metrics`` when that exists (``feedback``, which also
counts confident-wrong labels, ``audit_dropped`` and ``set_calibration``); ``registry`` is not used here: all
metric families live in :mod:`proxy.metrics`.

When the recognition probe is installed (``app.state.probe``, by :mod:`proxy.probe`, which is installed after this
module), its results are recorded too: the lifespan adds :meth:`AuditWriter.submit_probe` to the probe's
``result_sinks`` (the probe is looked up there, not at install time) and removes it on shutdown. ``POST
/v1/feedback`` hands a ``reference`` answer to the probe the same way, looked up per request.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from proxy.access import Access
from proxy.audit.routes import make_router
from proxy.audit.store import AuditStore
from proxy.audit.writer import AuditWriter

if TYPE_CHECKING:
    from fastapi import FastAPI

    from proxy.observe import ObserverHub
    from proxy.settings import Settings

__all__ = ["AuditStore", "AuditWriter", "install"]


def install(
    app: FastAPI, settings: Settings, hub: ObserverHub, registry: Any = None
) -> contextlib.AbstractAsyncContextManager[AuditWriter] | None:
    audit = settings.audit
    if not audit.enabled:
        return None
    store = AuditStore(audit.url)
    writer = AuditWriter(
        store,
        sample_rate=audit.sample_rate,
        store_text=audit.store_text,
        queue_size=audit.queue_size,
        batch_size=audit.batch_size,
        retention_days=audit.retention_days,
        metrics=lambda: getattr(app.state, "metrics", None),
    )
    app.state.audit_writer = writer
    hub.add(writer)
    app.include_router(make_router(writer, Access.from_settings(settings), window=settings.monitors.window))

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[AuditWriter]:
        await writer.start()
        sinks = getattr(getattr(app.state, "probe", None), "result_sinks", None)
        if isinstance(sinks, list):
            sinks.append(writer.submit_probe)
        try:
            yield writer
        finally:
            if isinstance(sinks, list) and writer.submit_probe in sinks:
                sinks.remove(writer.submit_probe)
            await writer.stop()

    return lifespan()
