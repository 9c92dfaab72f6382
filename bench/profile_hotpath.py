"""Where the proxy's own CPU goes, per request: the whole app in one process under cProfile.

The app (every component: metrics, monitors, audit) runs in-process and is driven through raw ASGI calls; the
upstream is the replaying upstream's ``Replayer`` behind ``httpx.MockTransport`` (no sockets), so the profile holds
the proxy's code and its framework (Starlette, httpx) only. Reports CPU time per request and the functions that
take the most of it (cumulative and own time).

    python -m bench.profile_hotpath --mode unary --requests 300
    python -m bench.profile_hotpath --mode stream --requests 100 --top 25
    ENTROPY_PROXY_HOTPATH=off python -m bench.profile_hotpath --groups   # the careful path, for before/after

The profiler's clock is the main thread's CPU time (``time.thread_time``): the monitors' text worker thread is
not in it (time its jobs with the monitors' own tests or a stand-alone run), and waiting is never counted.
``--groups`` sums each function's own time by component (proxy modules, estimator, json, httpx, Starlette...).
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


async def _call(app: Any, body: bytes, on_send: Any = None) -> tuple[int, bytes]:
    """One request through the ASGI app; ``on_send(message)`` sees every message the app sends."""
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
        if on_send is not None:
            await on_send(msg)
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
        prof = cProfile.Profile(time.thread_time)
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
    if args.groups:
        s.write(groups(st, args.requests))
        return s.getvalue()
    st.sort_stats("cumulative").print_stats(args.top)
    st.sort_stats("tottime").print_stats(args.top)
    return s.getvalue()


_GROUPS = (  # first match wins: (substring of the file path, component)
    ("proxy/hotpath/h1", "proxy: upstream client (h1)"), ("uvicorn", "uvicorn"),
    ("proxy/hotpath", "proxy: fast path (decode, splice)"), ("proxy/logprobs", "proxy: positions"),
    ("monitors/entropy", "estimator (monitors/entropy.py)"), ("proxy/monitoring", "monitors, request path"),
    ("monitors/", "monitors, request path"), ("proxy/metrics", "metrics"), ("prometheus_client", "metrics"),
    ("proxy/audit", "audit"), ("sqlalchemy", "audit"), ("aiosqlite", "audit"),
    ("proxy/", "proxy: other (service, annotate, sse, observers)"), ("httpx", "httpx/httpcore/h11"),
    ("httpcore", "httpx/httpcore/h11"), ("h11", "httpx/httpcore/h11"), ("starlette", "starlette/fastapi"),
    ("fastapi", "starlette/fastapi"), ("numpy", "numpy"), ("asyncio", "asyncio/anyio"), ("anyio", "asyncio/anyio"),
    ("bench/", "harness (mock upstream, ASGI driver)"),
)


def groups(st: pstats.Stats, requests: int, skip_suspended: bool = False) -> str:
    """Own time per component, per request. ``skip_suspended``: leave out entries whose own time exceeds their
    cumulative time (coroutines that were suspended for long, e.g. a lifespan, whose wait cProfile counts as their
    own when they are resumed; wall-clock profiles of a server only)."""
    acc: dict[str, float] = {}
    for (path, _line, name), (_cc, _nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        if skip_suspended and tt > ct + 1e-3:
            continue
        if path == "~":  # a C function: by what it is
            g = ("json (orjson, msgspec)" if any(x in name for x in ("orjson", "msgspec", "Decoder"))
                 else "numpy" if "numpy" in name else "builtins (C calls)")
        else:
            g = next((label for key, label in _GROUPS if key in path), "other")
        acc[g] = acc.get(g, 0.0) + tt
    total = sum(acc.values())
    lines = [f"  {g:<52} {v / requests * 1e3:6.2f} ms  {v / total * 100:5.1f}%"
             for g, v in sorted(acc.items(), key=lambda x: -x[1])]
    lines.append(f"  {'total, main thread (profiler on)':<52} {total / requests * 1e3:6.2f} ms")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_hotpath", description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("unary", "stream"), default="unary")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--groups", action="store_true", help="own time by component instead of the function lists")
    args = ap.parse_args(argv)
    print(asyncio.run(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
