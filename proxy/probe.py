"""The recognition probe: re-scores a sample of chat responses through the upstream, off the request path.

For a sampled response (``probe.sample_rate``): the conversation's token ids (vLLM ``POST /tokenize``, messages,
``add_generation_prompt``) plus the text's (``POST /tokenize``, no special tokens) are teacher-forced through
``POST /v1/completions`` (``max_tokens: 1``, ``prompt_logprobs: K``); the text's positions give per-token entropy
and input surprise (:mod:`monitors.recognition`).

- **on-policy**: the model's own completion. Its re-scored entropies must reproduce the generation-time ones:
  the mean absolute difference is the self-check gauge ``entropy_proxy_probe_selfcheck_abs_diff{model}``.
- **off-policy**: a reference answer (:meth:`Probe.submit_reference`, called by ``POST /v1/feedback`` with a
  ``reference``), or the answer of ``probe.off_policy_model`` on ``probe.off_policy_upstream`` (default: the
  proxy's upstream). Each pair updates the recognition ratio H_off / H_on (``entropy_proxy_recognition_ratio``)
  and its rise over the probe's baseline, which the diagnosis reads (``app.state.monitoring``).

Never on the request path: :meth:`Probe.observe` draws a random number and queues the observation (bounded: when
full, dropped and counted); ``probe.concurrency`` workers drain it, one upstream request in flight each; parsing
and estimation run in a thread. When the upstream refuses the method (no ``/tokenize``, ``prompt_logprobs``
rejected or ignored) the probe logs once, disables itself and counts it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any

import anyio
import httpx
import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from monitors import recognition as rec
from monitors.recognition import RecognitionTracker, ScoredText

from .observe import Observation
from .settings import Settings
from .upstream import error_message, max_allowed, request_headers

log = logging.getLogger("entropy_proxy.probe")

QUEUE_SIZE = 64  # jobs waiting; beyond this the probe drops (it is a sample anyway)
RECENT = 1024  # recent chat responses kept (by request id) so that a later reference can be paired with them
RESULTS = 256  # recent probe results kept for status and the audit trail
OUTCOMES = ("sampled", "scored", "dropped", "failed", "skipped", "refused")
NS = "entropy_proxy_probe"


class Refused(Exception):
    """The upstream does not support the probe's method (no /tokenize, no prompt_logprobs)."""


class Skip(Exception):
    """This job cannot be scored (empty text, too long for the context); not the upstream's fault."""


@dataclass(slots=True)
class _Entry:
    obs: Observation
    on: ScoredText | None = None  # cached on-policy scoring, reused when a reference arrives later


@dataclass(slots=True)
class ProbeResult:
    request_id: str
    model: str  # the metric label
    created: float
    on: dict[str, Any]
    selfcheck: dict[str, Any]
    off: dict[str, Any] | None = None
    ratio: float | None = None


_Job = tuple[_Entry, str | None]  # (the response, a reference text to pair with it)


def _side(s: ScoredText, **extra: Any) -> dict[str, Any]:
    return {"tokens": s.tokens, "mean_entropy": _r(s.mean_entropy), "input_surprise": _r(s.mean_surprise), **extra}


def _r(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, 5)


def _json_or_none(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _score_body(raw: bytes, start: int, ids: list[int], vocab_size: int) -> ScoredText:
    """Parse a /v1/completions body and score positions ``start:`` (runs in a worker thread)."""
    body = orjson.loads(raw)
    choices = body.get("choices") if isinstance(body, dict) else None
    plp = choices[0].get("prompt_logprobs") if choices and isinstance(choices[0], dict) else None
    if not isinstance(plp, list):
        raise Refused("the upstream answered without prompt_logprobs")
    entries = plp[start:]
    if len(entries) != len(ids):
        raise Skip(f"{len(entries)} prompt_logprobs for {len(ids)} scored tokens")
    lp, col, actual = rec.rows_from_prompt_logprobs([e if isinstance(e, dict) else None for e in entries], ids)
    return rec.score_rows(lp, col, actual, vocab_size)


class Probe:
    """``client``, ``k``, ``label``, ``metrics``, ``monitoring``: getters into the app (its state exists only once
    the lifespan runs). Results go to :attr:`results` (the last ``RESULTS``) and to every :attr:`result_sinks`."""

    def __init__(
        self, settings: Settings, client: Callable[[], httpx.AsyncClient], *, k: Callable[[], int] | None = None,
        label: Callable[[str], str] | None = None, metrics: Callable[[], Any] | None = None,
        monitoring: Callable[[], Any] | None = None, queue_size: int = QUEUE_SIZE, rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.cfg = settings.probe
        self._client = client
        self._k = k or (lambda: settings.top_k)
        self._label = label or (lambda m: m if m in settings.models else "other")
        self._metrics = metrics or (lambda: None)
        self._monitoring = monitoring or (lambda: None)
        self.queue_size = queue_size
        self.rng = rng or random.Random()
        self.enabled = self.cfg.sample_rate > 0
        self.refused: str | None = None
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.models: dict[str, RecognitionTracker] = {}  # per model label: pairs, surprise, self-check
        self.recent: OrderedDict[str, _Entry] = OrderedDict()
        self.results: OrderedDict[str, ProbeResult] = OrderedDict()
        self.result_sinks: list[Callable[[ProbeResult], None]] = []
        self.pending = 0  # jobs queued or running
        self._send: Any = None
        self._off_client: httpx.AsyncClient | None = None
        self._k_max: int | None = None  # learnt from "greater than max allowed: N"
        self._tokenize_ok = False

    # -- the request path (must stay cheap) ----------------------------------------------------------------------
    def observe(self, obs: Observation) -> None:
        if not self.enabled or obs.endpoint != "chat" or not isinstance(obs.prompt, list) or not obs.completion_text:
            return
        entry = self.recent.get(obs.request_id)
        if entry is None or obs.choice_index == 0:
            entry = self.recent[obs.request_id] = _Entry(obs)
            if len(self.recent) > RECENT:
                self.recent.popitem(last=False)
        if self.rng.random() < self.cfg.sample_rate:
            self.counts["sampled"] += 1
            self._enqueue((_Entry(obs) if obs.choice_index else entry, None))

    def submit_reference(self, request_id: str, text: str) -> bool:
        """Queue a reference answer for a recent response as off-policy text; False if unknown or probe off."""
        entry = self.recent.get(request_id)
        if not self.enabled or entry is None or not isinstance(text, str) or not text.strip():
            return False
        return self._enqueue((entry, text))

    def _enqueue(self, job: _Job) -> bool:
        try:
            if self._send is None:  # not running (yet, or any more)
                raise anyio.WouldBlock
            self._send.send_nowait(job)
        except anyio.WouldBlock:
            self.counts["dropped"] += 1
            return False
        self.pending += 1
        return True

    # -- background ------------------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Probe]:
        send, recv = anyio.create_memory_object_stream[_Job](self.queue_size)
        if self.cfg.off_policy_upstream:
            base, s = self.cfg.off_policy_upstream.rstrip("/").removesuffix("/v1"), self.settings
            self._off_client = httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(s.timeout_s,
                                                                                      connect=s.connect_timeout_s))
        try:
            async with send, recv, anyio.create_task_group() as tg:
                self._send = send
                for _ in range(self.cfg.concurrency):
                    tg.start_soon(self._worker, recv)
                try:
                    yield self
                finally:
                    self._send = None
                    tg.cancel_scope.cancel()
        finally:
            if self._off_client is not None:
                await self._off_client.aclose()
                self._off_client = None

    async def _worker(self, recv: Any) -> None:
        async for job in recv:
            try:
                if self.enabled:
                    await self._run(job)
                    self.counts["scored"] += 1
                else:
                    self.counts["skipped"] += 1
            except Refused as e:
                self.counts["refused"] += 1
                if self.enabled:
                    self.enabled, self.refused = False, str(e)
                    log.warning("recognition probe disabled: %s", e)
            except Skip as e:
                self.counts["skipped"] += 1
                log.debug("probe skipped %s: %s", job[0].obs.request_id, e)
            except Exception as e:  # noqa: BLE001 - the probe must never take the proxy down
                self.counts["failed"] += 1
                expected = isinstance(e, (httpx.HTTPError, ValueError, KeyError, TypeError, IndexError))
                log.log(logging.DEBUG if expected else logging.ERROR, "probe of %s failed: %r",
                        job[0].obs.request_id, e, exc_info=not expected)
            finally:
                self.pending -= 1

    async def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until no job is queued or running (tests, shutdown); False on timeout."""
        with anyio.move_on_after(timeout):
            while self.pending > 0:
                await anyio.sleep(0.02)
            return True
        return False

    # -- one job ---------------------------------------------------------------------------------------------------
    async def _post(self, client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> httpx.Response:
        return await client.post(path, content=orjson.dumps(body), headers={
            **request_headers((), self.settings, annotated=False), "Content-Type": "application/json"})

    async def _tokenize(self, body: dict[str, Any]) -> tuple[list[int], int | None]:
        r = await self._post(self._client(), "/tokenize", body)
        if r.status_code in (404, 405, 501) or (r.status_code in (400, 422) and not self._tokenize_ok):
            raise Refused(f"POST /tokenize answered {r.status_code}")
        r.raise_for_status()
        data = r.json()
        ids = data.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise Refused("POST /tokenize answered without a list of token ids")
        self._tokenize_ok = True
        mx = data.get("max_model_len")
        return ids, mx if isinstance(mx, int) else None

    async def _score(self, model: str, prompt_ids: list[int], max_len: int | None, text: str) -> ScoredText:
        ids, _ = await self._tokenize({"model": model, "prompt": text, "add_special_tokens": False})
        if not ids:
            raise Skip("nothing to score")
        if max_len is not None and len(prompt_ids) + len(ids) + 1 > max_len:
            raise Skip("prompt and text exceed the model's context")
        k = self._k() if self._k_max is None else min(self._k(), self._k_max)
        for _ in range(2):
            body = {"model": model, "prompt": prompt_ids + ids, "max_tokens": 1, "prompt_logprobs": k,
                    "temperature": 0}
            r = await self._post(self._client(), "/v1/completions", body)
            if r.status_code in (400, 422):
                msg = error_message(_json_or_none(r.content))
                n = max_allowed(msg)
                if n is not None and 0 < n < k:
                    self._k_max = k = n  # the server's --max-logprobs is below top_k: use it from now on
                    continue
                if isinstance(msg, str) and "logprobs" in msg:
                    raise Refused(f"the upstream rejected prompt_logprobs: {msg[:200]}")
            r.raise_for_status()
            return await anyio.to_thread.run_sync(
                _score_body, r.content, len(prompt_ids), ids, self.settings.vocab_size_for(model)
            )
        raise Skip("prompt_logprobs limit kept changing")

    def _foreign_model(self, model: str) -> bool:
        """Whether ``probe.off_policy_model`` is another model than the one observed. Without one configured, or
        with the observed model itself on the same upstream, an "other" answer would be the model's own sample
        (a ratio of ~1 by construction): then only reference answers make pairs."""
        other = self.cfg.off_policy_model
        same_upstream = self.cfg.off_policy_upstream in (None, self.settings.upstream)
        return bool(other) and not (other == model and same_upstream)

    async def _other_answer(self, obs: Observation) -> str | None:
        client = self._off_client or self._client()
        model = self.cfg.off_policy_model or obs.model
        body = {"model": model, "messages": obs.prompt, "max_tokens": max(16, int(obs.entropies.size)),
                "temperature": 1.0}
        r = await self._post(client, "/v1/chat/completions", body)
        r.raise_for_status()
        msg = r.json()["choices"][0]["message"]
        text = msg.get("content") if isinstance(msg, dict) else None
        return text if isinstance(text, str) and text.strip() else None

    async def _run(self, job: _Job) -> None:
        (entry, reference), obs = job, job[0].obs
        label = self._label(obs.model)
        tracker = self.models.setdefault(label, RecognitionTracker())
        prompt_ids, max_len = await self._tokenize(
            {"model": obs.model, "messages": obs.prompt, "add_generation_prompt": True})
        fresh = entry.on is None
        on = entry.on or await self._score(obs.model, prompt_ids, max_len, obs.completion_text)
        entry.on = on
        check = rec.selfcheck(obs.entropies, on.entropies, drop_last_generated=obs.finish_reason == "stop")
        if fresh:
            tracker.add_on(on.mean_entropy, on.mean_surprise)
            tracker.add_selfcheck(check)
        off_text, source = reference, "reference"
        if off_text is None and self._foreign_model(obs.model):
            off_text, source = await self._other_answer(obs), f"model:{self.cfg.off_policy_model}"
        result = ProbeResult(request_id=obs.request_id, model=label, created=time.time(), on=_side(on),
                             selfcheck={k: _r(v) if isinstance(v, float) else v for k, v in asdict(check).items()})
        if off_text is not None:
            off = await self._score(obs.model, prompt_ids, max_len, off_text)
            tracker.add_off(off.mean_entropy, off.mean_surprise)
            tracker.add_pair(on.mean_entropy, off.mean_entropy)
            result.off = _side(off, source=source)
            result.ratio = _r(rec.recognition_ratio(off.mean_entropy, on.mean_entropy))
            self._publish(obs.model, tracker)
        self.results[obs.request_id] = result
        if len(self.results) > RESULTS:
            self.results.popitem(last=False)
        for sink in self.result_sinks:
            try:
                sink(result)
            except Exception:  # noqa: BLE001
                log.exception("probe result sink %r failed", sink)

    def _publish(self, model: str, tracker: RecognitionTracker) -> None:
        ratio, mon = tracker.ratio(), self._monitoring()
        target = self._metrics() or mon  # Metrics passes the ratio on to the monitors
        if ratio is not None and target is not None:
            target.set_recognition_ratio(model, ratio)
        if mon is not None:
            mon.set_recognition_rise(model, tracker.rise(), tracker.rise_interval())

    # -- readings --------------------------------------------------------------------------------------------------
    def selfcheck_value(self, label: str) -> float | None:
        return self.models[label].selfcheck() if label in self.models else None

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled, "refused": self.refused, "sample_rate": self.cfg.sample_rate,
            "concurrency": self.cfg.concurrency, "counts": dict(self.counts), "pending": self.pending,
            "off_policy_model": self.cfg.off_policy_model,
            "models": {label: t.summary() for label, t in list(self.models.items())},
        }


class _ProbeCollector(Collector):
    """Probe gauges and counters, read at scrape time (labels: model from the allow-list, fixed policy/outcome)."""

    def __init__(self, probe: Probe) -> None:
        self.p = probe

    def describe(self) -> list[Metric]:
        return self.collect(samples=False)

    def collect(self, samples: bool = True) -> list[Metric]:
        sc = GaugeMetricFamily(f"{NS}_selfcheck_abs_diff", "Mean absolute difference (nats) between re-scored and "
                               "generation-time per-token entropy of the model's own responses.", labels=["model"])
        ent = GaugeMetricFamily(f"{NS}_mean_entropy_nats", "Mean entropy of re-scored text, on- and off-policy.",
                                labels=["model", "policy"])
        sur = GaugeMetricFamily(f"{NS}_input_surprise_nats", "Mean -log p of the re-scored text's tokens.",
                                labels=["model", "policy"])
        total = CounterMetricFamily(f"{NS}", "Probe jobs by outcome.", labels=["outcome"])
        enabled = GaugeMetricFamily(f"{NS}_enabled", "1 while the recognition probe runs.")
        p = self.p
        for label, t in list(p.models.items()) if samples else []:
            v = p.selfcheck_value(label)
            if v is not None:
                sc.add_metric([label], v)
            for policy, side in (("on", t.on), ("off", t.off)):
                if side.entropy:
                    ent.add_metric([label, policy], sum(side.entropy) / len(side.entropy))
                if side.surprise:
                    sur.add_metric([label, policy], sum(side.surprise) / len(side.surprise))
        if samples:
            for outcome in OUTCOMES:
                total.add_metric([outcome], p.counts[outcome])
            enabled.add_metric([], 1.0 if p.enabled else 0.0)
        return [sc, ent, sur, total, enabled]


def install(
    app: Any, settings: Settings, hub: Any, registry: Any
) -> contextlib.AbstractAsyncContextManager[Any] | None:
    """Create ``app.state.probe``; with ``probe.sample_rate`` > 0 observe chat traffic and run the workers.

    The probe's gauges go on ``registry``; its status appears under ``"probe"`` in ``GET /v1/entropy/status``.
    """

    def label(model: str) -> str:
        mon = getattr(app.state, "monitoring", None)
        return str(mon.label(model)) if mon is not None else (model if model in settings.models else "other")

    probe = app.state.probe = Probe(
        settings, lambda: app.state.upstream.client, k=lambda: int(app.state.upstream.k), label=label,
        metrics=lambda: getattr(app.state, "metrics", None), monitoring=lambda: getattr(app.state, "monitoring", None),
    )
    if registry is not None:
        registry.register(_ProbeCollector(probe))
    if hasattr(getattr(app.state, "monitoring", None), "status_sections"):
        app.state.monitoring.status_sections["probe"] = probe.status
    if not probe.enabled:
        return None
    hub.add(probe)
    return probe.running()
