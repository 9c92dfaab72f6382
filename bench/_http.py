"""A minimal HTTP/1.1 server (asyncio protocol + httptools) for the benchmark upstream.

The handler is a plain function ``(method, path, body) -> Reply`` that returns pre-serialised bytes; replies
without pacing are written from the parser callback itself, so a request costs no task, no ASGI scope and no
header objects. Keep-alive, pipelining (answered in order), chunked streams and write back-pressure (for paced
streams) are handled; nothing else of HTTP is needed by the clients that talk to it (httpx, aiohttp).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools

_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 500: b"Internal Server Error"}


@dataclass
class Reply:
    """What to send. ``parts`` are SSE events when ``stream`` (each its own HTTP chunk when paced)."""

    status: int
    content_type: bytes
    parts: list[bytes] = field(default_factory=list)
    stream: bool = False
    delay_s: float = 0.0  # pause before each paced group of stream parts
    pre_delay_s: float = 0.0  # pause before a non-streaming answer (its generation time)
    head_parts: int = 0  # parts sent at once before the first paced group (chat's role chunks)
    paced: int = 0  # how many parts after those are paced (the token events)
    group: int = 1  # parts per pacing step (n choices)


Handler = Callable[[str, str, bytes], Reply]


def _head(reply: Reply, keep: bool, length: int | None) -> bytes:
    reason = _REASONS.get(reply.status, b"Status")
    lines = [b"HTTP/1.1 %d %s" % (reply.status, reason), b"server: replay-upstream",
             b"content-type: " + reply.content_type]
    lines.append(b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length)
    if not keep:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


class _Conn(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.srv = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.queue: deque[tuple[str, str, bytes, bool]] = deque()
        self.busy = False
        self.closed = False
        self._resume: asyncio.Event | None = None
        self._url = b""
        self._body: list[bytes] = []

    # -- transport callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass
        self.srv.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.srv.conns.discard(self)
        if self._resume is not None:
            self._resume.set()

    def pause_writing(self) -> None:
        self._resume = asyncio.Event()

    def resume_writing(self) -> None:
        if self._resume is not None:
            self._resume.set()
            self._resume = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()

    # -- parser callbacks
    def on_message_begin(self) -> None:
        self._url, self._body = b"", []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        req = (self.parser.get_method().decode(), self._url.decode("latin-1"), b"".join(self._body),
               self.parser.should_keep_alive())
        if self.busy:
            self.queue.append(req)
        else:
            self._dispatch(req)

    # -- answering
    def _dispatch(self, req: tuple[str, str, bytes, bool]) -> None:
        method, url, body, keep = req
        try:
            reply = self.srv.handler(method, url, body)
        except Exception as exc:  # a bug in the handler must not look like a hung upstream
            reply = Reply(500, b"text/plain", [f"replay handler failed: {exc!r}".encode()])
        if reply.delay_s > 0 or reply.pre_delay_s > 0:
            self.busy = True
            task = asyncio.get_running_loop().create_task(self._send_paced(reply, keep))
            self.srv.tasks.add(task)
            task.add_done_callback(self._paced_done)
        else:
            self._send(reply, keep)

    def _send(self, reply: Reply, keep: bool) -> None:
        assert self.transport is not None
        if self.closed:
            return
        body = b"".join(reply.parts)
        if reply.stream:
            self.transport.writelines([_head(reply, keep, None), b"%x\r\n" % len(body), body, b"\r\n0\r\n\r\n"])
        else:
            self.transport.writelines([_head(reply, keep, len(body)), body])
        if not keep:
            self.transport.close()

    async def _send_paced(self, reply: Reply, keep: bool) -> None:
        assert self.transport is not None
        if reply.pre_delay_s > 0:
            await asyncio.sleep(reply.pre_delay_s)
        if not reply.stream or reply.delay_s <= 0:
            self._send(reply, keep)
            return
        if self.closed:
            return
        self.transport.write(_head(reply, keep, None))
        first_paced = reply.head_parts + reply.group  # the first token comes with the role chunk
        for i, part in enumerate(reply.parts):
            if first_paced <= i < reply.head_parts + reply.paced and (i - reply.head_parts) % reply.group == 0:
                await asyncio.sleep(reply.delay_s)
            if self.closed:
                return
            self.transport.write(b"%x\r\n%s\r\n" % (len(part), part))
            if self._resume is not None:
                await self._resume.wait()
        if not self.closed:
            self.transport.write(b"0\r\n\r\n")
            if not keep:
                self.transport.close()

    def _paced_done(self, task: asyncio.Task[None]) -> None:
        self.srv.tasks.discard(task)
        self.busy = False
        while self.queue and not self.busy and not self.closed:
            self._dispatch(self.queue.popleft())


class HttpServer:
    """Serve ``handler`` with :meth:`serve_forever` (CLI) or :meth:`start_in_thread` / :meth:`stop` (tests)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.conns: set[_Conn] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def serve_forever(self, host: str, port: int) -> None:
        self.loop = asyncio.get_running_loop()
        server = await self.loop.create_server(lambda: _Conn(self), host, port, backlog=2048)
        async with server:
            await server.serve_forever()

    def start_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> str:
        ready = threading.Event()
        box: dict[str, object] = {}

        def run() -> None:
            loop = self.loop = asyncio.new_event_loop()
            try:
                server = loop.run_until_complete(
                    loop.create_server(lambda: _Conn(self), host, port, backlog=2048))
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
                box["error"] = exc
                loop.close()
                ready.set()
                return
            box["port"] = server.sockets[0].getsockname()[1]
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._shutdown(server))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="replay-upstream", daemon=True)
        self._thread.start()
        ready.wait(10)
        if "error" in box:
            raise RuntimeError(f"replay upstream could not listen on {host}:{port}") from box["error"]  # type: ignore[arg-type]
        return f"http://{host}:{box['port']}"

    async def _shutdown(self, server: asyncio.Server) -> None:
        server.close()
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.abort()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.sleep(0)  # let connection_lost run for the aborted transports
        await server.wait_closed()

    def stop(self) -> None:
        loop, thread = self.loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
