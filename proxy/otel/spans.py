"""Spans after the fact: one GenAI span per finished request, built from its :class:`RequestRecord` with the
start and end times it really had, its per-choice entropy verdicts as ``gen_ai.evaluation.result`` events,
and later evaluation spans (feedback, semantic entropy) in the same trace.

The request span is built as the SDK's finished-span type (``ReadableSpan``) and handed straight to the batch
processor: its ids were drawn and sent upstream when the request arrived, its sampling decided then with the
provider's sampler, and its attributes are typed and bounded here — the Tracer's span API would check every
attribute again on the event loop (a whole request span: 115 us that way, 19 us this way on an idle core;
docs/benchmarks.md).

Attribute names follow the OpenTelemetry GenAI semantic conventions (development status, spelling of the
GenAI SIG's registry: ``gen_ai.provider.name`` replaced ``gen_ai.system``; ``gen_ai.response.time_to_first_chunk``
in seconds for streams).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from typing import Any

import orjson
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from .middleware import MAX_KEPT_BODY, USAGE_MARK, RequestRecord

log = logging.getLogger("entropy_proxy.otel")

EVALUATION_EVENT = "gen_ai.evaluation.result"
OPERATION = {"chat": "chat", "completions": "text_completion"}
PROVIDER = "openai"  # the API flavour the upstream speaks (the conventions' discriminator); see docs/otel.md
KNOWN_RESPONSES = 20_000  # response id -> span context, for feedback and semantic entropy arriving later

# (request field, attribute, type) for the request parameters the conventions name
_REQUEST_PARAMS: tuple[tuple[str, str, type], ...] = (
    ("temperature", "gen_ai.request.temperature", float),
    ("top_p", "gen_ai.request.top_p", float),
    ("frequency_penalty", "gen_ai.request.frequency_penalty", float),
    ("presence_penalty", "gen_ai.request.presence_penalty", float),
    ("seed", "gen_ai.request.seed", int),
)
# The summary fields each choice reports as an evaluation: (evaluation name, summary key). Four attributes an event
# (no gen_ai.response.id: the span carries it): every attribute costs the OTLP encoder about 3 us.
ENTROPY_EVALUATIONS: tuple[tuple[str, str], ...] = (
    ("mean_entropy", "mean"),  # mean token entropy, nats
    ("confidence", "confidence"),  # geometric-mean probability of the sampled tokens
    ("forking_fraction", "forking_fraction"),  # share of tokens above the forking-entropy threshold
)
_MODEL = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.)*)"')
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')


def _parent_context(parent: tuple[int, int, int] | None, tracestate: str | None) -> Context | None:
    if parent is None:
        return None
    state = TraceState.from_header([tracestate]) if tracestate else None
    sc = SpanContext(parent[0], parent[1], is_remote=True, trace_flags=TraceFlags(parent[2] & 0xFF),
                     trace_state=state)
    return trace.set_span_in_context(NonRecordingSpan(sc))


def _json(parts: list[bytes]) -> Any:
    try:
        return orjson.loads(b"".join(parts))
    except orjson.JSONDecodeError:
        return None


def _first_event(chunk: bytes) -> Any:
    for line in chunk.split(b"\n"):
        if line.startswith(b"data:") and line[5:].strip() not in (b"", b"[DONE]"):
            try:
                return orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                return None
    return None


def _usage(blob: bytes) -> tuple[int | None, int | None]:
    at = blob.rfind(USAGE_MARK)
    if at < 0:
        return None, None
    tail = blob[at:at + 512]
    p, c = _PROMPT_TOKENS.search(tail), _COMPLETION_TOKENS.search(tail)
    return (int(p.group(1)) if p else None), (int(c.group(1)) if c else None)


MAX_STR = 256  # client-chosen strings (model, stop sequences) are cut to this; lists to MAX_LIST items
MAX_LIST = 16


def _short(v: str) -> str:
    return v if len(v) <= MAX_STR else v[:MAX_STR]


def _flags_label(summary: dict[str, Any]) -> str:
    flags = summary.get("flags") or ()
    return ",".join(flags) if flags else "none"


def _number(v: Any, kind: type) -> float | int | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if kind is float else int(v)


def request_attributes(endpoint: str, body: Any, model_hint: str) -> dict[str, Any]:
    attrs: dict[str, Any] = {"gen_ai.operation.name": OPERATION[endpoint], "gen_ai.provider.name": PROVIDER}
    if not isinstance(body, dict):
        if model_hint:
            attrs["gen_ai.request.model"] = _short(model_hint)
        return attrs
    model = body.get("model")
    if isinstance(model, str) and model:
        attrs["gen_ai.request.model"] = _short(model)
    elif model_hint:
        attrs["gen_ai.request.model"] = _short(model_hint)
    for key, attr, kind in _REQUEST_PARAMS:
        v = _number(body.get(key), kind)
        if v is not None:
            attrs[attr] = v
    max_tokens = _number(body.get("max_completion_tokens", body.get("max_tokens")), int)
    if max_tokens is not None:
        attrs["gen_ai.request.max_tokens"] = max_tokens
    n = _number(body.get("n"), int)
    if n is not None and n != 1:
        attrs["gen_ai.request.choice.count"] = n
    stop = body.get("stop")
    if isinstance(stop, str):
        attrs["gen_ai.request.stop_sequences"] = [_short(stop)]
    elif isinstance(stop, list) and stop and all(isinstance(s, str) for s in stop):
        attrs["gen_ai.request.stop_sequences"] = [_short(s) for s in stop[:MAX_LIST]]
    if body.get("stream") is True:
        attrs["gen_ai.request.stream"] = True
    return attrs


def evaluation_event(name: str, value: float | None, label: str | None, response_id: str | None,
                     explanation: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    attrs: dict[str, Any] = {"gen_ai.evaluation.name": name}
    if value is not None:
        attrs["gen_ai.evaluation.score.value"] = float(value)
    if label is not None:
        attrs["gen_ai.evaluation.score.label"] = label
    if explanation:
        attrs["gen_ai.evaluation.explanation"] = explanation
    if response_id:
        attrs["gen_ai.response.id"] = response_id
    attrs.update({k: v for k, v in (extra or {}).items() if v is not None})
    return attrs


class Tracing:
    """What the middleware and the rest of the proxy call; owns the tracer and the response-id index."""

    def __init__(self, provider: TracerProvider, processor: SpanProcessor, server: tuple[str, int | None]) -> None:
        self.provider = provider
        self.processor = processor
        self.tracer = provider.get_tracer("entropy_proxy")
        self.sampler = provider.sampler
        self.resource = provider.resource
        self.scope = InstrumentationScope("entropy_proxy")
        self.server = server
        self._known: OrderedDict[str, tuple[int, int, int]] = OrderedDict()
        self._lock = threading.Lock()

    # -- on the request path: cheap ------------------------------------------------------------------------------
    def should_sample(self, parent: tuple[int, int, int] | None, tracestate: str | None, trace_id: int,
                      endpoint: str) -> bool:
        result = self.sampler.should_sample(_parent_context(parent, tracestate), trace_id, OPERATION[endpoint],
                                            SpanKind.CLIENT)
        return bool(result.decision.is_sampled())  # type: ignore[no-untyped-call]

    # -- after the response ----------------------------------------------------------------------------------------
    def finish(self, rec: RequestRecord) -> None:
        try:
            self._finish(rec)
        except Exception:  # noqa: BLE001 - telemetry never fails a request
            log.exception("building the request span failed")

    def _finish(self, rec: RequestRecord) -> None:
        ev = rec.event
        body = _json(rec.body) if rec.body_size <= MAX_KEPT_BODY else None
        attrs = request_attributes(rec.endpoint, body, ev.model if ev is not None else "")
        host, port = self.server
        attrs["server.address"] = host
        if port is not None:
            attrs["server.port"] = port
        status = ev.status if ev is not None and ev.status else rec.status
        attrs["http.response.status_code"] = status
        response_id, response_model = "", None
        input_tokens = output_tokens = None
        if rec.streamed:
            first = _first_event(rec.head)
            if isinstance(first, dict):
                response_id = str(first.get("id") or "")
                m = first.get("model")
                response_model = m if isinstance(m, str) else None
            if rec.usage_chunk:
                input_tokens, output_tokens = _usage(rec.usage_chunk)
            if rec.first_chunk_s is not None and status == 200:
                attrs["gen_ai.response.time_to_first_chunk"] = rec.first_chunk_s
        elif status == 200 and rec.response:
            blob = b"".join(rec.response)
            m = _MODEL.search(blob)
            if m:
                response_model = m.group(1).decode("utf-8", "replace")
            input_tokens, output_tokens = _usage(blob)
        if rec.observations:
            response_id = response_id or rec.observations[0].request_id
        if output_tokens is None and rec.observations:  # no usage from the upstream: the annotated tokens
            output_tokens = sum(len(o.tokens) for o in rec.observations)
        if response_id:
            attrs["gen_ai.response.id"] = _short(response_id)
        if response_model:
            attrs["gen_ai.response.model"] = _short(response_model)
        if input_tokens is not None:
            attrs["gen_ai.usage.input_tokens"] = input_tokens
        if output_tokens is not None:
            attrs["gen_ai.usage.output_tokens"] = output_tokens
        finish = [o.finish_reason for o in sorted(rec.observations, key=lambda o: o.choice_index) if o.finish_reason]
        if finish:
            attrs["gen_ai.response.finish_reasons"] = finish
        error = (ev.upstream_error if ev is not None else None) or rec.error
        if status >= 400 or error:
            attrs["error.type"] = error or str(status)
        if rec.observations:
            s0 = min(rec.observations, key=lambda o: o.choice_index).summary
            for key in ("mean", "confidence", "forking_fraction"):
                if s0.get(key) is not None:
                    attrs[f"entropy_proxy.entropy.{key}"] = s0[key]
            attrs["entropy_proxy.entropy.flags"] = _flags_label(s0)
        model = attrs.get("gen_ai.request.model")
        name = f"{attrs['gen_ai.operation.name']} {model}" if model else attrs["gen_ai.operation.name"]
        events = []
        for obs in rec.observations:
            label = _flags_label(obs.summary)
            ts = int(obs.created * 1e9)
            for ev_name, key in ENTROPY_EVALUATIONS:
                value = obs.summary.get(key)
                if value is not None:
                    events.append(Event(EVALUATION_EVENT, evaluation_event(
                        ev_name, value, label, None, extra={"entropy_proxy.choice.index": obs.choice_index}), ts))
        parent = None
        state = None
        if rec.parent is not None:
            state = TraceState.from_header([rec.tracestate]) if rec.tracestate else None
            parent = SpanContext(rec.parent[0], rec.parent[1], is_remote=True,
                                 trace_flags=TraceFlags(rec.parent[2] & 0xFF), trace_state=state)
        context = SpanContext(rec.trace_id, rec.span_id, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED),
                              trace_state=state)
        outcome = Status(StatusCode.ERROR, error or str(status)) if status >= 500 or error else Status(StatusCode.UNSET)
        self.processor.on_end(ReadableSpan(
            name, context, parent, self.resource, attrs, events, (), SpanKind.CLIENT, None, outcome,
            start_time=rec.start_ns, end_time=rec.end_ns, instrumentation_scope=self.scope))
        if response_id:
            self._remember(response_id, (rec.trace_id, rec.span_id, TraceFlags.SAMPLED))

    def _remember(self, response_id: str, ctx: tuple[int, int, int]) -> None:
        with self._lock:
            self._known[response_id] = ctx
            self._known.move_to_end(response_id)
            while len(self._known) > KNOWN_RESPONSES:
                self._known.popitem(last=False)

    def span_of(self, response_id: str) -> tuple[int, int, int] | None:
        with self._lock:
            return self._known.get(response_id)

    # -- later evaluations -------------------------------------------------------------------------------------------
    def evaluation(self, response_id: str, name: str, value: float | None, label: str | None = None,
                   explanation: str | None = None, *, parent: tuple[int, int, int] | None = None,
                   start_ns: int | None = None, attributes: dict[str, Any] | None = None,
                   event_attributes: dict[str, Any] | None = None) -> None:
        """A ``gen_ai.evaluation.result`` that arrives after its response's span ended (feedback, semantic
        entropy): a short span of its own, child of (and linked to) the response's span when this process
        still knows it, else of ``parent`` (the caller's trace) or a new trace. Safe from any thread."""
        try:
            known = self.span_of(response_id)
            links = []
            if known is not None:
                ctx = _parent_context(known, None)
                links.append(Link(SpanContext(known[0], known[1], is_remote=True, trace_flags=TraceFlags(known[2]))))
            else:
                ctx = _parent_context(parent, None)
            attrs: dict[str, Any] = {"gen_ai.response.id": response_id, **(attributes or {})}
            span = self.tracer.start_span(f"evaluation {name}", context=ctx, kind=SpanKind.INTERNAL,
                                          attributes=attrs, links=links, start_time=start_ns)
            span.add_event(EVALUATION_EVENT, evaluation_event(name, value, label, response_id, explanation,
                                                              extra=event_attributes))
            span.end()
        except Exception:  # noqa: BLE001
            log.exception("building the %s evaluation span failed", name)

    def feedback(self, answer: bytes, parent: tuple[int, int, int] | None, start_ns: int) -> None:
        """From the 200 answer of ``POST /v1/feedback`` (id, correct, score): score 1/0 unless one was given."""
        try:
            fb = orjson.loads(answer)
        except orjson.JSONDecodeError:
            return
        rid = fb.get("id") if isinstance(fb, dict) else None
        if not isinstance(rid, str) or not isinstance(fb.get("correct"), bool):
            return
        score = fb.get("score")
        value = float(score) if isinstance(score, int | float) and not isinstance(score, bool) else float(fb["correct"])
        self.evaluation(rid, "feedback", value, "correct" if fb["correct"] else "incorrect",
                        "label from POST /v1/feedback", parent=parent, start_ns=start_ns)

    def shutdown(self, timeout_s: float) -> None:
        """Export what is queued, for at most ``timeout_s`` (an exporter that is down must not hold up a stop)."""
        self.processor.shutdown(timeout_millis=max(1, int(timeout_s * 1000)))  # type: ignore[call-arg]
