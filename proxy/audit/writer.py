"""The audit writer: an observer that never blocks the request path.

``observe(obs)`` decides whether a finished choice is recorded (every ``confident`` or ``uncertain`` one, plus a
``sample_rate`` share of the rest) and ``submit()`` appends it to a bounded queue: synchronous, O(1), no I/O and no
per-token work. A background task drains the queue in batches of ``batch_size``, turns observations into rows and
writes them. When the queue is full or the store fails, records are dropped and counted by reason
(``queue_full``, ``store_error``, ``shutdown``) in ``dropped`` and in ``entropy_proxy_audit_dropped_total`` when
the metrics module is installed. On shutdown the queue is flushed, within ``shutdown_timeout_s``.

Choices that were not sampled are remembered in a small LRU so that feedback for one of them can still record it
(otherwise every label for an unflagged response would be a 404 and calibration would see only flagged ones).

Recognition probe results (:meth:`AuditWriter.submit_probe`, a sink on ``app.state.probe.result_sinks``) go
through the same queue and batches as ``audit_probe_results`` rows; the response they belong to is recorded with
them even if it was not sampled, as feedback does.

Text (prompt, completion, token strings, alternative token strings) is written only when ``store_text`` is on:
the tokens of a completion are its text. Observations carry no request headers, so no ``Authorization`` value
or API key can reach a row.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Any

import numpy as np
import orjson
import sqlalchemy as sa

from proxy.audit.store import AuditStore
from proxy.observe import Observation

log = logging.getLogger("entropy_proxy.audit")

RECORD_FLAGS = frozenset({"confident", "uncertain"})
ROUND = 4


def _dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def _finite_or_none(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _probs_array(logprobs: Any) -> np.ndarray:
    """Probabilities from logprobs, rounded; vLLM's -9999 (and NaN) mean probability 0."""
    lp = np.asarray(logprobs, dtype=np.float64)
    p = np.exp(np.minimum(lp, 0.0))
    p[(lp <= -9999.0) | np.isnan(lp)] = 0.0
    return np.round(p, ROUND)


def _probs(logprobs: Any) -> list[float]:
    return list(_probs_array(logprobs).tolist())


_second = itemgetter(1)


def _alternatives(alts: list[list[tuple[str, float]]], store_text: bool) -> tuple[str, str | None]:
    """(JSON per-token alternative probabilities, JSON per-token alternative tokens or None): vectorised. Rows of
    one width (the usual case) are written as one 2-D array, byte for byte what the nested lists give; the
    logprobs are read with ``map``/``chain`` in C, not a generator (88 -> 49 µs for 128 tokens)."""
    lens = [len(a) for a in alts]
    flat = np.fromiter(map(_second, chain.from_iterable(alts)), dtype=np.float64, count=sum(lens))
    p = _probs_array(flat)
    w = lens[0] if lens else 0
    if lens and lens.count(w) == len(lens):
        probs = _dumps(p.reshape(len(lens), w))
    else:
        pl = p.tolist()
        offsets = np.concatenate(([0], np.cumsum(lens))).tolist() if lens else [0]
        probs = _dumps([pl[offsets[i] : offsets[i + 1]] for i in range(len(lens))])
    tokens = _dumps([[t for t, _ in a] for a in alts]) if store_text else None
    return probs, tokens


def record_from_observation(obs: Observation, *, store_text: bool) -> dict[str, Any]:
    """The row for one finished choice. Text only when ``store_text``; never anything from ``obs.extra``."""
    summary = {k: v for k, v in obs.summary.items() if k != "per_token"}
    flags = [str(f) for f in summary.get("flags") or []]
    alt_probs, alt_tokens = _alternatives(obs.top_alternatives, store_text)
    prompt = obs.prompt if store_text else None
    return {
        "response_id": str(obs.request_id)[:255],
        "choice_index": int(obs.choice_index),
        "created": float(obs.created),
        "model": str(obs.model)[:255],
        "endpoint": str(obs.endpoint)[:32],
        "flags": "," + ",".join(flags) + "," if flags else ",",
        "mean_entropy": _finite_or_none(summary.get("mean")),
        "confidence": _finite_or_none(summary.get("confidence")),
        "n_tokens": int(np.asarray(obs.entropies).shape[0]),
        "finish_reason": obs.finish_reason,
        "streamed": bool(obs.streamed),
        "summary": _dumps(summary),
        "entropies": _dumps(np.round(np.asarray(obs.entropies, dtype=np.float64), ROUND)),
        "token_probs": _dumps(_probs(obs.sampled_logprobs)),
        "alt_probs": alt_probs,
        "alt_tokens": alt_tokens,
        "tokens": _dumps(list(obs.tokens)) if store_text else None,
        "prompt": _dumps(prompt) if store_text and prompt is not None else None,
        "completion": obs.completion_text if store_text else None,
    }


def _int_or_none(x: Any) -> int | None:
    return int(x) if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) else None


def probe_record(result: Any) -> dict[str, Any]:
    """The ``audit_probe_results`` row for one :class:`proxy.probe.ProbeResult` (read by attribute, numbers only)."""
    on: dict[str, Any] = result.on or {}
    off: dict[str, Any] = result.off or {}
    check: dict[str, Any] = result.selfcheck or {}
    source = off.get("source") if result.off is not None else None
    aligned = check.get("aligned")
    return {
        "response_id": str(result.request_id)[:255],
        "created": float(result.created),
        "model": str(result.model)[:255],
        "source": str(source)[:255] if source is not None else None,
        "on_tokens": _int_or_none(on.get("tokens")),
        "on_mean_entropy": _finite_or_none(on.get("mean_entropy")),
        "on_input_surprise": _finite_or_none(on.get("input_surprise")),
        "off_tokens": _int_or_none(off.get("tokens")),
        "off_mean_entropy": _finite_or_none(off.get("mean_entropy")),
        "off_input_surprise": _finite_or_none(off.get("input_surprise")),
        "ratio": _finite_or_none(result.ratio),
        "selfcheck_aligned": bool(aligned) if aligned is not None else None,
        "selfcheck_abs_diff": _finite_or_none(check.get("mean_abs_diff")),
        "selfcheck_max_abs_diff": _finite_or_none(check.get("max_abs_diff")),
        "selfcheck_mean_diff": _finite_or_none(check.get("mean_diff")),
    }


@dataclass(slots=True, frozen=True)
class _ProbeRow:
    """A probe result in the queue, already turned into its row (cheap: a dozen numbers)."""

    request_id: str
    row: dict[str, Any]


class AuditWriter:
    def __init__(
        self,
        store: AuditStore,
        *,
        sample_rate: float = 0.05,
        store_text: bool = False,
        queue_size: int = 10_000,
        batch_size: int = 200,
        retention_days: int | None = 30,
        retention_interval_s: float = 3600.0,
        flush_interval_s: float = 0.25,
        write_timeout_s: float = 10.0,
        shutdown_timeout_s: float = 10.0,
        start_timeout_s: float = 3.0,
        recent_size: int = 1024,
        recent_tokens: int = 50_000,
        metrics: Callable[[], Any] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.sample_rate = sample_rate
        self.store_text = store_text
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.retention_days = retention_days
        self.retention_interval_s = retention_interval_s
        self.flush_interval_s = flush_interval_s
        # Batching window: a record waits up to this long for others to share its transaction (a transaction a
        # response costs the loop ~1 ms of SQLAlchemy and driver work); 0 writes at once. flush()/stop() skip it.
        self.linger_s = flush_interval_s
        self._lingering = False
        self._flush_target = 0
        self.write_timeout_s = write_timeout_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.start_timeout_s = start_timeout_s
        self._metrics = metrics or (lambda: None)
        self._rng = rng or random.Random()
        self._queue: deque[Observation | _ProbeRow] = deque()
        self._pending: Counter[str] = Counter()  # response ids in the queue or in the batch being written
        self._recent: OrderedDict[str, list[Observation]] = OrderedDict()
        self._recent_size = recent_size
        self._recent_tokens = recent_tokens
        self._recent_tok = 0
        self.dropped: Counter[str] = Counter()
        self.written = 0
        self.store_ok = False
        self._submitted = 0  # observations queued so far
        self._settled = 0  # of those, written or dropped
        self._wake: asyncio.Event | None = None
        self._progress: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    # -- the request path ------------------------------------------------------------------------------------------
    def observe(self, obs: Observation) -> None:
        flags = set(obs.summary.get("flags") or ())
        if flags & RECORD_FLAGS or (self.sample_rate > 0 and self._rng.random() < self.sample_rate):
            self.submit(obs)
        else:
            self._remember(obs)

    def _remember(self, obs: Observation) -> None:
        self._recent.setdefault(obs.request_id, []).append(obs)
        self._recent.move_to_end(obs.request_id)
        self._recent_tok += len(obs.tokens)
        # Bounded by responses and by tokens: per-token alternatives are what makes an observation big.
        while len(self._recent) > self._recent_size or self._recent_tok > self._recent_tokens:
            _, old = self._recent.popitem(last=False)
            self._recent_tok -= sum(len(o.tokens) for o in old)

    def submit(self, obs: Observation) -> bool:
        """Queue one observation for writing; False (and counted) when dropped. Never blocks, never raises."""
        return self._enqueue(obs)

    def submit_probe(self, result: Any) -> bool:
        """Queue one recognition-probe result, and the response it belongs to if that was remembered but not
        sampled; False (and counted) when dropped. Never blocks, never raises (it runs as a probe result sink)."""
        try:
            item = _ProbeRow(str(result.request_id), probe_record(result))
        except Exception:  # noqa: BLE001 - a malformed result must not reach the probe's worker
            log.exception("probe result for the audit trail could not be encoded")
            self._drop("encode_error")
            return False
        self.promote(item.request_id)
        return self._enqueue(item)

    def _enqueue(self, item: Observation | _ProbeRow) -> bool:
        if self._closing or len(self._queue) >= self.queue_size:
            self._drop("shutdown" if self._closing else "queue_full")
            return False
        self._queue.append(item)
        self._submitted += 1
        if not isinstance(item, _ProbeRow):
            self._pending[item.request_id] += 1
        if not self._lingering or len(self._queue) >= self.batch_size:  # a lingering writer wakes on its own
            self._notify()
        return True

    def _notify(self) -> None:
        if self._wake is None or self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n
        m = self._metrics()
        if m is not None:
            try:
                m.audit_dropped(reason, n)
            except Exception:  # noqa: BLE001 - metrics must never break the writer
                log.exception("audit_dropped metric failed")

    # -- helpers for feedback ----------------------------------------------------------------------------------------
    def is_pending(self, response_id: str) -> bool:
        return self._pending.get(response_id, 0) > 0

    def promote(self, response_id: str) -> bool:
        """Queue the remembered, not-sampled choices of ``response_id`` (feedback arrived for them)."""
        observations = self._recent.pop(response_id, None)
        if not observations:
            return False
        self._recent_tok -= sum(len(o.tokens) for o in observations)
        return all([self.submit(o) for o in observations])

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far has been written or dropped; False on timeout."""
        if self._progress is None or not self._tasks:
            return not self._queue
        target = self._submitted
        self._flush_target = max(self._flush_target, target)
        self._notify()
        try:
            await asyncio.wait_for(self._settled_to(target), timeout)
        except TimeoutError:
            return False
        return True

    async def _settled_to(self, target: int) -> None:
        assert self._progress is not None
        while self._settled < target:
            self._progress.clear()
            await self._progress.wait()

    # -- background work ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        try:
            # Short: a hung database must not hold up the proxy's start; the writer keeps retrying.
            await asyncio.wait_for(self.store.start(), min(self.write_timeout_s, self.start_timeout_s))
            self.store_ok = True
        except Exception as e:  # noqa: BLE001 - the proxy serves without its audit trail
            log.error("audit store %s unavailable at start-up (%s); records will be dropped until it answers",
                      _safe_url(self.store.url), type(e).__name__)
        self._tasks.append(asyncio.create_task(self._run(), name="audit-writer"))
        if self.retention_days:
            self._tasks.append(asyncio.create_task(self._retention(), name="audit-retention"))
        if self._queue:
            self._wake.set()

    async def _ensure_store(self) -> bool:
        if self.store_ok:
            return True
        try:
            await asyncio.wait_for(self.store.start(), self.write_timeout_s)
        except Exception:  # noqa: BLE001
            return False
        self.store_ok = True
        log.info("audit store %s is answering again", _safe_url(self.store.url))
        return True

    async def _run(self) -> None:
        assert self._wake is not None and self._progress is not None
        backoff = 0.0
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.flush_interval_s * 4)
                except TimeoutError:
                    continue
            if not self._queue:
                continue
            if self.linger_s > 0:
                await self._linger()
            batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
            try:
                ok = await self._write(batch)
            finally:
                for o in batch:
                    if isinstance(o, _ProbeRow):
                        continue
                    self._pending[o.request_id] -= 1
                    if self._pending[o.request_id] <= 0:
                        del self._pending[o.request_id]
                self._settled += len(batch)
                self._progress.set()
            if ok:
                backoff = 0.0
            elif not self._closing:
                # Let the store recover; meanwhile the queue bounds memory and counts what it cannot hold.
                backoff = min(5.0, backoff * 2 or 0.1)
                await asyncio.sleep(backoff)

    async def _linger(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.linger_s
        self._lingering = True
        try:
            while (len(self._queue) < self.batch_size and not self._closing
                   and self._settled >= self._flush_target):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    return
        finally:
            self._lingering = False

    async def _write(self, batch: list[Observation | _ProbeRow]) -> bool:
        rows: list[dict[str, Any]] = []
        probe_rows = [o.row for o in batch if isinstance(o, _ProbeRow)]
        unencodable = 0
        try:
            for i, o in enumerate(o for o in batch if not isinstance(o, _ProbeRow)):
                if i and i % 4 == 0:
                    # Encoding is CPU work on the proxy's loop (~60 µs a 128-token record): let requests through
                    # every few records, so that a batch never holds the loop for more than a quarter millisecond.
                    await asyncio.sleep(0)
                try:
                    rows.append(record_from_observation(o, store_text=self.store_text))
                except Exception:  # noqa: BLE001 - one malformed observation must not lose the batch
                    log.exception("audit record for %s could not be encoded", o.request_id)
                    self._drop("encode_error")
                    unencodable += 1
            if not await self._ensure_store():
                raise ConnectionError("store not started")
            await asyncio.wait_for(self.store.insert_batch(rows, probe_rows), self.write_timeout_s)
        except asyncio.CancelledError:  # stop() gave up on a batch in flight: it is dropped, and must be counted
            self._drop("shutdown", len(batch) - unencodable)
            raise
        except Exception as e:  # noqa: BLE001
            n = len(rows) + len(probe_rows)
            log.warning("audit store write failed (%s); %d records dropped", type(e).__name__, n)
            self._drop("store_error", n)
            return False
        self.written += len(rows) + len(probe_rows)
        return True

    async def _retention(self) -> None:
        assert self.retention_days
        while True:
            if self.store_ok:
                try:
                    n = await self.store.purge(time.time() - self.retention_days * 86400.0)
                    if n:
                        log.info("audit retention: deleted %d responses older than %d days", n, self.retention_days)
                except Exception as e:  # noqa: BLE001
                    log.warning("audit retention failed: %s", type(e).__name__)
            await asyncio.sleep(self.retention_interval_s)

    async def stop(self) -> None:
        """Flush what is queued (within ``shutdown_timeout_s``), then stop; what is left is counted as dropped."""
        self._closing = True
        if self._tasks:
            self._notify()
            writer = self._tasks[0]
            try:
                await asyncio.wait_for(asyncio.shield(writer), self.shutdown_timeout_s)
            except TimeoutError:
                pass
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks.clear()
        if self._queue:
            self._drop("shutdown", len(self._queue))
            self._settled += len(self._queue)
            self._queue.clear()
            self._pending.clear()
        await self.store.close()


def _safe_url(url: str) -> str:
    """The URL without its password, for logs."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return "<audit url>"
