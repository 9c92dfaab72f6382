"""A pure ASGI middleware that gives every chat/completions request its trace identity and collects, without
parsing anything while the response is under way, what its span will say.

On the way in: the client's ``traceparent`` (if any) is read, a span id is drawn, and the request's
``traceparent`` header is replaced by one naming that span, so that ``request_headers`` forwards it and the
upstream's own spans (vLLM's ``--otlp-traces-endpoint``) join the trace as children of the proxy's span.
While the request runs: request-body pieces, the first response chunk, a chunk that carries ``usage`` and the
time of the first chunk are kept by reference; the observer (below) adds the request's Observations and its
RequestEvent, found through a context variable that the service's tasks inherit.
After the last byte went to the client: the span is built and ended (``Tracing.finish``) and handed to the
SDK's batch processor; nothing of it delays the response.

The response names the span in a ``traceresponse`` header (W3C Trace Context Level 2): a client that sends it back
as ``traceparent`` with its feedback gets the feedback span into the response's trace even where this process no
longer knows the response (a restart, another worker or replica).

``POST /v1/feedback`` answers are watched too: a 200 becomes an evaluation span in the labelled response's
trace (``Tracing.evaluation``).
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import traceparent

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from ..observe import Observation, RequestEvent
    from .spans import Tracing

log = logging.getLogger("entropy_proxy.otel")

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
FEEDBACK_PATH = "/v1/feedback"
MAX_KEPT_BODY = 1024 * 1024  # request bytes kept for the span's request attributes; past this only the model
USAGE_MARK = b'"usage"'


@dataclass(slots=True)
class RequestRecord:
    endpoint: str
    start_ns: int
    t0: float
    trace_id: int
    span_id: int
    parent: tuple[int, int, int] | None
    tracestate: str | None
    sampled: bool
    body: list[bytes] = field(default_factory=list)
    body_size: int = 0
    status: int = 0
    streamed: bool = False
    first_chunk_s: float | None = None
    head: bytes = b""  # the first non-empty response chunk
    usage_chunk: bytes = b""  # the last chunk that named usage (a stream's usage chunk comes last)
    response: list[bytes] = field(default_factory=list)  # non-streaming: the whole body
    observations: list[Observation] = field(default_factory=list)
    event: RequestEvent | None = None
    error: str | None = None
    end_ns: int = 0


current: ContextVar[RequestRecord | None] = ContextVar("entropy_proxy_otel_request", default=None)


class RecordObserver:
    """Registered on the ObserverHub: hands the request's observations to the record of the request they
    belong to (the context variable), so the span can carry one evaluation per choice."""

    def observe(self, obs: Observation) -> None:
        rec = current.get()
        if rec is not None and rec.sampled:
            rec.observations.append(obs)

    def request_done(self, ev: RequestEvent) -> None:
        rec = current.get()
        if rec is not None:
            rec.event = ev


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k.lower() == name:
            return str(v.decode("latin-1"))
    return None


class OtelMiddleware:
    def __init__(self, app: ASGIApp, tracing: Tracing) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        endpoint = ENDPOINTS.get(scope["path"])
        if endpoint is not None:
            await self._traced(endpoint, scope, receive, send)
        elif scope["path"] == FEEDBACK_PATH:
            await self._feedback(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _traced(self, endpoint: str, scope: Scope, receive: Receive, send: Send) -> None:
        start_ns = time.time_ns()
        t0 = time.perf_counter()
        parent = traceparent.parse(_header(scope, b"traceparent"))
        trace_id = parent[0] if parent is not None else traceparent.new_trace_id()
        span_id = traceparent.new_span_id()
        tracestate = _header(scope, b"tracestate") if parent is not None else None
        sampled = self.tracing.should_sample(parent, tracestate, trace_id, endpoint)
        rec = RequestRecord(endpoint, start_ns, t0, trace_id, span_id, parent, tracestate, sampled)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"traceparent"]
        own = traceparent.format(trace_id, span_id, sampled).encode()
        headers.append((b"traceparent", own))
        scope = {**scope, "headers": headers}

        async def receive_kept() -> Message:
            msg = await receive()
            if msg["type"] == "http.request" and sampled:
                chunk = msg.get("body", b"")
                if chunk and rec.body_size < MAX_KEPT_BODY:
                    rec.body.append(chunk)
                rec.body_size += len(chunk)
            return msg

        async def send_seen(msg: Message) -> None:
            kind = msg["type"]
            if kind == "http.response.body":
                chunk = msg.get("body", b"")
                if chunk and sampled:
                    if not rec.head:
                        rec.head = chunk
                        rec.first_chunk_s = time.perf_counter() - t0
                    if rec.streamed:
                        if USAGE_MARK in chunk:
                            rec.usage_chunk = chunk
                    else:
                        rec.response.append(chunk)
            elif kind == "http.response.start":
                rec.status = msg["status"]
                for k, v in msg.get("headers", ()):
                    if k.lower() == b"content-type":
                        rec.streamed = v.startswith(b"text/event-stream")
                if sampled:
                    msg = {**msg, "headers": [*msg.get("headers", ()), (b"traceresponse", own)]}
            await send(msg)

        token = current.set(rec)
        try:
            await self.app(scope, receive_kept, send_seen)
        except BaseException as e:
            rec.error = type(e).__name__
            if not rec.status:
                rec.status = 500
            raise
        finally:
            current.reset(token)
            rec.end_ns = time.time_ns()
            if sampled:
                self.tracing.finish(rec)

    async def _feedback(self, scope: Scope, receive: Receive, send: Send) -> None:
        seen: dict[str, Any] = {"status": 0, "body": []}

        async def send_seen(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                seen["status"] = msg["status"]
            elif msg["type"] == "http.response.body" and seen["status"] == 200:
                seen["body"].append(msg.get("body", b""))
            await send(msg)

        start_ns = time.time_ns()
        await self.app(scope, receive, send_seen)
        if seen["status"] == 200:
            self.tracing.feedback(b"".join(seen["body"]), traceparent.parse(_header(scope, b"traceparent")),
                                  start_ns)
