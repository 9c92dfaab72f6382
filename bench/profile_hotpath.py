"""Where the proxy's own CPU goes, per request: the whole app in one process under cProfile.

The app (every component: metrics, monitors, audit) runs in-process and is driven through raw ASGI calls; the
upstream is the replaying upstream's ``Replayer`` behind ``httpx.MockTransport`` (no sockets), so the profile holds
the proxy's code and its framework (Starlette, httpx) only. Reports CPU time per request and the functions that
take the most of it (cumulative and own time).

    python -m bench.profile_hotpath --mode unary --requests 300
    python -m bench.profile_hotpath --mode stream --requests 100 --top 25
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import pstats
import sys
import tempfile
import time
from typing import Any

import httpx
import orjson

from bench.replay_upstream import Replayer

CHAT = "/v1/chat/completions"


def _transport(rep: Replayer) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        reply = rep.handle(request.method, request.url.path, request.content)
        headers = {"content-type": reply.content_type.decode()}
        if reply.stream:
            parts = list(reply.parts)

            async def gen() -> Any:
                for p in parts:  # one upstream read per event, as vLLM writes them
                    yield p

            return httpx.Response(reply.status, headers=headers, stream=_Stream(gen()))
        return httpx.Response(reply.status, headers=headers, content=b"".join(reply.parts))

    return httpx.MockTransport(handler)


class _Stream(httpx.AsyncByteStream):
    def __init__(self, agen: Any) -> None:
        self.agen = agen

    async def __aiter__(self) -> Any:
        async for p in self.agen:
            yield p

    async def aclose(self) -> None:
        await self.agen.aclose()


async def _call(app: Any, body: bytes) -> tuple[int, bytes]:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": CHAT, "raw_path": CHAT.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8080)}
    sent = False
    finished = asyncio.Event()
    status = 0
    out: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        nonlocal status
        if msg["type"] == "http.response.start":
            status = msg["status"]
        elif msg["type"] == "http.response.body":
            out.append(msg.get("body", b""))
            if not msg.get("more_body"):
                finished.set()

    await app(scope, receive, send)
    return status, b"".join(out)


async def run(args: argparse.Namespace) -> str:
    from prometheus_client import CollectorRegistry

    from proxy.app import create_app
    from proxy.settings import Settings

    rep = Replayer(tokens=args.tokens)
    wd = tempfile.mkdtemp(prefix="profile-hotpath-")
    settings = Settings(upstream="http://upstream.invalid", models=["smollm2"], top_k=args.k,
                        audit={"url": f"sqlite:///{wd}/audit.db"})
    app = create_app(settings, registry=CollectorRegistry(), transport=_transport(rep))
    stream = args.mode == "stream"
    body = orjson.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "Tell me a story."}],
                         "max_tokens": args.tokens, "logprobs": True, "top_logprobs": args.k, "stream": stream})
    async with app.router.lifespan_context(app):
        for _ in range(20):
            status, out = await _call(app, body)
            assert status == 200, out[:300]
        gc.freeze()  # as `entropy-proxy serve` does after start-up
        prof = cProfile.Profile()
        cpu0, t0 = time.process_time(), time.perf_counter()
        prof.enable()
        for _ in range(args.requests):
            await _call(app, body)
        prof.disable()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
        await asyncio.sleep(0.2)
    s = io.StringIO()
    tokens = args.requests * args.tokens
    s.write(f"{args.mode}, {args.tokens} tokens, K={args.k}, {args.requests} requests: "
            f"{cpu / args.requests * 1e3:.2f} ms CPU a request ({wall / args.requests * 1e3:.2f} ms wall), "
            f"{tokens / cpu:,.0f} tokens per CPU-second (profiler on: read the shares, not the totals)\n")
    st = pstats.Stats(prof, stream=s)
    st.sort_stats("cumulative").print_stats(args.top)
    st.sort_stats("tottime").print_stats(args.top)
    return s.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_hotpath", description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("unary", "stream"), default="unary")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args(argv)
    print(asyncio.run(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
