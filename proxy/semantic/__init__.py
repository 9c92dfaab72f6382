"""Semantic entropy on live traffic (CONTRACT §9): shadow samples, meaning clusters, entropy over meanings.

``install(app, settings, hub, registry)`` does nothing unless ``semantic.sample_rate > 0``: then it registers the
``semantic`` purpose (budget ``semantic.max_tokens_per_hour``) on the shared background sampler
(:mod:`proxy.background`), adds the :class:`~proxy.semantic.observer.SemanticObserver` to the ObserverHub and a
``semantic`` section to ``GET /v1/entropy/status``. The embedding model (extra ``semantic``: CPU torch,
sentence-transformers, the packaged all-MiniLM-L6-v2) is imported at start-up, so a missing extra fails the start
with a message rather than the first sample; it is loaded in the worker thread on first use.

Modules: :mod:`.model` (the packaged model, the only one importing torch), :mod:`.clusterer` (equivalence and
entropy, in a worker thread), :mod:`.observer` (the sampling decision and the background job).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from ..settings import Settings

__all__ = ["install"]


def install(
    app: Any, settings: Settings, hub: Any, registry: Any
) -> contextlib.AbstractAsyncContextManager[Any] | None:
    cfg = settings.semantic
    if cfg.sample_rate <= 0:
        return None
    from ..background import ensure_sampler
    from .clusterer import Clusterer
    from .model import check_installed, load_embedder, similarity_fn
    from .observer import PURPOSE, SemanticObserver

    check_installed()
    sampler = ensure_sampler(app, settings, registry)
    sampler.add_purpose(PURPOSE, cfg.max_tokens_per_hour)
    clusterer = Clusterer(
        cfg.similarity_threshold,
        loader=lambda: similarity_fn(load_embedder(cfg.model_cache_dir, threads=1)),
    )
    observer = SemanticObserver(cfg, sampler, clusterer, state=app.state)
    app.state.semantic = observer
    hub.add(observer)
    mon = getattr(app.state, "monitoring", None)
    if mon is not None and hasattr(mon, "status_sections"):
        mon.status_sections["semantic"] = observer.status

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        try:
            yield
        finally:
            observer.close()

    return lifespan()
