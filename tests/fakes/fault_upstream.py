"""An in-process vLLM-shaped upstream that misbehaves on request, for the proxy's fault tests.

A mode is chosen per request by the header ``X-Fault: <mode>`` or the model name ``fault-<mode>``, else the
server's ``default_mode``. Healthy answers come from :class:`bench.replay_upstream.Replayer` (recorded vLLM
positions, K honoured), so a fault differs from a good answer only by the fault. Every request is recorded
(:attr:`FaultUpstream.requests`) with its parsed body and, for the modes that hold a connection open, whether
and when the client closed it. Raw asyncio streams, so faults can be placed at any byte.

Modes (stream = the request had ``"stream": true``):

========================  ======================================================================================
``ok``                    a normal answer (keep-alive)
``reset``                 the connection is aborted without a response
``hang``                  the request is read and never answered, until the client goes or ``stall_s`` passes
``stall``                 status line and headers, then nothing (``stall-mid``: stream role + 2 chunks, then nothing)
``slow`` / ``slow-<ms>``  a stream paced at 50 ms (or ``<ms>``) per chunk
``status-<code>``         that status with an OpenAI-shaped error body (``5xx`` = ``status-500``)
``malformed-json``        200 ``application/json`` whose body is not JSON
``truncated``             ``content-length`` promises the whole body, half is sent, then the socket closes
``cut-mid-chunk``         stream: 3 events, then half of an HTTP chunk, then the socket closes
``cut-mid-event``         stream: 3 events, then half an SSE event, then a clean end of the chunked body
``stream-error``          stream: 3 events, then vLLM's ``data: {"error": ...}`` event and ``data: [DONE]``
``drop-logprobs``         ``logprobs: null`` although they were asked for
``null-logprobs``         some ``logprob`` values are ``null`` (vLLM's stream form of NaN)
``nan-logprobs``          some ``logprob`` values are the bare token ``NaN`` (not JSON; Python's json writes it)
``positive-logprobs``     every logprob shifted by +15 (a ``raw_logits`` server)
``fallback``              positions 1 and 2 are vLLM fallback entries (-9999.0 and ``[]``; streamed: no keys)
``multi-token``           stream: 3 tokens per chunk
``empty-delta``           stream: chunks with ``delta: {}`` that carry logprobs (tool-call control tokens)
``keep-alive``            stream: ``: keep-alive`` comments between events
``crlf``                  stream: events framed with CRLF
``max-logprobs-<n>``      the server's ``--max-logprobs`` is n: vLLM's 400, or its 200 stream with an error event
========================  ======================================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from bench.replay_upstream import Replayer
from tests.fakes.mutations import dumps, events_of, mutate_body, stream_events

_REASON = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout"}
_PARAM_MODE = re.compile(r"^(status|slow|max-logprobs)-(\d+)$")


@dataclass
class Recorded:
    """One request as the fake saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    mode: str
    json: Any = None
    received_at: float = field(default_factory=time.monotonic)
    closed_by_client: bool = False  # the client closed the connection before the fake had finished answering
    closed_at: float | None = None
    finished: bool = False
    closed_event: threading.Event = field(default_factory=threading.Event, repr=False)


def closed_port_url() -> str:
    """A URL on which nothing listens: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class FaultUpstream:
    """Run with ``with FaultUpstream() as fake: ... fake.url ...`` (base URL without ``/v1``)."""

    def __init__(self, default_mode: str = "ok", tokens: int = 8, stall_s: float = 30.0) -> None:
        self.default_mode, self.tokens, self.stall_s = default_mode, tokens, stall_s
        self.requests: list[Recorded] = []
        self.url = ""
        self._replayers: dict[tuple[str, int], Replayer] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> FaultUpstream:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> FaultUpstream:
        ready = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            server = loop.run_until_complete(asyncio.start_server(self._serve_conn, "127.0.0.1", 0))
            box["port"] = server.sockets[0].getsockname()[1]
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._shutdown(server))
                loop.close()

        self._thread = threading.Thread(target=run, name="fault-upstream", daemon=True)
        self._thread.start()
        ready.wait(10)
        self.url = f"http://127.0.0.1:{box['port']}"
        return self

    async def _shutdown(self, server: asyncio.Server) -> None:
        server.close()
        for w in list(self._writers):
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    # ------------------------------------------------------------------ inspection
    def bodies(self) -> list[Any]:
        """The parsed JSON body of every request received so far."""
        return [r.json for r in self.requests]

    def wait_closed(self, index: int = -1, timeout: float = 2.0) -> bool:
        """Wait until the client closed the connection of request ``index``; True if it did in time."""
        return self.requests[index].closed_event.wait(timeout)

    # ------------------------------------------------------------------ serving
    async def _serve_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        self._writers.add(writer)
        try:
            while True:
                rec = await self._read_request(reader)
                if rec is None:
                    break
                self.requests.append(rec)
                keep = await self._answer(rec, reader, writer)
                rec.finished = True
                if not keep:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)  # type: ignore[arg-type]
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_request(self, reader: asyncio.StreamReader) -> Recorded | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int((await reader.readuntil(b"\r\n")).strip() or b"0", 16):
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            await reader.readuntil(b"\r\n")
            body = b"".join(parts)
        else:
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        mode = headers.get("x-fault", "")
        model = parsed.get("model") if isinstance(parsed, dict) else None
        if not mode and isinstance(model, str) and model.startswith("fault-"):
            mode = model[len("fault-"):]
        return Recorded(method, path, headers, body, mode or self.default_mode, parsed)

    def _replayer(self, model: str, max_logprobs: int) -> Replayer:
        key = (model, max_logprobs)
        if key not in self._replayers:
            self._replayers[key] = Replayer(tokens=self.tokens, model=model, max_logprobs=max_logprobs)
        return self._replayers[key]

    def _healthy(self, rec: Recorded, max_logprobs: int = 20, drop_logprobs: bool = False) -> tuple[int, bytes]:
        req = dict(rec.json) if isinstance(rec.json, dict) else {}
        if drop_logprobs:
            req.pop("logprobs", None)
            req.pop("top_logprobs", None)
        replayer = self._replayer(str(req.get("model", "smollm2")), max_logprobs)
        if rec.method == "GET" or not rec.path.startswith("/v1/") or not isinstance(rec.json, dict):
            reply = replayer.handle(rec.method, rec.path, rec.body)
        else:
            reply = replayer.completion(rec.path.endswith("/chat/completions"), dumps(req))
        return reply.status, b"".join(reply.parts)

    def _watch_close(self, rec: Recorded, reader: asyncio.StreamReader) -> asyncio.Task[None]:
        async def watch() -> None:
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):
                    pass
            rec.closed_by_client, rec.closed_at = not rec.finished, time.monotonic()
            rec.closed_event.set()

        return asyncio.get_running_loop().create_task(watch())

    async def _answer(self, rec: Recorded, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        mode = {"5xx": "status-500", "slow": "slow-50"}.get(rec.mode, rec.mode)
        m = _PARAM_MODE.match(mode)
        stream = isinstance(rec.json, dict) and bool(rec.json.get("stream"))
        if mode == "reset":
            writer.transport.abort()
            return False
        if mode == "hang" or mode.startswith("stall"):
            watcher = self._watch_close(rec, reader)
            if mode != "hang":
                status, body = self._healthy(rec)
                if stream:
                    self._head(writer, status, "text/event-stream; charset=utf-8", None)
                    if mode == "stall-mid":
                        for ev in body.split(b"\n\n")[:3]:
                            self._chunk(writer, ev + b"\n\n")
                else:
                    self._head(writer, status, "application/json", len(body))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(watcher), self.stall_s)
            watcher.cancel()
            return False
        if m and m.group(1) == "status":
            code = int(m.group(2))
            err = {"error": {"message": f"injected upstream failure {code}", "type": "InternalServerError",
                             "param": None, "code": code}}
            self._send(writer, code, "application/json", dumps(err), keep=False)
            return False
        if mode == "malformed-json":
            self._send(writer, 200, "application/json", b'{"id":"chatcmpl-bad","choices":[{"index":0,"messa',
                       keep=False)
            return False
        status, body = self._healthy(rec, max_logprobs=int(m.group(2)) if m and m.group(1) == "max-logprobs"
                                     else 20, drop_logprobs=mode == "drop-logprobs")
        if mode == "truncated":
            self._head(writer, status, "application/json", len(body))
            writer.write(body[: len(body) // 2])
            await writer.drain()
            writer.transport.abort()
            return False
        if not stream or status != 200:
            self._send(writer, status, "application/json", mutate_body(mode, body), keep=mode == "ok")
            return mode == "ok"
        return await self._stream(rec, mode, m, body, reader, writer)

    async def _stream(self, rec: Recorded, mode: str, m: re.Match[str] | None, body: bytes,
                      reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        events = stream_events(mode, events_of(body))
        delay = int(m.group(2)) / 1000.0 if m and m.group(1) == "slow" else 0.0
        watcher = self._watch_close(rec, reader) if delay else None
        self._head(writer, 200, "text/event-stream; charset=utf-8", None, keep=mode == "ok")
        sep = b"\r\n\r\n" if mode == "crlf" else b"\n\n"
        for i, ev in enumerate(events):
            if mode in ("cut-mid-chunk", "cut-mid-event", "stream-error") and i == 3:
                if mode == "cut-mid-chunk":
                    piece = b"data: " + ev + sep
                    writer.write(b"%x\r\n" % len(piece) + piece[: len(piece) // 2])
                    await writer.drain()
                    writer.transport.abort()
                    return False
                if mode == "cut-mid-event":
                    self._chunk(writer, (b"data: " + ev)[: len(ev) // 2])
                else:
                    err = {"error": {"message": "injected failure mid-stream", "type": "InternalServerError",
                                     "param": None, "code": 500}}
                    self._chunk(writer, b"data: " + json.dumps(err).encode() + b"\n\n")
                    self._chunk(writer, b"data: [DONE]\n\n")
                break
            if ev.startswith(b":"):
                self._chunk(writer, ev + sep)
            else:
                self._chunk(writer, b"data: " + ev + sep)
            if delay:
                await writer.drain()
                await asyncio.sleep(delay)
                if watcher is not None and watcher.done():
                    return False
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        if watcher is not None:
            rec.finished = True
            watcher.cancel()
        return mode == "ok"

    # ------------------------------------------------------------------ bytes on the wire
    @staticmethod
    def _head(writer: asyncio.StreamWriter, status: int, ctype: str, length: int | None, keep: bool = False) -> None:
        lines = [f"HTTP/1.1 {status} {_REASON.get(status, 'Status')}", f"content-type: {ctype}",
                 "transfer-encoding: chunked" if length is None else f"content-length: {length}"]
        if not keep:
            lines.append("connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    @staticmethod
    def _chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _send(self, writer: asyncio.StreamWriter, status: int, ctype: str, body: bytes, keep: bool) -> None:
        self._head(writer, status, ctype, len(body), keep)
        writer.write(body)
