"""Shadow sampling: extra answers to a share of chat requests, sampled in the background, clustered by meaning.

:meth:`SemanticObserver.observe` runs on the request path (an ObserverHub observer): it only draws the sampling
decision and hands a small snapshot of the response to the shared background sampler (``spawn``: a bounded queue,
so a burst of requests is dropped and counted rather than queued without end). The job, in the sampler's task
group, asks the upstream for ``semantic.samples`` answers to the same messages at temperature 1 in one request
(``n``), under the ``semantic`` purpose's token budget (``semantic.max_tokens_per_hour``: a request whose worst
case does not fit is refused, not sent). The client's response has long been sent by then: nothing here is on the
client's path.

Clustering runs in a worker thread of its own (one at a time, at niceness 10, so that on a machine with few
cores the scheduler prefers the event loop's thread), so the embedding model never blocks the event loop. The
result goes to the histogram ``entropy_proxy_semantic_entropy_nats{model}``, to the audit record (the response is
recorded even if the audit writer had not sampled it), and, when the response was flagged ``confident`` and its
semantic entropy is at least ``semantic.uncertain_nats``, the record gets the flag ``confident_inconsistent``:
token-confident, but the model does not say the same thing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..observe import Observation
from ..settings import SemanticSettings
from .clusterer import Clusterer, SemanticResult

log = logging.getLogger("entropy_proxy.semantic")

PURPOSE = "semantic"
FLAG = "confident_inconsistent"
MIN_SAMPLE_TOKENS = 16
AUDIT_FLUSH_S = 10.0
NICENESS = 10


@dataclass(slots=True, frozen=True)
class _Snapshot:
    """What a job needs from an observation (not the per-token arrays, which may be large)."""

    request_id: str
    choice_index: int
    model: str
    messages: list[Any]
    completion: str
    n_tokens: int
    flags: frozenset[str]
    created: float


class SemanticObserver:
    def __init__(
        self,
        cfg: SemanticSettings,
        sampler: Any,
        clusterer: Clusterer,
        *,
        state: Any = None,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.sampler = sampler
        self.clusterer = clusterer
        self._state = state  # app.state: metrics, audit writer, is_leader are looked up per use
        self._rng = rng or random.Random()
        self._executor: ThreadPoolExecutor | None = None
        self.sampled = 0  # jobs handed to the sampler
        self.not_spawned = 0  # the sampler's queue was full or it was not running
        self.no_answer = 0  # the sampler refused (budget) or the upstream failed
        self.results = 0
        self.flagged = 0
        self.cpu_s = 0.0
        self.recent: deque[dict[str, Any]] = deque(maxlen=20)
        self.sinks: list[Callable[[_Snapshot, SemanticResult], None]] = []

    def _get(self, name: str) -> Any:
        return getattr(self._state, name, None) if self._state is not None else None

    # -- the request path ------------------------------------------------------------------------------------------
    def observe(self, obs: Observation) -> None:
        if obs.endpoint != "chat" or obs.choice_index != 0 or not isinstance(obs.prompt, list) or not obs.prompt:
            return
        if self.cfg.sample_rate <= 0 or self._rng.random() >= self.cfg.sample_rate:
            return
        if self._state is not None and not getattr(self._state, "is_leader", True):
            return  # the sampler runs in the leader worker only
        snap = _Snapshot(
            request_id=obs.request_id, choice_index=obs.choice_index, model=obs.model, messages=list(obs.prompt),
            completion=obs.completion_text, n_tokens=len(obs.tokens),
            flags=frozenset(str(f) for f in obs.summary.get("flags") or ()), created=obs.created,
        )
        writer = self._get("audit_writer")
        if writer is not None and not writer.is_pending(snap.request_id):
            writer.promote(snap.request_id)  # the record must exist for the result to land on it
        if self.sampler.spawn(PURPOSE, self._job(snap)):
            self.sampled += 1
        else:
            self.not_spawned += 1

    # -- background ------------------------------------------------------------------------------------------------
    def body(self, snap: _Snapshot) -> dict[str, Any]:
        # Samples about as long as the answer they are compared with (room to finish a sentence), within the cap.
        max_tokens = min(self.cfg.max_tokens, max(MIN_SAMPLE_TOKENS, 2 * snap.n_tokens))
        return {"model": snap.model, "messages": snap.messages, "n": self.cfg.samples, "temperature": 1.0,
                "max_tokens": max_tokens, "logprobs": True, "top_logprobs": 0, "stream": False}

    async def _job(self, snap: _Snapshot) -> None:
        data = await self.sampler.chat(PURPOSE, self.body(snap))
        samples = _samples(data)
        if not samples:
            self.no_answer += 1
            return
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._pool(), self.clusterer.run, samples, snap.completion)
        self.results += 1
        self.cpu_s += result.cpu_s
        flag = FLAG if "confident" in snap.flags and result.entropy >= self.cfg.uncertain_nats else None
        if flag:
            self.flagged += 1
        self.recent.append({"response_id": snap.request_id, "model": snap.model, "entropy": round(result.entropy, 4),
                            "discrete": round(result.discrete, 4), "clusters": len(result.clusters),
                            "flag": flag, "at": time.time()})
        metrics = self._get("metrics")
        if metrics is not None and hasattr(metrics, "observe_semantic"):
            metrics.observe_semantic(snap.model, result.entropy)
        for sink in list(self.sinks):
            sink(snap, result)
        await self._record(snap, result, flag)

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="semantic", initializer=_lower_priority)
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def _record(self, snap: _Snapshot, result: SemanticResult, flag: str | None) -> None:
        writer = self._get("audit_writer")
        if writer is None:
            return
        clusters = result.clusters if writer.store_text else [
            {k: v for k, v in c.items() if k != "answers"} for c in result.clusters]
        values = {"semantic_entropy": round(result.entropy, 6), "semantic_entropy_discrete": round(result.discrete, 6),
                  "semantic_samples": result.samples, "semantic_clusters": clusters}
        try:
            await writer.flush(AUDIT_FLUSH_S)  # the response's own row first
            await writer.store.set_semantic(snap.request_id, snap.choice_index, values, flag)
        except Exception as e:  # noqa: BLE001 - the audit trail is best effort, as the writer's own writes are
            log.warning("semantic entropy for %s not recorded: %s", snap.request_id, type(e).__name__)

    def status(self) -> dict[str, Any]:
        return {
            "sample_rate": self.cfg.sample_rate, "samples": self.cfg.samples, "sampled": self.sampled,
            "not_spawned": self.not_spawned, "no_answer": self.no_answer, "results": self.results,
            "flagged_confident_inconsistent": self.flagged,
            "cpu_s_per_result": round(self.cpu_s / self.results, 4) if self.results else None,
            "recent": list(self.recent)[-5:],
        }


def _lower_priority() -> None:
    """Run the clustering thread at a lower CPU priority than the event loop's (Linux: niceness is per thread)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)


def _samples(data: dict[str, Any] | None) -> list[tuple[str, list[float]]]:
    """(text, token logprobs) of each choice, in index order; empty when the answer is unusable."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        return []
    out = []
    for c in sorted((c for c in data["choices"] if isinstance(c, dict)), key=lambda c: c.get("index", 0)):
        msg = c.get("message") or {}
        text = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(text, str):
            continue
        content = (c.get("logprobs") or {}).get("content") or []
        lps = [float(t["logprob"]) for t in content
               if isinstance(t, dict) and isinstance(t.get("logprob"), int | float)]
        out.append((text, lps))
    return out
