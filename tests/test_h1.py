"""The lean upstream client (proxy/hotpath/h1.py) against real sockets: framing, keep-alive, failures, timeouts,
back-pressure, and when it stands aside for httpx. The proxy's fault tests (test_reliability_*.py, a real proxy in
front of tests/fakes/fault_upstream.py) run through it as well."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Awaitable, Callable

import httpx
import pytest

from proxy.hotpath import h1
from proxy.hotpath.h1 import H1Client, lean_client_for

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


class Server:
    """A scripted HTTP/1.1 server on 127.0.0.1: ``handler(reader, writer, n)`` answers request n (counted over
    all connections) and returns whether to keep the connection open for another."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed_by_peer = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.closed_by_peer.set()
                    return
                length = next((int(ln.split(b":")[1]) for ln in head.split(b"\r\n")
                               if ln.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                if not await self.handler(reader, writer, len(self.requests)):
                    return
        finally:
            writer.close()


def client(port: int, **kw: object) -> H1Client:
    opts: dict[str, object] = {"timeout": 5.0, "connect_timeout": 2.0}
    opts.update(kw)
    return H1Client("127.0.0.1", port, **opts)  # type: ignore[arg-type]


async def fetch(c: H1Client) -> bytes:
    resp = await c.post("/p", b"", {})
    try:
        return await resp.aread()
    finally:
        await resp.aclose()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body), extra, body)


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


async def test_post_sends_the_request_as_given_and_reads_the_whole_body():
    async def handler(r, w, n):
        w.write(ok(b'{"n":%d}' % n, b"x-one: a\r\nx-one: b\r\n"))
        await w.drain()
        return True

    async with Server(handler) as srv:
        c = client(srv.port)
        resp = await c.post("/v1/chat/completions", b'{"a":1}', {"Content-Type": "application/json", "X-Trace": "t"})
        assert resp.status_code == 200
        assert await resp.aread() == b'{"n":1}'
        assert resp.headers.get_list("x-one") == ["a", "b"]
        await resp.aclose()
        req = srv.requests[0]
        assert req.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert b"\r\nHost: 127.0.0.1:%d\r\n" % srv.port in req
        assert b"\r\nContent-Length: 7\r\n" in req and b"\r\nX-Trace: t\r\n" in req and req.endswith(b'{"a":1}')
        await c.aclose()


async def test_keep_alive_connections_are_reused_and_a_stale_one_is_replaced():
    async def handler(r, w, n):
        w.write(ok(b"{}"))
        await w.drain()
        return n != 2  # the server closes the connection after the second answer (its keep-alive ran out)

    async with Server(handler) as srv:
        c = client(srv.port)
        for _ in range(3):
            assert await fetch(c) == b"{}"
            await asyncio.sleep(0.05)
        assert srv.connections == 2  # requests 1 and 2 on one, 3 on a new one
        await c.aclose()


async def test_a_pooled_connection_closed_without_an_answer_is_retried_once_on_a_fresh_one():
    async def handler(r, w, n):
        if n == 2:
            return False  # read request 2 and close without a byte, as a server does when its keep-alive ends
        w.write(ok(b"{}"))
        await w.drain()
        return True

    async with Server(handler) as srv:
        c = client(srv.port)
        for _ in range(2):
            assert await fetch(c) == b"{}"
        assert len(srv.requests) == 3 and srv.connections == 2
        await c.aclose()


async def test_a_fresh_connection_closed_without_an_answer_fails_at_once():
    async def handler(r, w, n):
        return False

    async with Server(handler) as srv:
        c = client(srv.port)
        with pytest.raises(httpx.RemoteProtocolError):
            await c.post("/p", b"", {})
        assert len(srv.requests) == 1  # no retry: nothing shows the request was not taken
        await c.aclose()


async def test_stream_pieces_arrive_as_sent_and_the_connection_goes_back_to_the_pool():
    gate = asyncio.Event()

    async def handler(r, w, n):
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        w.write(b"%x\r\n%s\r\n" % (len(b"data: 1\n\n"), b"data: 1\n\n"))
        await w.drain()
        await gate.wait()
        w.write(chunked(b"data: 2\n\n", b"data: [DONE]\n\n"))
        await w.drain()
        return True

    async with Server(handler) as srv:
        c = client(srv.port)
        resp = await c.post("/p", b"", {})
        it = resp.aiter_raw()
        assert await it.__anext__() == b"data: 1\n\n"  # before the rest is sent: nothing is held back
        gate.set()
        rest = b"".join([p async for p in it])
        assert rest == b"data: 2\n\ndata: [DONE]\n\n"
        await resp.aclose()
        gate.clear()
        gate.set()
        resp = await c.post("/p", b"", {})
        assert b"".join([p async for p in resp.aiter_raw()]).endswith(b"[DONE]\n\n")
        await resp.aclose()
        assert srv.connections == 1
        await c.aclose()


async def test_closing_a_response_before_its_end_closes_the_connection():
    async def handler(r, w, n):
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await w.drain()
        if await r.read(1) == b"":  # until the client closes
            srv.closed_by_peer.set()
        return False

    srv: Server
    async with Server(handler) as srv:
        c = client(srv.port)
        resp = await c.post("/p", b"", {})
        assert await resp.aiter_raw().__anext__() == b"hello"
        await resp.aclose()
        await asyncio.wait_for(srv.closed_by_peer.wait(), 2)
        assert not c._idle
        await c.aclose()


async def test_read_timeout_between_pieces():
    async def handler(r, w, n):
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await w.drain()
        await asyncio.sleep(2)
        return False

    async with Server(handler) as srv:
        c = client(srv.port, timeout=0.3)
        resp = await c.post("/p", b"", {})
        pieces = []
        with pytest.raises(httpx.ReadTimeout):
            async for p in resp.aiter_raw():
                pieces.append(p)
        assert pieces == [b"hello"]
        await resp.aclose()
        await c.aclose()


async def test_read_timeout_waiting_for_the_headers():
    async def handler(r, w, n):
        await asyncio.sleep(2)
        return False

    async with Server(handler) as srv:
        c = client(srv.port, timeout=0.3)
        with pytest.raises(httpx.ReadTimeout):
            await c.post("/p", b"", {})
        await c.aclose()


async def test_a_truncated_body_is_a_read_error_and_a_refused_connection_a_connect_error():
    async def handler(r, w, n):
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 40)
        await w.drain()
        return False

    async with Server(handler) as srv:
        c = client(srv.port)
        resp = await c.post("/p", b"", {})
        with pytest.raises(httpx.ReadError):
            await resp.aread()
        await resp.aclose()
        await c.aclose()
        port = srv.port
    c = client(port)
    with pytest.raises(httpx.ConnectError):
        await c.post("/p", b"", {})
    await c.aclose()


async def test_invalid_http_is_a_protocol_error():
    async def handler(r, w, n):
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc")
        await w.drain()
        return False

    async with Server(handler) as srv:
        c = client(srv.port)
        with pytest.raises(httpx.RemoteProtocolError):
            resp = await c.post("/p", b"", {})
            await resp.aread()
        await c.aclose()


async def test_a_body_ended_by_the_connection_and_a_gzip_body_are_read():
    async def handler(r, w, n):
        if n == 1:
            w.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n{\"to\":\"eof\"}")
        else:
            z = gzip.compress(b'{"z":1}')
            w.write(b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n%s" % (len(z), z))
        await w.drain()
        return False

    async with Server(handler) as srv:
        c = client(srv.port)
        resp = await c.post("/p", b"", {})
        assert await resp.aread() == b'{"to":"eof"}'
        await resp.aclose()
        resp = await c.post("/p", b"", {})
        assert await resp.aread() == b'{"z":1}'
        await resp.aclose()
        await c.aclose()


async def test_a_reader_that_falls_behind_pauses_the_socket_and_memory_stays_bounded(monkeypatch):
    monkeypatch.setattr(h1, "HIGH_WATER", 64 * 1024)
    total = 8 << 20
    piece = b"y" * 65536

    async def handler(r, w, n):
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        for _ in range(total // len(piece)):
            w.write(piece)
            await w.drain()
        return True

    async with Server(handler) as srv:
        c = client(srv.port)
        resp = await c.post("/p", b"", {})
        conn = resp._conn
        await asyncio.sleep(0.5)  # the server writes as fast as it can; the client takes nothing meanwhile
        assert conn is not None and conn.paused
        held = conn.buffered
        assert held < 64 * 1024 + 4 * len(piece) + (1 << 20)  # the high-water mark plus what one read brings
        got = 0
        async for p in resp.aiter_raw():
            got += len(p)
        assert got == total
        await resp.aclose()
        assert c._idle  # read to the end: reusable
        await c.aclose()


def test_lean_client_stands_aside_where_httpx_must_do_it(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY",
                "ENTROPY_PROXY_HOTPATH", "ENTROPY_PROXY_LEAN_UPSTREAM"):
        monkeypatch.delenv(var, raising=False)
    kw = {"timeout": 1.0, "connect_timeout": 1.0}
    c = lean_client_for("http://vllm.internal:8000/base/", **kw)
    assert c is not None and (c.host, c.port, c.prefix) == ("vllm.internal", 8000, "/base")
    assert lean_client_for("https://api.example.com", **kw) is None
    monkeypatch.setenv("HTTP_PROXY", "http://squid:3128")
    assert lean_client_for("http://vllm.internal:8000", **kw) is None
    monkeypatch.setenv("NO_PROXY", "vllm.internal")
    assert lean_client_for("http://vllm.internal:8000", **kw) is not None
    monkeypatch.setenv("ENTROPY_PROXY_LEAN_UPSTREAM", "off")
    assert lean_client_for("http://vllm.internal:8000", **kw) is None
    monkeypatch.delenv("ENTROPY_PROXY_LEAN_UPSTREAM")
    monkeypatch.setenv("ENTROPY_PROXY_HOTPATH", "off")
    assert lean_client_for("http://vllm.internal:8000", **kw) is None


def test_the_service_uses_it_for_a_plain_http_upstream_and_httpx_for_an_injected_transport(monkeypatch):
    from proxy.settings import Settings
    from proxy.upstream import Upstream

    monkeypatch.delenv("ENTROPY_PROXY_HOTPATH", raising=False)
    monkeypatch.delenv("ENTROPY_PROXY_LEAN_UPSTREAM", raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    s = Settings(upstream="http://127.0.0.1:9")
    assert isinstance(Upstream(s).lean, H1Client)
    assert Upstream(s, transport=httpx.MockTransport(lambda r: httpx.Response(200))).lean is None
