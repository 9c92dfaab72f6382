"""Chat and completions through the upstream: force logprobs, annotate, give back what the client asked for.

Non-streaming: one upstream call (plus at most one retry, see below), the body annotated choice by choice.
Streaming: the upstream's SSE bytes are decoded event by event and every event is forwarded as soon as it is
complete — nothing is held back except the very first event, which is read before the client's response starts
so that a refusal of K can still be retried.

A client that goes away is noticed at once (a watcher waits for the ASGI disconnect while the proxy waits on the
upstream; the stream relay is cancelled by the server): the upstream request is closed and the request is counted
with status 499 (nginx's "client closed request") in ``entropy_proxy_requests_total``.

Retry (once, before anything reached the client): when the upstream rejects K with vLLM's
"greater than max allowed: N" (a 400, or an error event first in a 200 stream) the proxy remembers N for this
upstream and sends the request again with K = N — unless the client itself asked for more than N, in which case
the upstream's answer is the client's to see. When the upstream rejects logprobs altogether, the request is sent
again as the client wrote it and the response passes through with ``"entropy": null``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import anyio
import httpx
import orjson
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from .annotate import Annotator, ResponseAnnotator
from .errors import (
    BodyTooLarge,
    ClientClosedRequest,
    ProxyError,
    RequestTimeout,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamUnavailable,
    normalise_error_body,
    sse_error_event,
)
from .hotpath import annotate_body_bytes, annotate_chunk_bytes, switched_off
from .hotpath.h1 import H1Response
from .observe import ObserverHub, RequestEvent
from .rewrite import ClientAsk, dumps, force_logprobs, parse_request, upstream_k
from .sse import SSEDecoder, SSEEvent
from .upstream import Upstream, error_message, map_exception, max_allowed, request_headers, response_headers

log = logging.getLogger("entropy_proxy.service")

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
CLIENT_CLOSED = 499
BODY_TIMEOUT_S = 30.0  # a client that stops sending its body half-way gets 408 after this long (slow loris)


async def read_body(request: Request, limit: int, timeout: float | None = None) -> bytes:
    """The request body, refusing (413) as soon as it is known to exceed ``limit`` bytes: a declared
    ``content-length`` over the limit is refused before one byte of the body is read."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S if timeout is None else timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(f"The request body is larger than the limit of {limit} bytes.")
                parts.append(chunk)
    except ClientDisconnect:
        raise ClientClosedRequest("The client closed the connection before the body was complete.") from None
    except TimeoutError:
        raise RequestTimeout("The request body did not arrive in time.") from None
    return b"".join(parts)


def _watch_disconnect(receive: Receive, scope: anyio.CancelScope) -> asyncio.Task[None]:
    """A task that cancels ``scope`` when the client disconnects; the caller cancels the task when done. One plain
    asyncio task instead of an anyio task group: 9 against 84 µs a request (docs/benchmarks.md §3)."""

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    return asyncio.ensure_future(watch())


class RelayResponse(StreamingResponse):
    """A StreamingResponse that stops as soon as the client disconnects (also while the relay waits on the
    upstream, when nothing is being sent) and always closes its body iterator, even when it was stopped while
    suspended at a ``yield``, so the upstream response is closed at once rather than whenever the generator is
    garbage-collected."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with anyio.CancelScope() as cancel:
            watcher = _watch_disconnect(receive, cancel)
            try:
                await self.stream_response(send)
            except OSError:  # the server's send to a closed connection (ASGI spec 2.4)
                raise ClientDisconnect() from None
            finally:
                watcher.cancel()
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    with anyio.CancelScope(shield=True):
                        await aclose()
        if self.background is not None:
            await self.background()


@dataclass(slots=True)
class _Call:
    """Book-keeping for one client request."""

    ask: ClientAsk
    t0: float
    upstream_s: float = 0.0
    k_sent: int = 0
    upstream_error: str | None = None
    proxy_s: float | None = None  # streams: measured piece by piece (the rest is upstream or client time)

    def overhead(self) -> float:
        if self.proxy_s is not None:
            return self.proxy_s
        return max(0.0, perf_counter() - self.t0 - self.upstream_s)


def _safe_json(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:  # the stdlib parser reads the bare NaN/Infinity that some Python servers write; they become null
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def _rejects_logprobs(obj: Any) -> bool:
    """An upstream error that refuses the logprobs fields themselves (an engine without them)."""
    if not isinstance(obj, dict):
        return False
    err = obj.get("error")
    param = err.get("param") if isinstance(err, dict) else None
    if param in ("logprobs", "top_logprobs"):
        return True
    msg = error_message(obj)
    return isinstance(msg, str) and "logprobs" in msg.lower() and max_allowed(msg) is None


class ProxyService:
    def __init__(self, upstream: Upstream, hub: ObserverHub, annotator: Annotator) -> None:
        self.upstream = upstream
        self.settings = upstream.settings
        self.hub = hub
        self.annotator = annotator
        # The fast path (proxy.hotpath) for chat bodies and chunks; off (ENTROPY_PROXY_HOTPATH=off, for A/B
        # benchmarks): everything takes the careful path.
        self.fast = not switched_off("ENTROPY_PROXY_HOTPATH")

    async def handle(self, request: Request, endpoint: str) -> Response:
        t0 = perf_counter()
        try:
            raw = await read_body(request, self.settings.max_body_bytes)
            body, ask = parse_request(raw, endpoint, request.headers)
        except ProxyError as e:  # counted too: a flood of bad requests shows in requests_total{status}
            self.hub.request_done(RequestEvent(model="", endpoint=endpoint, status=e.status,
                                               overhead_s=perf_counter() - t0))
            raise
        call = _Call(ask=ask, t0=t0)
        headers = request_headers(request.headers.items(), self.settings, annotated=True)
        try:
            work = self._stream if ask.stream else self._unary
            return await self._until_client_leaves(request, call, work, body, headers)
        except UpstreamError as e:
            call.upstream_error = e.kind
            self._done(call, e.status)
            raise

    async def _until_client_leaves(
        self, request: Request, call: _Call, work: Callable[..., Awaitable[Response]], *args: Any
    ) -> Response:
        """Run ``work`` (the wait for the upstream's answer) unless the client disconnects first; then the
        upstream request is cancelled (its connection closed) and the request counted as 499."""
        with anyio.CancelScope() as scope:
            watcher = _watch_disconnect(request.receive, scope)
            try:
                return await work(*args, call)
            finally:
                watcher.cancel()
        log.info("client went away before the upstream answered; upstream request cancelled")
        self._done(call, CLIENT_CLOSED)
        return Response(status_code=CLIENT_CLOSED)

    # -- retry decision shared by both paths ---------------------------------------------------------------------
    def _retry_body(self, err: Any, body: dict[str, Any], call: _Call) -> dict[str, Any] | None:
        """What to send on the one retry after the upstream refused ``err``; None: no retry, pass it on."""
        ask = call.ask
        if not ask.forced:
            return None
        n = max_allowed(error_message(err))
        if n is not None:
            if n >= call.k_sent or (ask.logprobs and (ask.top == -1 or ask.top > n)):
                return None  # not ours to fix: the client asked for more than the upstream allows
            self.upstream.learn_max(n, ask.endpoint)
            log.warning("upstream allows at most %d logprobs on %s; using K=%d from now on", n, ask.endpoint,
                        self.upstream.k_for(ask.endpoint))
            return self._upstream_body(body, call)
        if _rejects_logprobs(err):
            ask.forced = False
            return body
        return None

    def _upstream_body(self, body: dict[str, Any], call: _Call) -> dict[str, Any]:
        k = self.upstream.k_for(call.ask.endpoint)
        call.k_sent = upstream_k(call.ask, k)
        return force_logprobs(body, call.ask, k)

    # -- non-streaming -------------------------------------------------------------------------------------------
    async def _unary(self, body: dict[str, Any], headers: dict[str, str], call: _Call) -> Response:
        path = PATHS[call.ask.endpoint]
        send = self._upstream_body(body, call)
        for attempt in (0, 1):
            t = perf_counter()
            try:
                resp = await self.upstream.post(path, dumps(send), headers)
            except httpx.HTTPError as e:
                raise map_exception(e) from None
            finally:
                call.upstream_s += perf_counter() - t
            if resp.status_code == 200:
                break
            retry = self._retry_body(_safe_json(resp.content), body, call) if attempt == 0 else None
            if retry is None:
                return self._pass_error(resp.status_code, resp.content, resp.headers, call)
            send = retry
        fast = annotate_body_bytes(
            resp.content, call.ask, call.k_sent,
            lambda model: ResponseAnnotator(self.annotator, call.ask, call.k_sent, call.ask.model or str(model)),
        ) if self.fast else None
        if fast is not None:
            ra, content = fast
        else:
            obj = _safe_json(resp.content)
            if not isinstance(obj, dict):
                raise UpstreamBadResponse("The upstream answered 200 with a body that is not a JSON object.")
            ra = ResponseAnnotator(self.annotator, call.ask, call.k_sent,
                                   call.ask.model or str(obj.get("model", "")))
            ra.annotate_body(obj)
            content = dumps(obj)
        out_headers = response_headers(resp.headers, keep_length=False)
        out_headers.update(self._entropy_headers(ra))
        # The observers (metrics, monitors, audit, ...) run once the body is sent, in this same task: they add
        # nothing to the client's latency, and the overhead recorded is the request's own work up to here.
        call.proxy_s = max(0.0, perf_counter() - call.t0 - call.upstream_s)
        return Response(content, status_code=200, headers=out_headers, media_type="application/json",
                        background=BackgroundTask(self._finish_after, ra, call, 200))

    def _pass_error(self, status: int, content: bytes, headers: httpx.Headers, call: _Call) -> Response:
        call.upstream_error = "status_5xx" if status >= 500 else "status_4xx"
        self._done(call, status)
        out_headers = response_headers(headers, keep_length=False)
        fixed = normalise_error_body(content, status)
        if fixed is not None:  # another engine's error shape (or none): the OpenAI shape, the message kept
            content = fixed
            out_headers = {k: v for k, v in out_headers.items() if k.lower() != "content-type"}
            out_headers["content-type"] = "application/json"
        return Response(content, status_code=status, headers=out_headers)

    @staticmethod
    def _entropy_headers(ra: ResponseAnnotator) -> dict[str, str]:
        h = {"X-Entropy-Request-Id": ra.request_id}
        s = ra.first_summary
        if s is not None and s.get("mean") is not None:
            h["X-Entropy-Mean"] = str(s["mean"])
            h["X-Entropy-Confidence"] = str(s["confidence"])
            h["X-Entropy-Flags"] = ",".join(s["flags"])
        return h

    # -- streaming -----------------------------------------------------------------------------------------------
    async def _stream(self, body: dict[str, Any], headers: dict[str, str], call: _Call) -> Response:
        path = PATHS[call.ask.endpoint]
        send = self._upstream_body(body, call)
        for attempt in (0, 1):
            t = perf_counter()
            resp: httpx.Response | H1Response | None = None
            try:
                resp = await self.upstream.open_stream(path, dumps(send), headers)
                if resp.status_code != 200:
                    content = await resp.aread()
                    await resp.aclose()
                    retry = self._retry_body(_safe_json(content), body, call) if attempt == 0 else None
                    if retry is None:
                        return self._pass_error(resp.status_code, content, resp.headers, call)
                    send = retry
                    continue
                decoder = SSEDecoder()
                chunks = resp.aiter_raw()
                head, eof = await self._first_data_event(decoder, chunks)
                if eof and not any(ev.data is not None for ev in head):
                    raise UpstreamBadResponse("The upstream answered 200 but sent no stream event.")
            except BaseException as e:  # also cancellation (the client left): never leave the response open
                if resp is not None:
                    with anyio.CancelScope(shield=True):
                        await resp.aclose()
                if isinstance(e, httpx.HTTPError):
                    raise map_exception(e) from None
                raise
            finally:
                call.upstream_s += perf_counter() - t
            # The first data event decides a retry; one upstream write may hold more events after it (vLLM's
            # refusal of K comes as an error event and [DONE] together).
            first_data = next((ev.data for ev in head if ev.data is not None), None)
            first = _safe_json(first_data) if first_data else None
            if attempt == 0 and isinstance(first, dict) and "error" in first and "choices" not in first:
                retry = self._retry_body(first, body, call)
                if retry is not None:
                    await resp.aclose()
                    send = retry
                    continue
            break
        call.proxy_s = perf_counter() - call.t0 - call.upstream_s
        ra = ResponseAnnotator(self.annotator, call.ask, call.k_sent, call.ask.model)
        if isinstance(first, dict):
            ra.request_id = str(first.get("id") or "")
        out_headers = response_headers(resp.headers, keep_length=False)
        out_headers.update(SSE_HEADERS)
        if ra.request_id:
            out_headers["X-Entropy-Request-Id"] = ra.request_id
        return RelayResponse(self._relay(resp, chunks, decoder, head, eof, ra, call), headers=out_headers,
                             media_type=None)

    @staticmethod
    async def _first_data_event(decoder: SSEDecoder, chunks: AsyncIterator[bytes]) -> tuple[list[SSEEvent], bool]:
        head: list[SSEEvent] = []
        async for chunk in chunks:
            head.extend(decoder.decode(chunk))
            if any(ev.data is not None for ev in head):
                return head, False
        head.extend(decoder.flush())
        return head, True

    async def _relay(
        self, resp: httpx.Response | H1Response, chunks: AsyncIterator[bytes], decoder: SSEDecoder,
        head: list[SSEEvent], eof: bool, ra: ResponseAnnotator, call: _Call,
    ) -> AsyncIterator[bytes]:
        state = {"done": False, "error": False}
        failure: UpstreamError | None = None
        gone = False
        try:
            t = perf_counter()
            out = b"".join(self._event(ev, ra, call, state) for ev in head)
            call.proxy_s = (call.proxy_s or 0.0) + perf_counter() - t
            if out:
                yield out
            if not eof:
                async for chunk in chunks:
                    t = perf_counter()
                    events = decoder.decode(chunk)
                    if len(events) == 1:  # one event per upstream write: vLLM's usual stream
                        out = self._event(events[0], ra, call, state)
                    else:
                        out = b"".join([self._event(ev, ra, call, state) for ev in events])
                    call.proxy_s += perf_counter() - t
                    if out:
                        yield out
                out = b"".join(self._tail_event(ev, ra, call, state) for ev in decoder.flush())
                if out:
                    yield out
            if not state["done"]:
                failure = UpstreamUnavailable("The upstream closed the stream before it finished.")
        except httpx.HTTPError as e:
            failure = map_exception(e)
        except (anyio.get_cancelled_exc_class(), GeneratorExit):
            gone = True  # the client went away: the server cancelled or closed this generator
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await resp.aclose()
            if gone:
                log.info("client went away mid-stream; upstream stream closed")
                self._finish(ra, call, CLIENT_CLOSED)
        if failure is not None:
            call.upstream_error = "stream"
            log.warning("stream from upstream failed midway: %s", failure.message)
            # one error event only: when the upstream sent its own before it went, [DONE] is all that is missing
            yield DONE if state["error"] else sse_error_event(failure) + DONE
        self._finish(ra, call, 200)

    def _tail_event(self, ev: SSEEvent, ra: ResponseAnnotator, call: _Call, state: dict[str, bool]) -> bytes:
        """An event ended by end-of-file rather than a blank line. WHATWG discards it; a complete JSON payload
        is still worth passing on (terminated), a cut one is dropped so the error event after it stays intact."""
        if ev.data is None or (ev.data != b"[DONE]" and _safe_json(ev.data) is None):
            return b""
        out = self._event(ev, ra, call, state)
        return out if out.endswith((b"\n\n", b"\r\r", b"\r\n\r\n")) else out.rstrip(b"\r\n") + b"\n\n"

    def _event(self, ev: SSEEvent, ra: ResponseAnnotator, call: _Call, state: dict[str, bool]) -> bytes:
        data = ev.data
        if data is None:
            return ev.raw  # comments such as ": keep-alive" pass as they came
        if data == b"[DONE]":
            state["done"] = True
            return ev.raw
        if self.fast:
            out = annotate_chunk_bytes(data, ra)
            if out is not None:
                return out
        obj = _safe_json(data)
        if not isinstance(obj, dict):
            return ev.raw
        if "choices" not in obj:
            if "error" in obj:
                call.upstream_error = "stream"
                state["error"] = True
                if not isinstance(obj["error"], dict):  # TGI's {"error": str, "error_type": str}
                    return b"data: " + (normalise_error_body(data, 500) or data) + b"\n\n"
            return ev.raw  # usage-only chunks and the like
        ra.annotate_chunk(obj)
        return b"data: " + dumps(obj) + b"\n\n"

    # -- accounting ----------------------------------------------------------------------------------------------
    async def _finish_after(self, ra: ResponseAnnotator, call: _Call, status: int) -> None:
        self._finish(ra, call, status)  # async so that Starlette runs it inline, not in a thread

    def _finish(self, ra: ResponseAnnotator, call: _Call, status: int) -> None:
        for obs in ra.finished:
            self.hub.observe(obs)
        self._done(call, status, missing=ra.missing, impossible=ra.impossible)

    def _done(self, call: _Call, status: int, missing: int = 0, impossible: int = 0) -> None:
        self.hub.request_done(
            RequestEvent(
                model=call.ask.model, endpoint=call.ask.endpoint, status=status, overhead_s=call.overhead(),
                upstream_error=call.upstream_error, logprobs_missing=missing, impossible_logprobs=impossible,
            )
        )
