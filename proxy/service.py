"""Chat and completions through the upstream: force logprobs, annotate, give back what the client asked for.

Non-streaming: one upstream call (plus at most one retry, see below), the body annotated choice by choice.
Streaming: the upstream's SSE bytes are decoded event by event and every event is forwarded as soon as it is
complete — nothing is held back except the very first event, which is read before the client's response starts
so that a refusal of K can still be retried.

Retry (once, before anything reached the client): when the upstream rejects K with vLLM's
"greater than max allowed: N" (a 400, or an error event first in a 200 stream) the proxy remembers N for this
upstream and sends the request again with K = N — unless the client itself asked for more than N, in which case
the upstream's answer is the client's to see. When the upstream rejects logprobs altogether, the request is sent
again as the client wrote it and the response passes through with ``"entropy": null``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import anyio
import httpx
import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from .annotate import Annotator, ResponseAnnotator
from .errors import BadRequest, BodyTooLarge, UpstreamBadResponse, UpstreamError, UpstreamUnavailable, sse_error_event
from .observe import ObserverHub, RequestEvent
from .rewrite import ClientAsk, dumps, force_logprobs, parse_request, upstream_k
from .sse import SSEDecoder, SSEEvent
from .upstream import Upstream, error_message, map_exception, max_allowed, request_headers, response_headers

log = logging.getLogger("entropy_proxy.service")

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"The request body is larger than the limit of {limit} bytes.")
            parts.append(chunk)
    except ClientDisconnect:
        raise BadRequest("The client closed the connection before the body was complete.") from None
    return b"".join(parts)


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

    async def handle(self, request: Request, endpoint: str) -> Response:
        t0 = perf_counter()
        raw = await read_body(request, self.settings.max_body_bytes)
        body, ask = parse_request(raw, endpoint, request.headers)
        call = _Call(ask=ask, t0=t0)
        headers = request_headers(request.headers.items(), self.settings, annotated=True)
        try:
            if ask.stream:
                return await self._stream(body, call, headers)
            return await self._unary(body, call, headers)
        except UpstreamError as e:
            call.upstream_error = e.kind
            self._done(call, e.status)
            raise

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
            self.upstream.learn_max(n)
            log.warning("upstream allows at most %d logprobs; using K=%d from now on", n, self.upstream.k)
            return self._upstream_body(body, call)
        if _rejects_logprobs(err):
            ask.forced = False
            return body
        return None

    def _upstream_body(self, body: dict[str, Any], call: _Call) -> dict[str, Any]:
        k = self.upstream.k
        call.k_sent = upstream_k(call.ask, k)
        return force_logprobs(body, call.ask, k)

    # -- non-streaming -------------------------------------------------------------------------------------------
    async def _unary(self, body: dict[str, Any], call: _Call, headers: dict[str, str]) -> Response:
        path = PATHS[call.ask.endpoint]
        send = self._upstream_body(body, call)
        for attempt in (0, 1):
            t = perf_counter()
            try:
                resp = await self.upstream.client.post(path, content=dumps(send), headers=headers)
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
        obj = _safe_json(resp.content)
        if not isinstance(obj, dict):
            raise UpstreamBadResponse("The upstream answered 200 with a body that is not a JSON object.")
        ra = ResponseAnnotator(self.annotator, call.ask, call.k_sent, call.ask.model or str(obj.get("model", "")))
        ra.annotate_body(obj)
        out_headers = response_headers(resp.headers, keep_length=False)
        out_headers.update(self._entropy_headers(ra))
        content = dumps(obj)
        self._finish(ra, call, 200)
        return Response(content, status_code=200, headers=out_headers, media_type="application/json")

    def _pass_error(self, status: int, content: bytes, headers: httpx.Headers, call: _Call) -> Response:
        call.upstream_error = "status_5xx" if status >= 500 else "status_4xx"
        self._done(call, status)
        return Response(content, status_code=status, headers=response_headers(headers, keep_length=False))

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
    async def _stream(self, body: dict[str, Any], call: _Call, headers: dict[str, str]) -> Response:
        path = PATHS[call.ask.endpoint]
        send = self._upstream_body(body, call)
        client = self.upstream.client
        for attempt in (0, 1):
            t = perf_counter()
            try:
                resp = await client.send(client.build_request("POST", path, content=dumps(send), headers=headers),
                                         stream=True)
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
            except httpx.HTTPError as e:
                raise map_exception(e) from None
            finally:
                call.upstream_s += perf_counter() - t
            first = _safe_json(head[-1].data) if head and head[-1].data else None
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
        return StreamingResponse(self._relay(resp, chunks, decoder, head, eof, ra, call), headers=out_headers,
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
        self, resp: httpx.Response, chunks: AsyncIterator[bytes], decoder: SSEDecoder, head: list[SSEEvent],
        eof: bool, ra: ResponseAnnotator, call: _Call,
    ) -> AsyncIterator[bytes]:
        state = {"done": False}
        failure: UpstreamError | None = None
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
                    out = b"".join(self._event(ev, ra, call, state) for ev in events) if events else b""
                    call.proxy_s += perf_counter() - t
                    if out:
                        yield out
                tail = decoder.flush()
                if tail:
                    out = b"".join(self._event(ev, ra, call, state) for ev in tail)
                    if out:
                        yield out
            if not state["done"]:
                failure = UpstreamUnavailable("The upstream closed the stream before it finished.")
        except httpx.HTTPError as e:
            failure = map_exception(e)
        finally:
            with anyio.CancelScope(shield=True):
                await resp.aclose()
        if failure is not None:
            call.upstream_error = "stream"
            log.warning("stream from upstream failed midway: %s", failure.message)
            yield sse_error_event(failure) + DONE
        self._finish(ra, call, 200)

    def _event(self, ev: SSEEvent, ra: ResponseAnnotator, call: _Call, state: dict[str, bool]) -> bytes:
        data = ev.data
        if data is None:
            return ev.raw  # comments such as ": keep-alive" pass as they came
        if data == b"[DONE]":
            state["done"] = True
            return ev.raw
        obj = _safe_json(data)
        if not isinstance(obj, dict):
            return ev.raw
        if "choices" not in obj:
            if "error" in obj:
                call.upstream_error = "stream"
            return ev.raw  # usage-only chunks and the like
        ra.annotate_chunk(obj)
        return b"data: " + dumps(obj) + b"\n\n"

    # -- accounting ----------------------------------------------------------------------------------------------
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
