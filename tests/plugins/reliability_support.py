"""Helpers (no tests here) shared by the reliability, security and engine tests: a proxy on a real socket whose
event loop the test can inspect (tasks, connection pool), Prometheus samples by name, SSE bodies as events."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import create_app
from proxy.settings import load_settings
from tests.plugins.servers import serve_in_thread

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def chat_body(**kw: Any) -> dict[str, Any]:
    return {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], **kw}


class LoopSpy:
    """ASGI wrapper that remembers the server's event loop, so a test thread can count its tasks."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.loop = asyncio.get_running_loop()
        await self.app(scope, receive, send)

    def tasks(self) -> int:
        """Tasks alive on the server's loop (this probe's own excluded)."""
        assert self.loop is not None

        async def count() -> int:
            return len(asyncio.all_tasks()) - 1

        return asyncio.run_coroutine_threadsafe(count(), self.loop).result(5)

    def busy_connections(self) -> int:
        """Upstream pool connections that are neither idle nor closed (a request is using them)."""
        pool = self.app.state.upstream.client._transport._pool
        return sum(1 for c in list(pool.connections) if not (c.is_idle() or c.is_closed()))


class RunningProxy:
    def __init__(self, spy: LoopSpy, url: str) -> None:
        self.spy, self.url = spy, url
        self.app = spy.app
        self.client = httpx.Client(base_url=url, timeout=20)
        self.baseline_tasks = 0

    def metrics(self) -> str:
        return self.client.get("/metrics").text

    def settle(self, timeout: float = 5.0) -> tuple[int, int]:
        """Wait until tasks are back to the baseline and no upstream connection is busy; return both counts."""
        deadline = time.monotonic() + timeout
        while True:
            tasks, busy = self.spy.tasks(), self.spy.busy_connections()
            if (tasks <= self.baseline_tasks and busy == 0) or time.monotonic() > deadline:
                return tasks, busy
            time.sleep(0.02)


@contextlib.contextmanager
def running_proxy(upstream: str, transport: httpx.AsyncBaseTransport | None = None,
                  **settings: Any) -> Iterator[RunningProxy]:
    """The whole proxy (default components; audit off unless asked) under uvicorn on 127.0.0.1."""
    s = load_settings({"upstream": upstream, "audit.enabled": False, "models": ["smollm2"], **settings}, environ={})
    spy = LoopSpy(create_app(s, transport=transport))
    with serve_in_thread(spy) as url:
        proxy = RunningProxy(spy, url)
        proxy.baseline_tasks = spy.tasks()
        try:
            yield proxy
        finally:
            proxy.client.close()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def series_count(text: str) -> int:
    return sum(len(fam.samples) for fam in text_string_to_metric_families(text))


def sse_events(body: bytes) -> list[Any]:
    """``data:`` payloads of complete events (CR/LF framing alike); "[DONE]" kept as a string; comments skipped."""
    body = body.replace(b"\r\n", b"\n")
    out: list[Any] = []
    for block in body.split(b"\n\n")[:-1]:
        data = b"\n".join(ln[6:] for ln in block.split(b"\n") if ln.startswith(b"data: "))
        if data:
            out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


def final_entropy(events: list[Any], index: int = 0) -> Any:
    """The ``entropy`` of the chunk that carries choice ``index``'s finish_reason (KeyError when none)."""
    for ev in events:
        if isinstance(ev, dict):
            for c in ev.get("choices") or []:
                if c.get("index") == index and c.get("finish_reason") is not None:
                    return c.get("entropy")
    raise KeyError("no finishing chunk")
