"""A lean HTTP/1.1 client for the annotated routes' upstream calls: asyncio protocols and httptools' C parser.

httpx/httpcore/h11 cost about 95 µs of CPU per streamed event read from a vLLM-shaped upstream and about 1 ms a
204 kB non-streaming body; this client 14 µs and 0.1 ms (docs/benchmarks.md §3, "The upstream reader"). It does
what the proxy's two annotated calls need and nothing else: a POST with a body to a plain ``http://`` upstream,
keep-alive connections pooled per client, the response's status and headers, then either the whole body
(:meth:`H1Response.aread`) or its pieces as they arrive (:meth:`H1Response.aiter_raw`). Anything else (HTTPS,
an HTTP proxy from the environment, an injected test transport, the pass-through routes, the background
sampler) stays on httpx: :func:`lean_client_for` says when this client applies.

Its failures are httpx's exception types (``ConnectError``, ``ConnectTimeout``, ``ReadTimeout``,
``RemoteProtocolError``, ``ReadError``), so the service maps them to the same OpenAI-shaped errors as before.
Timeouts are httpx's: ``connect`` for opening a connection, ``read`` for the wait for each next piece.

Back-pressure: once more than ``HIGH_WATER`` bytes wait unread (a slow client), the socket stops being read until
the reader has taken them; the memory a response holds is bounded by that, not by the upstream's speed.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
import zlib
from collections import deque
from collections.abc import AsyncIterator, Mapping
from urllib.parse import urlsplit

import httptools
import httpx

from . import switched_off

__all__ = ["H1Client", "H1Response", "lean_client_for"]

HIGH_WATER = 1 << 20  # bytes read but not yet taken by the reader, above which the socket is paused


def lean_client_for(base_url: str, *, timeout: float | None, connect_timeout: float | None,
                    max_keepalive: int = 256, keepalive_expiry: float = 30.0) -> H1Client | None:
    """The lean client for ``base_url``, or None where httpx must do it: not ``http://``, or an HTTP proxy set in
    the environment for that host (httpx honours those), or ``ENTROPY_PROXY_HOTPATH=off``/
    ``ENTROPY_PROXY_LEAN_UPSTREAM=off``."""
    if switched_off("ENTROPY_PROXY_HOTPATH") or switched_off("ENTROPY_PROXY_LEAN_UPSTREAM"):
        return None
    parts = urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname:
        return None
    proxies = urllib.request.getproxies_environment()
    if (proxies.get("http") or proxies.get("all")) and not urllib.request.proxy_bypass_environment(
            parts.hostname, proxies):
        return None
    return H1Client(parts.hostname, parts.port or 80, parts.path.rstrip("/"), timeout=timeout,
                    connect_timeout=connect_timeout, max_keepalive=max_keepalive, keepalive_expiry=keepalive_expiry)


class _Conn(asyncio.Protocol):
    """One keep-alive connection and the response being read on it (httptools calls the ``on_*`` methods)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.received = 0  # bytes of this response seen on the socket
        self.framed = False  # content-length or chunked: the end of the body is known without EOF
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.error: Exception | None = None
        self.waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.complete:  # bytes after a finished response: nothing was asked, so the connection is unusable
            self.lost = True
            if self.transport is not None:
                self.transport.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # pragma: no cover - never asked for
            self._fail(httpx.RemoteProtocolError("The upstream switched protocols."))
        except httptools.HttpParserError as e:
            self._fail(httpx.RemoteProtocolError(f"The upstream's response is not valid HTTP/1.1 ({e})."))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.complete and self.error is None:
            if self.headers_done and not self.framed:
                self.complete = True  # a body delimited by the end of the connection
            elif self.received == 0:
                self.error = httpx.RemoteProtocolError("Server disconnected without sending a response.")
            else:
                self.error = httpx.ReadError("The upstream closed the connection before the response was complete.")
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport

    # -- httptools callbacks -------------------------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self.framed = any(
            n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self.raw_headers
        )
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # asked here: the parser forgets it once this returns
        self._wake()

    # -- the reader's side ---------------------------------------------------------------------------------------
    def _fail(self, exc: Exception) -> None:
        self.error = exc
        self.lost = True
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self, timeout: float | None) -> None:
        """Until something new arrives (headers, a piece of body, the end, a failure) or ``timeout`` passes."""
        fut = self.loop.create_future()
        self.waiter = fut
        timer = self.loop.call_later(timeout, _expire, fut) if timeout is not None else None
        try:
            await fut
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

    def take(self) -> bytes:
        """Every piece of body received so far, as one ``bytes`` (pieces that arrived together go out together)."""
        chunks = self.chunks
        out = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return out

    def reusable(self, now: float, expiry: float) -> bool:
        return (not self.lost and self.transport is not None and not self.transport.is_closing()
                and now - self.idle_since < expiry)

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(httpx.ReadTimeout("The upstream did not send anything in time."))


class H1Response:
    """The upstream's answer: ``status_code`` and ``headers`` at once, the body by :meth:`aread` or
    :meth:`aiter_raw`. Always :meth:`aclose` it: a connection whose response was read to the end goes back to
    the pool, any other is closed (which is also how the upstream learns that the client went away)."""

    def __init__(self, client: H1Client, conn: _Conn) -> None:
        self._client = client
        self._conn: _Conn | None = conn
        self.status_code: int = conn.parser.get_status_code()
        self.headers = httpx.Headers(conn.raw_headers)
        self._content: bytes | None = None

    @property
    def content(self) -> bytes:
        if self._content is None:
            raise RuntimeError("H1Response.content before aread()")
        return self._content

    async def aread(self) -> bytes:
        if self._content is not None:
            return self._content
        parts = [piece async for piece in self.aiter_raw()]
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        self._content = _decode(body, self.headers.get("content-encoding"))
        return self._content

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (transfer coding removed, content coding kept, like httpx's)."""
        conn = self._conn
        if conn is None:
            return
        timeout = self._client.timeout
        while True:
            if conn.chunks:
                yield conn.take()
                continue
            if conn.error is not None:
                raise conn.error
            if conn.complete:
                break
            await conn.wait(timeout)
        await self.aclose()

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.complete and conn.keep_alive and not conn.chunks and conn.error is None:
            self._client._release(conn)
        else:
            conn.close()


def _decode(body: bytes, encoding: str | None) -> bytes:
    """Undo a content coding the upstream applied although it was asked for ``identity`` (httpx does the same)."""
    enc = (encoding or "identity").strip().lower()
    try:
        if enc == "gzip":
            return zlib.decompress(body, 16 + zlib.MAX_WBITS)
        if enc == "deflate":
            try:
                return zlib.decompress(body)
            except zlib.error:
                return zlib.decompress(body, -zlib.MAX_WBITS)
    except zlib.error as e:
        raise httpx.DecodingError(f"The upstream's {enc} body could not be decoded ({e}).") from None
    if enc not in ("identity", ""):
        raise httpx.DecodingError(f"The upstream answered in the content coding {enc!r}, which the proxy cannot read.")
    return body


class H1Client:
    """Keep-alive connections to one ``host:port`` (LIFO, at most ``max_keepalive`` idle, each for at most
    ``keepalive_expiry`` seconds) and the POSTs sent over them."""

    def __init__(self, host: str, port: int, prefix: str = "", *, timeout: float | None,
                 connect_timeout: float | None, max_keepalive: int = 256, keepalive_expiry: float = 30.0) -> None:
        self.host, self.port, self.prefix = host, port, prefix
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.max_keepalive, self.keepalive_expiry = max_keepalive, keepalive_expiry
        self._host_header = (host if port == 80 else f"{host}:{port}").encode("ascii")
        if ":" in host:  # an IPv6 literal
            self._host_header = (f"[{host}]" if port == 80 else f"[{host}]:{port}").encode("ascii")
        self._idle: list[_Conn] = []
        self._closed = False

    async def post(self, path: str, content: bytes, headers: Mapping[str, str]) -> H1Response:
        """Send the request and wait for the response's status line and headers."""
        head = [b"POST ", (self.prefix + path).encode("ascii"), b" HTTP/1.1\r\nHost: ", self._host_header,
                b"\r\nContent-Length: ", str(len(content)).encode("ascii"), b"\r\n"]
        for k, v in headers.items():
            head += (k.encode("latin-1"), b": ", v.encode("latin-1"), b"\r\n")
        head.append(b"\r\n")
        data = b"".join(head) + content
        while True:
            conn, reused = await self._connection()
            assert conn.transport is not None
            conn.transport.write(data)
            try:
                while not conn.headers_done:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait(self.timeout)
            except httpx.RemoteProtocolError:
                conn.close()
                if reused and conn.received == 0:
                    continue  # a pooled connection the upstream had closed meanwhile: once more on a fresh one
                raise
            except BaseException:
                conn.close()
                raise
            return H1Response(self, conn)

    async def _connection(self) -> tuple[_Conn, bool]:
        if self._closed:
            raise httpx.ConnectError("The upstream client is closed.")
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable(now, self.keepalive_expiry):
                conn._reset()
                return conn, True
            conn.close()
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Conn(loop), self.host, self.port), self.connect_timeout)
        except TimeoutError:
            raise httpx.ConnectTimeout("The upstream did not accept the connection in time.") from None
        except OSError as e:
            raise httpx.ConnectError(str(e) or type(e).__name__) from None
        return conn, False

    def _release(self, conn: _Conn) -> None:
        if self._closed or len(self._idle) >= self.max_keepalive or conn.lost:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
