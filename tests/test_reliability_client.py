"""Client-side faults: disconnects (mid-stream and before the upstream answered), a slow reader, half-sent bodies,
bodies over ``max_body_bytes``. All on real sockets: the proxy under uvicorn, raw sockets where httpx would hide
what a misbehaving client does."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

import proxy.service as service
from tests.fakes.fault_upstream import FaultUpstream
from tests.plugins.recorded import fixture_bytes, sse_pieces
from tests.plugins.reliability_support import CHAT, RunningProxy, chat_body, running_proxy, sample

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def fake() -> Iterator[FaultUpstream]:
    with FaultUpstream(tokens=400, stall_s=20) as f:
        yield f


@pytest.fixture(scope="module")
def proxy(fake: FaultUpstream) -> Iterator[RunningProxy]:
    with running_proxy(fake.url, timeout_s=15, max_body_bytes=LIMIT) as p:
        assert p.client.post(CHAT, json=chat_body(stream=True, max_tokens=4)).status_code == 200
        p.settle()
        p.baseline_tasks = p.spy.tasks()
        yield p


def _closed(m: str) -> float:
    return sample(m, "entropy_proxy_requests_total", model="smollm2", endpoint="chat", status="499")


@pytest.mark.parametrize("mode", ["slow-50", "stall-mid"])
def test_disconnect_mid_stream_cancels_upstream_and_is_counted(
        proxy: RunningProxy, fake: FaultUpstream, mode: str) -> None:
    """The upstream would go on for 20 s (400 tokens 50 ms apart, or a stall): its connection closed by the proxy
    while it still had to answer is the proof of cancellation (the wait below only bounds a hang)."""
    before = _closed(proxy.metrics())
    with httpx.stream("POST", proxy.url + CHAT, json=chat_body(stream=True), headers={"X-Fault": mode},
                      timeout=10) as r:
        it = r.iter_raw()
        assert b"chat.completion.chunk" in next(it)
    assert fake.wait_closed(-1, 15.0), "the upstream stream was never closed"
    rec = fake.requests[-1]
    assert rec.closed_by_client  # closed while the fake had not finished answering
    deadline = time.monotonic() + 2
    while _closed(proxy.metrics()) - before < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _closed(proxy.metrics()) - before == 1
    tasks, busy = proxy.settle()
    assert busy == 0 and tasks <= proxy.baseline_tasks


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_before_the_upstream_answered_cancels_it(
        proxy: RunningProxy, fake: FaultUpstream, stream: bool) -> None:
    before = _closed(proxy.metrics())
    n0 = len(fake.requests)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(proxy.url + CHAT, json=chat_body(stream=stream), headers={"X-Fault": "hang"}, timeout=0.5)
    # the fake hangs for 20 s: a close before that, by the proxy, is the cancellation
    assert len(fake.requests) == n0 + 1 and fake.wait_closed(-1, 15.0)
    assert fake.requests[-1].closed_by_client
    deadline = time.monotonic() + 2
    while _closed(proxy.metrics()) - before < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _closed(proxy.metrics()) - before == 1
    tasks, busy = proxy.settle()
    assert busy == 0 and tasks <= proxy.baseline_tasks


class FloodUpstream:
    """Streams ``total`` bytes of SSE comments (cheap for the proxy to pass on) then one chunk and [DONE],
    awaiting drain after every write, and counts what it managed to hand to the kernel."""

    def __init__(self, total: int, piece: int = 64 * 1024) -> None:
        self.total, self.piece, self.sent = total, piece, 0
        self.done = threading.Event()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            srv = self.loop.run_until_complete(asyncio.start_server(self.serve, "127.0.0.1", 0))
            self.port = srv.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()
            srv.close()
            tasks = asyncio.all_tasks(self.loop)
            for t in tasks:
                t.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, srv.wait_closed(), return_exceptions=True))
            self.loop.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(5)
        self.url = f"http://127.0.0.1:{self.port}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                     b"connection: close\r\n\r\n")
        pieces = sse_pieces(fixture_bytes("chat_stream_k20.sse"))
        comment = b": " + b"x" * (self.piece - 4) + b"\n\n"
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            for p in [pieces[0]] + [comment] * (self.total // self.piece) + pieces[1:]:
                writer.write(b"%x\r\n%s\r\n" % (len(p), p))
                await writer.drain()
                self.sent += len(p)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        self.done.set()
        writer.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_slow_reader_gets_back_pressure_the_proxy_stops_reading_upstream() -> None:
    total = 96 * 1024 * 1024
    up = FloodUpstream(total)
    try:
        with running_proxy(up.url, timeout_s=30) as p:
            host, port = p.url.removeprefix("http://").split(":")
            body = orjson.dumps(chat_body(stream=True))
            with socket.create_connection((host, int(port))) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                s.sendall(b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                          b"content-length: %d\r\n\r\n%s" % (CHAT.encode(), len(body), body))
                got = len(s.recv(65536))
                # Wait for the upstream to stop (it stalls once the proxy stops reading it, however slow the machine);
                # then the quantity it managed to send, not a time, tells whether back-pressure reached it.
                stalled_at, deadline = -1, time.monotonic() + 120
                while up.sent != stalled_at and not up.done.is_set() and time.monotonic() < deadline:
                    stalled_at = up.sent
                    time.sleep(0.5)
                assert not up.done.is_set(), "the proxy read the whole upstream while the client did not read"
                in_flight = stalled_at - got
                assert stalled_at < total / 2 and in_flight < 40 * 1024 * 1024, (stalled_at, got)
                # the reader resumes: everything arrives, ending with [DONE]
                tail = b""
                s.settimeout(30)
                received = got
                while True:
                    chunk = s.recv(1 << 20)
                    if not chunk:
                        break
                    received += len(chunk)
                    tail = (tail + chunk)[-256:]
                    if b"data: [DONE]\n\n" in tail:
                        break
            assert b"data: [DONE]" in tail and received > total
            print(f"\nslow reader: upstream stalled after {stalled_at / 2**20:.1f} MiB of {total / 2**20:.0f} MiB; "
                  f"{in_flight / 2**20:.1f} MiB in kernel and proxy buffers")
            p.settle()
    finally:
        up.stop()


def _raw(url: str, head: bytes, body: bytes = b"", close_write: bool = False, timeout: float = 5) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head + body)
        if close_write:
            s.shutdown(socket.SHUT_WR)
        out = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while b"\r\n\r\n" not in out or len(out) < out.index(b"\r\n\r\n") + 4 + _length(out):
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        return out


def _length(resp: bytes) -> int:
    for ln in resp.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if ln.lower().startswith(b"content-length:"):
            return int(ln.split(b":")[1])
    return 0


def _head(length: int | None) -> bytes:
    size = b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length
    return b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n%s\r\n\r\n" % size


def test_half_sent_body_then_close_is_counted_and_never_forwarded(proxy: RunningProxy, fake: FaultUpstream) -> None:
    n0, before = len(fake.requests), proxy.metrics()
    _raw(proxy.url, _head(1000), b'{"model": "smollm2", "mess', close_write=True)
    deadline = time.monotonic() + 2
    key = "entropy_proxy_requests_total"
    while sample(proxy.metrics(), key, endpoint="chat", status="499", model="other") == sample(
            before, key, endpoint="chat", status="499", model="other") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sample(proxy.metrics(), key, endpoint="chat", status="499", model="other") - sample(
        before, key, endpoint="chat", status="499", model="other") == 1
    assert len(fake.requests) == n0
    assert proxy.client.post(CHAT, json=chat_body(max_tokens=3)).status_code == 200


def test_half_sent_body_then_silence_gets_408(proxy: RunningProxy, fake: FaultUpstream,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "BODY_TIMEOUT_S", 0.5)
    n0 = len(fake.requests)
    # the client keeps the connection open and silent: only the proxy's body timeout can produce an answer
    resp = _raw(proxy.url, _head(1000), b'{"model": "smollm2", "mess', timeout=30)
    assert resp.startswith(b"HTTP/1.1 408"), resp[:100]
    err = orjson.loads(resp.split(b"\r\n\r\n", 1)[1])["error"]
    assert err["code"] == "request_timeout" and set(err) == {"message", "type", "param", "code"}
    assert len(fake.requests) == n0


def test_declared_length_over_the_limit_is_413_before_the_body_is_sent(proxy: RunningProxy,
                                                                       fake: FaultUpstream) -> None:
    n0 = len(fake.requests)
    # 10x the limit declared, 19 bytes sent, the connection kept open: the answer can only come from the header
    resp = _raw(proxy.url, _head(10 * LIMIT), b'{"model": "smollm2"', timeout=30)
    assert resp.startswith(b"HTTP/1.1 413"), resp[:100]
    assert orjson.loads(resp.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"
    assert len(fake.requests) == n0


def test_chunked_body_is_cut_off_at_the_limit(proxy: RunningProxy, fake: FaultUpstream) -> None:
    """No content-length: the proxy counts as it reads and answers 413 as soon as the limit is passed, while the
    client still has body to send: it offers 1,000 times the limit and keeps offering until an answer comes, so
    the 413 arriving with most of it unsent is the proof, however slow the machine."""
    n0 = len(fake.requests)
    host, port = proxy.url.removeprefix("http://").split(":")
    piece = b"x" * 16384
    supply = 1000 * LIMIT
    sent = 0
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(_head(None))
        s.setblocking(False)
        resp = b""
        deadline = time.monotonic() + 60  # bounds a hang only
        pending = b""  # the rest of a chunk the socket did not take: chunks stay whole however the writes split
        while b"\r\n\r\n" not in resp and time.monotonic() < deadline:
            if not pending and sent < supply:
                pending = b"%x\r\n%s\r\n" % (len(piece), piece)
                sent += len(piece)
            try:
                if pending:
                    pending = pending[s.send(pending):]
            except BlockingIOError:
                pass
            except ConnectionError:  # the proxy answered and closed: stop offering, read what it said
                pending, supply = b"", sent
            try:
                data = s.recv(65536)
            except BlockingIOError:
                data = None
            except ConnectionError:
                break
            if data == b"":
                break
            resp += data or b""
            time.sleep(0.005)
    assert resp.startswith(b"HTTP/1.1 413"), resp[:100]
    assert LIMIT < sent < 100 * LIMIT  # answered while the client still had most of its body to send
    assert len(fake.requests) == n0
    assert proxy.client.post(CHAT, json=chat_body(max_tokens=3)).status_code == 200
