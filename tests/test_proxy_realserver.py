"""The proxy on a real socket (uvicorn) in front of a scripted upstream on a real socket.

ASGITransport buffers whole bodies, so these are the tests that can see buffering, disconnects and crashes.
"""

import asyncio
import threading
import time

import httpx
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from proxy.app import create_app
from proxy.settings import load_settings
from tests.plugins.recorded import fixture_bytes, sse_pieces

PIECES = sse_pieces(fixture_bytes("chat_stream_k20.sse"))
MSG = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "stream": True}


class ScriptedUpstream:
    """A streaming upstream whose pace the test controls."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.release = threading.Event()
        self.closed = threading.Event()
        self.closed_at: float | None = None
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request: Request) -> StreamingResponse:
        await request.body()

        async def gen():
            try:
                yield PIECES[0]
                yield PIECES[1]
                if self.mode == "hold":
                    while not self.release.is_set():
                        await asyncio.sleep(0.01)
                    for p in PIECES[2:]:
                        yield p
                elif self.mode == "forever":
                    i = 2
                    while True:
                        await asyncio.sleep(0.05)
                        yield PIECES[2 + (i % 20)]
                        i += 1
                elif self.mode == "crash":
                    yield PIECES[2]
                    raise RuntimeError("upstream process died")
            finally:
                self.closed_at = time.monotonic()
                self.closed.set()

        return StreamingResponse(gen(), media_type="text/event-stream")


def proxy_app(upstream_url: str):
    return create_app(load_settings({"upstream": upstream_url, "audit.enabled": False}, environ={}), components=())


def test_first_chunk_reaches_the_client_before_the_upstream_sends_the_last(serve):
    up = ScriptedUpstream("hold")
    with serve(up.app) as up_url, serve(proxy_app(up_url)) as proxy_url:
        with httpx.stream("POST", f"{proxy_url}/v1/chat/completions", json=MSG, timeout=10) as r:
            assert r.status_code == 200
            it = r.iter_raw()
            first = next(it)
            assert not up.release.is_set()  # the upstream is still holding back the rest
            assert b"chat.completion.chunk" in first
            up.release.set()
            rest = b"".join(it)
    assert rest.rstrip().endswith(b"data: [DONE]")


def test_client_disconnect_cancels_the_upstream_request(serve):
    """The upstream streams forever: its generator closing at all is the proxy cancelling it."""
    up = ScriptedUpstream("forever")
    with serve(up.app) as up_url, serve(proxy_app(up_url)) as proxy_url:
        with httpx.stream("POST", f"{proxy_url}/v1/chat/completions", json=MSG, timeout=10) as r:
            it = r.iter_raw()
            next(it)
            next(it)
        assert up.closed.wait(30), "upstream stream was never closed"


def test_upstream_dying_midstream_ends_with_one_error_event_and_done(serve):
    up = ScriptedUpstream("crash")
    with serve(up.app) as up_url, serve(proxy_app(up_url)) as proxy_url:
        r = httpx.post(f"{proxy_url}/v1/chat/completions", json=MSG, timeout=10)
        blocks = [b for b in r.content.split(b"\n\n") if b]
        assert blocks[-1] == b"data: [DONE]"
        err = orjson.loads(blocks[-2][6:])["error"]
        assert err["code"] == "upstream_unavailable"
        # the proxy is healthy afterwards: the next request goes through
        up.mode = "hold"
        up.release.set()
        r2 = httpx.post(f"{proxy_url}/v1/chat/completions", json=MSG, timeout=10)
        assert r2.content.rstrip().endswith(b"data: [DONE]") and b'"error"' not in r2.content
