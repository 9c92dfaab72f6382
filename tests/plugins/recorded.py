"""A fake vLLM for fast unit tests: answers with the recorded vLLM 0.32 bodies, remembers what it was sent.

Used through ``httpx.MockTransport`` (no sockets) and ``httpx.ASGITransport`` on the proxy side. Real vLLM,
real sockets and fault injection have their own tiers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from proxy.app import create_app
from proxy.settings import load_settings

FIX = Path(__file__).parent.parent / "fixtures" / "vllm"
UPSTREAM = "http://upstream.test"


def fixture_bytes(name: str) -> bytes:
    return (FIX / name).read_bytes()


class Chunks(httpx.AsyncByteStream):
    """A response body delivered in the given pieces, like a socket would (MockTransport reads plain content
    eagerly, which a proxy that streams cannot use)."""

    def __init__(self, pieces: list[bytes], error: Exception | None = None) -> None:
        self.pieces = pieces
        self.error = error

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for p in self.pieces:
            yield p
        if self.error is not None:
            raise self.error


def sse_pieces(data: bytes) -> list[bytes]:
    """Split an SSE body into one piece per event (vLLM writes one event per network write)."""
    return [e + b"\n\n" for e in data.split(b"\n\n") if e]


class RecordedUpstream:
    """``handler(request) -> httpx.Response`` for MockTransport. ``routes`` maps path to a responder."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any] | None, httpx.Headers]] = []
        self.routes: dict[str, Callable[[dict[str, Any] | None], httpx.Response]] = {}

    def serve(self, path: str, name: str | None = None, *, status: int = 200, body: bytes | None = None,
              stream: bool | None = None) -> None:
        data = body if body is not None else fixture_bytes(name or "")
        is_sse = stream if stream is not None else (name or "").endswith(".sse")
        ctype = "text/event-stream; charset=utf-8" if is_sse else "application/json"

        def respond(_: dict[str, Any] | None) -> httpx.Response:
            pieces = sse_pieces(data) if is_sse else [data]
            return httpx.Response(status, stream=Chunks(pieces), headers={"content-type": ctype})

        self.routes[path] = respond

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content) if request.content else None
        self.requests.append((request.url.path, body, request.headers))
        responder = self.routes.get(request.url.path)
        if responder is None:
            err = {"error": {"message": "not here", "type": "NotFoundError", "param": None, "code": 404}}
            return httpx.Response(404, stream=Chunks([orjson.dumps(err)]),
                                  headers={"content-type": "application/json"})
        return responder(body)

    @property
    def last_body(self) -> dict[str, Any] | None:
        return self.requests[-1][1]


@asynccontextmanager
async def proxy_client(
    upstream: Any, components: tuple[str, ...] = (), **settings: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to a proxy app whose upstream is ``upstream`` (a MockTransport handler).

    ``components`` defaults to none: the core alone; pass ``proxy.app.COMPONENTS`` for the whole proxy."""
    s = load_settings({"upstream": UPSTREAM, "audit.enabled": False, "models": ["smollm2"], **settings}, environ={})
    app = create_app(s, transport=httpx.MockTransport(upstream), components=components)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy.test") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


@pytest.fixture
def recorded() -> RecordedUpstream:
    return RecordedUpstream()
