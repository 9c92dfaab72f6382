"""Baselines per (model, revision): the revision lookup, the store, the warm-up builder and the poller.

``install(app, settings, hub, registry)`` sets ``app.state.revisions`` (:class:`Revisions`) and
``app.state.baselines`` (:class:`~proxy.baselines.manager.BaselineManager`) and returns the lifespan that loads
the store's baselines at start and polls them (and the upstream's revisions) while the app runs.
Submodules are imported lazily here: :mod:`proxy.monitoring` imports :mod:`proxy.baselines.live`.
"""

from __future__ import annotations

import contextlib
from typing import Any

from .revisions import UNKNOWN, Revisions

__all__ = ["UNKNOWN", "Revisions", "install"]


def install(app: Any, settings: Any, hub: Any, registry: Any = None) -> contextlib.AbstractAsyncContextManager[Any]:
    from .manager import install as _install

    return _install(app, settings, hub, registry)
