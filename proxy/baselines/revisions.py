"""The revision of each served model: what a baseline, a canary round or an alert is keyed by.

Order: ``models.<name>.revision`` from the config, else what the upstream says about the model (vLLM's
``/v1/models`` entry carries ``root``: the path or hub id the weights were loaded from), else ``"unknown"``.
The upstream's answer is refreshed by the baselines poller, so a redeploy behind the same served name is noticed
within one poll interval.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import httpx

from proxy.settings import Settings

log = logging.getLogger("entropy_proxy.baselines")

UNKNOWN = "unknown"
MAX_REVISION_CHARS = 255  # the store's column width; the value also becomes a metric label


def _clean(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip()[:MAX_REVISION_CHARS]


class Revisions:
    """``revision(model)`` for a metric label; ``settled(model)`` says whether the answer can still change
    because the upstream has not been asked yet (then builders wait rather than key data by a guess)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._upstream: dict[str, str] = {}
        self._asked = False
        self._lock = threading.Lock()

    def revision(self, model: str) -> str:
        configured = _clean(self.settings.revision_for(model))
        if configured:
            return configured
        with self._lock:
            return self._upstream.get(model, UNKNOWN)

    def settled(self, model: str) -> bool:
        return bool(_clean(self.settings.revision_for(model))) or self._asked

    def source(self, model: str) -> str:
        if _clean(self.settings.revision_for(model)):
            return "config"
        with self._lock:
            return "upstream" if model in self._upstream else "none"

    def note_models(self, data: Any) -> dict[str, str]:
        """Take the ``data`` list of a ``/v1/models`` answer; returns the models whose revision changed."""
        found: dict[str, str] = {}
        if isinstance(data, list):
            for m in data:
                if isinstance(m, dict) and isinstance(m.get("id"), str):
                    root = _clean(m.get("root"))
                    if root:
                        found[m["id"]] = root
        with self._lock:
            changed = {k: v for k, v in found.items() if self._upstream.get(k) != v}
            # Merged, not replaced: a model missing from one answer (a restarting upstream) keeps its revision.
            self._upstream.update(found)
            self._asked = True
        return changed

    async def refresh(self, client: httpx.AsyncClient, headers: dict[str, str], timeout_s: float = 5.0) -> bool:
        """Ask the upstream's ``/v1/models``; False when it did not answer (the last answer stays)."""
        try:
            r = await client.get("/v1/models", headers=headers, timeout=timeout_s)
        except httpx.HTTPError:
            return False
        try:
            data = r.json().get("data") if r.status_code == 200 else None
        except (ValueError, AttributeError):
            data = None
        if not isinstance(data, list):
            # An upstream that answers but names no revision (no /v1/models, another engine): "unknown" it stays;
            # a revision learnt before is kept (a passing error must not look like a redeploy).
            self._asked = True
            return False
        changed = self.note_models(data)
        if changed:
            log.info("model revisions from the upstream: %s", ", ".join(f"{k}={v}" for k, v in changed.items()))
        return True

    def snapshot(self) -> dict[str, str]:
        with self._lock:
            return dict(self._upstream)
