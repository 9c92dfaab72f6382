"""A stand-in for the semantic part's install(): ``app.state.semantic`` with the ``sinks`` list its results go to
(proxy/semantic/observer.py), so the otel hook can be checked without the embedding model."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


def install(app: Any, settings: Any, hub: Any, registry: Any) -> None:
    app.state.semantic = SimpleNamespace(sinks=[])
