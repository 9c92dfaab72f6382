"""The poller: loads the store's baselines at start, writes finished warm-ups, re-reads both every poll.

Every replica runs one. At start it asks the upstream for the models' revisions and applies the store's baseline
of each model's revision (pinned over auto), so a restarted replica compares with the same baseline as before
instead of learning whatever it sees first. A warm-up finished on this replica is written insert-if-absent (the
first replica to finish wins; the others' attempts are no-ops) and then read back, so all replicas use the
stored one. Every ``monitors.baseline_poll_s`` it re-reads the revisions and the baselines: a pin made on
another replica or with ``entropy-proxy baseline pin`` reaches every replica within one interval, and a model
whose revision changed gets fresh monitors (the old revision's window is not evidence about the new one).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import anyio

from . import live as live_mod
from .model import Baseline
from .revisions import Revisions
from .store import BaselineStore, effective

log = logging.getLogger("entropy_proxy.baselines")


class BaselineManager:
    def __init__(self, app: Any, settings: Any, revisions: Revisions) -> None:
        self.app, self.settings, self.revisions = app, settings, revisions
        self.monitoring = getattr(app.state, "monitoring", None)
        self.store: BaselineStore | None = None
        self._own_store: Any = None
        self._pending: deque[tuple[str, Baseline]] = deque()
        self.last_sync: float | None = None
        self.last_error: str | None = None
        self.written = 0  # auto baselines this replica wrote first
        self._sync_lock = anyio.Lock()  # the poller and an explicit sync() (tests, start-up) never interleave

    @property
    def persists(self) -> bool:
        s = self.settings
        return bool(s.audit.enabled and s.monitors.baseline_store)

    def submit(self, model: str, baseline: Baseline) -> None:
        """A finished warm-up (called from the monitors' worker thread)."""
        self._pending.append((model, baseline))

    def current(self, model: str) -> Baseline | None:
        mon = self.monitoring
        mm = mon.models.get(model) if mon is not None else None
        return mm.live.baseline if mm is not None and mm.live is not None else None

    # -- the store -----------------------------------------------------------------------------------------------------
    async def open(self) -> None:
        if not self.persists:
            return
        writer = getattr(self.app.state, "audit_writer", None)
        store = getattr(writer, "store", None)
        if store is None or store.url != self.settings.audit.url:
            from proxy.audit.store import AuditStore

            store = self._own_store = AuditStore(self.settings.audit.url)
        self.store = BaselineStore(store)

    async def close(self) -> None:
        if self._own_store is not None:
            await self._own_store.close()

    async def _ensure_started(self) -> None:
        assert self.store is not None
        if self.store.store.engine is None:  # ours, or the writer's that could not start: (re)try
            await self.store.store.start()

    # -- one cycle -----------------------------------------------------------------------------------------------------
    async def refresh_revisions(self) -> None:
        models = self.settings.models
        if models and all(self.settings.revision_for(m) for m in models):
            self.revisions._asked = True  # every model's revision is configured: nothing to ask
            return
        upstream = getattr(self.app.state, "upstream", None)
        if upstream is None:
            return
        from proxy.upstream import request_headers

        await self.revisions.refresh(upstream.client, request_headers((), self.settings, annotated=False))

    def _follow_revisions(self) -> None:
        mon = self.monitoring
        if mon is None:
            return
        for label, mm in list(mon.models.items()):
            lv = mm.live
            if lv is None:
                continue
            rev, settled = self.revisions.revision(label), self.revisions.settled(label)
            if rev != lv.revision and (lv.builder is not None or lv.baseline is not None or lv.candidate):
                log.info("model %s: revision %s -> %s; monitors start afresh", label, lv.revision, rev)
                mon.models.pop(label, None)
                mon._get(label)
            else:
                lv.revision, lv.settled = rev, settled

    async def _write_pending(self) -> bool:
        """Write finished warm-ups; False when the store failed (they stay pending, used locally meanwhile)."""
        while self._pending:
            model, b = self._pending[0]
            if self.store is None:
                self._pending.popleft()
                continue
            try:
                await self._ensure_started()
                if await self.store.insert_if_absent(b):
                    self.written += 1
                    log.info("model %s revision %s: automatic baseline stored (%d tokens, %d responses)",
                             model, b.revision, b.tokens, b.responses)
            except Exception as e:  # noqa: BLE001 - used locally meanwhile, written at a later poll
                self.last_error = f"{type(e).__name__}: {e}".splitlines()[0]
                self._use_locally(model, b)
                return False
            self._pending.popleft()
        return True

    def _use_locally(self, model: str, b: Baseline) -> None:
        mm = self.monitoring.models.get(model) if self.monitoring is not None else None
        if mm is not None and mm.live is not None and mm.live.baseline is None and mm.live.revision == b.revision:
            live_mod.apply(mm, b)

    async def _reload(self) -> None:
        mon = self.monitoring
        if mon is None or self.store is None:
            return
        await self._ensure_started()
        labels = set(mon.models) | set(self.settings.models or ())
        rows = effective(await self.store.for_models(labels))
        for label in sorted(labels):
            mm = mon.models.get(label)
            rev = mm.live.revision if mm is not None and mm.live is not None else self.revisions.revision(label)
            eff = rows.get((label, rev))
            if eff is None:
                continue
            if mm is None:
                if label not in mon.allowed:
                    continue
                mm = mon._get(label)
            cur = mm.live.baseline
            if cur is not None and (cur.source, cur.created) == (eff.source, eff.created):
                continue
            if cur is not None and cur.source == "file" and eff.source == "auto":
                continue  # monitors.baseline_file wins over an automatic one; a pin wins over both
            live_mod.apply(mm, eff)
            log.info("model %s revision %s: using the %s baseline of %s", label, rev, eff.source,
                     time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(eff.created)))

    async def sync(self) -> None:
        """One cycle: revisions, pending writes, re-read. Errors are logged and kept for the status page."""
        async with self._sync_lock:
            await self._sync()

    async def _sync(self) -> None:
        try:
            await self.refresh_revisions()
            self._follow_revisions()
            written = await self._write_pending()
            await self._reload()
            self.last_sync = time.time()
            if written:
                self.last_error = None
        except Exception as e:  # noqa: BLE001 - the proxy serves on; the next poll retries
            self.last_error = f"{type(e).__name__}: {e}".splitlines()[0]
            log.warning("baselines: %s", self.last_error)

    async def run(self) -> None:
        poll = self.settings.monitors.baseline_poll_s
        tick = min(1.0, poll)
        next_poll = time.monotonic() + poll
        while True:
            await anyio.sleep(tick)
            # A finished warm-up is written at once; after a failed write it waits for the next poll.
            if (self._pending and self.last_error is None) or time.monotonic() >= next_poll:
                await self.sync()
                next_poll = time.monotonic() + poll

    def status(self) -> dict[str, Any]:
        mon = self.monitoring
        return {
            "persisted": self.store is not None,
            "poll_s": self.settings.monitors.baseline_poll_s,
            "last_sync": self.last_sync,
            "last_error": self.last_error,
            "pending_writes": len(self._pending),
            "written_here": self.written,
            "revisions": {label: {"revision": self.revisions.revision(label), "from": self.revisions.source(label)}
                          for label in sorted(set(mon.models if mon is not None else ()) |
                                              set(self.settings.models or ()))},
        }


def install(app: Any, settings: Any, hub: Any, registry: Any = None) -> contextlib.AbstractAsyncContextManager[Any]:
    revisions = Revisions(settings)
    app.state.revisions = revisions
    manager = BaselineManager(app, settings, revisions)
    app.state.baselines = manager
    mon = manager.monitoring
    if mon is not None:
        mon.revisions = revisions
        if manager.persists:
            mon.on_candidate = manager.submit
        mon.status_sections["baselines"] = manager.status
        for name in settings.models:  # configured models are listed (state unknown, counters at 0) before traffic
            mon._get(mon.label(name))

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[BaselineManager]:
        await manager.open()
        with anyio.move_on_after(10):
            await manager.sync()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(manager.run)
                try:
                    yield manager
                finally:
                    tg.cancel_scope.cancel()
        finally:
            await manager.close()

    return lifespan()
