"""Where a request's time goes: the annotation's steps, the observers' share, and what the slowest requests overlap.

Three parts, each its own subcommand (all on the replaying upstream of ``bench.replay_upstream``):

``parts``     the fast path's steps on a recorded 128-token K=20 chat body and on one stream chunk, timed in a
              loop in this process (``gc.freeze()`` first, as ``serve`` does).
``variants``  sequential non-streaming requests through a real ``entropy-proxy serve``, started once per variant
              and round (rounds interleaved): as configured, audit off, the monitors' text work off, both off.
``trace``     the app in this process, sequential non-streaming requests over real sockets; for the slowest 3%
              it lists what overlapped each one: audit writer batches, the monitors' text jobs, garbage collections.
``start``     the app in this process, sequential paced streams over real sockets (30 ms apart, as a client
              that reads a stream and then sends the next): median times from the request's ASGI call to each
              step up to the first byte sent.
``profile``   ``entropy-proxy serve`` under cProfile (wall clock, main thread), ``--streams`` concurrent unpaced
              64-token streams for ``--requests`` each, then the own time by component per response; ``--rev``
              profiles the proxy at a git revision instead (before/after).

    python -m bench.request_path parts
    python -m bench.request_path variants [--rounds 3] [--requests 400]
    python -m bench.request_path trace [--requests 600]
    python -m bench.request_path start [--requests 60]
    python -m bench.request_path profile [--streams 16 --requests 60]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench import _targets
from bench._client import Connection
from bench.overhead import CHAT, body
from bench.profile_hotpath import _call
from bench.replay_upstream import Replayer


def _timed(name: str, f: Callable[[], Any], n: int) -> str:
    f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return f"  {name:<44} {(time.perf_counter() - t) / n * 1e6:9.1f} µs"


def parts() -> str:
    from proxy.annotate import Annotator, ResponseAnnotator
    from proxy.app import _thresholds
    from proxy.hotpath import splice
    from proxy.logprobs import chat_positions_typed
    from proxy.rewrite import parse_request
    from proxy.settings import Settings
    from proxy.sse import SSEDecoder

    rep = Replayer(tokens=128)
    s = Settings(upstream="http://upstream.invalid", models=["smollm2"])
    ann = Annotator(_thresholds(s), s.vocab_size, lambda m: 0.672, s.vocab_size_for)
    out = ["128-token K=20 chat body (204 kB), per call:"]
    req = body(False, 128)
    raw = b"".join(rep.handle("POST", CHAT, req).parts)
    _, ask = parse_request(req, "chat", {})
    gc.freeze()
    choices = splice._BODY.decode(raw)
    lp = choices.choices[0].logprobs
    content = splice._LOGPROBS.decode(lp).content
    pos = chat_positions_typed(content)
    assert pos is not None
    out += [
        _timed("annotate_body_bytes (all of the below)", lambda: splice.annotate_body_bytes(
            raw, ask, 20, lambda m: ResponseAnnotator(ann, ask, 20, "smollm2")), 300),
        _timed("  decode the choices, logprobs kept raw", lambda: splice._BODY.decode(raw), 300),
        _timed("  decode the logprobs into typed rows", lambda: splice._LOGPROBS.decode(lp), 300),
        _timed("  positions from the typed rows", lambda: chat_positions_typed(content), 300),
        _timed("  estimator", lambda: ann.estimate(pos, 49152), 300),
        _timed("  surrogate-escape check (one regex pass)", lambda: splice._SURROGATE.search(raw), 300),
    ]
    out.append("one stream chunk (one token, K=20), per call:")
    sreq = body(True, 128)
    events = rep._render(True, True, 20, 1, 128, False)
    chunk = events[5]
    ev = SSEDecoder().decode(chunk)[0]
    assert ev.data is not None
    _, sask = parse_request(sreq, "chat", {})
    ra = ResponseAnnotator(ann, sask, 20, "smollm2")
    dec = SSEDecoder()
    out += [
        _timed("SSE split", lambda: dec.decode(chunk), 5000),
        _timed("annotate_chunk_bytes (decode, positions, estimate, splice)",
               lambda: splice.annotate_chunk_bytes(ev.data, ra), 5000),
    ]
    return "\n".join(out)


VARIANTS = {
    "as configured": {},
    "audit off": {"ENTROPY_PROXY_AUDIT__ENABLED": "false"},
    "text work off": {"ENTROPY_PROXY_MONITORS__TEXT_WORK_SHARE": "0.000001"},
    "both off": {"ENTROPY_PROXY_AUDIT__ENABLED": "false", "ENTROPY_PROXY_MONITORS__TEXT_WORK_SHARE": "0.000001"},
}


async def _sequential(port: int, pid: int, n: int) -> tuple[float, float, float]:
    c = Connection("127.0.0.1", port)
    req = body(False, 128)
    for _ in range(50):
        await c.request("POST", CHAT, req)
    lat = []
    c0 = _targets.cpu_seconds(pid)
    for _ in range(n):
        r = await c.request("POST", CHAT, req)
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}")
        lat.append(r.latency)
    await c.close()
    lat.sort()
    return lat[n // 2] * 1e3, lat[int(n * 0.99)] * 1e3, (_targets.cpu_seconds(pid) - c0) / n * 1e3


def variants(rounds: int, requests: int) -> str:
    wd = _targets.workdir()
    up = _targets.start_upstream(wd, 128)
    res: dict[str, list[tuple[float, float, float]]] = {k: [] for k in VARIANTS}
    try:
        for r in range(rounds):
            for i, (name, env) in enumerate(VARIANTS.items()):
                t = _targets.start_proxy(wd, f"http://127.0.0.1:{up.port}", name=f"v{i}r{r}", env=env)
                try:
                    res[name].append(asyncio.run(_sequential(t.port, t.pid, requests)))
                finally:
                    t.stop()
    finally:
        up.stop()
    lines = [f"{requests} sequential 128-token K=20 non-streaming requests a round, {rounds} rounds "
             "(values per round)", f"  {'variant':<14} {'p50 ms':<24} {'p99 ms':<24} proxy CPU ms a request"]
    for name, rr in res.items():
        lines.append(f"  {name:<14} " + " ".join(f"{x[0]:5.2f}" for x in rr).ljust(24) + " "
                     + " ".join(f"{x[1]:5.1f}" for x in rr).ljust(24) + " " + " ".join(f"{x[2]:5.2f}" for x in rr))
    return "\n".join(lines)


async def _trace(requests: int, port: int) -> str:
    from prometheus_client import CollectorRegistry

    import proxy.audit.store as store_mod
    import proxy.audit.writer as writer_mod
    import proxy.monitoring as monitoring_mod
    from proxy.app import create_app
    from proxy.settings import Settings

    spans: list[tuple[str, float, float]] = []

    def around_async(cls: Any, name: str) -> None:
        f = getattr(cls, name)

        async def w(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return await f(*a, **k)
            finally:
                spans.append((name, t, time.perf_counter()))

        setattr(cls, name, w)

    around_async(writer_mod.AuditWriter, "_write")
    around_async(store_mod.AuditStore, "insert_batch")
    process = monitoring_mod.Monitoring._process

    def text_job(self: Any, job: Any) -> None:
        t = time.perf_counter()
        try:
            process(self, job)
        finally:
            spans.append(("text job", t, time.perf_counter()))

    monitoring_mod.Monitoring._process = text_job  # type: ignore[method-assign]
    started: dict[str, float] = {}

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started["t"] = time.perf_counter()
        else:
            spans.append((f"gc gen{info['generation']}", started["t"], time.perf_counter()))

    gc.callbacks.append(on_gc)
    wd = tempfile.mkdtemp(prefix="request-path-")
    app = create_app(Settings(upstream=f"http://127.0.0.1:{port}", models=["smollm2"],
                              audit={"url": f"sqlite:///{wd}/audit.db"}), registry=CollectorRegistry())
    req = body(False, 128)

    async with app.router.lifespan_context(app):
        for _ in range(50):
            await _call(app, req)
        gc.freeze()
        spans.clear()
        lat = []
        for _ in range(requests):
            t = time.perf_counter()
            await _call(app, req)
            lat.append((t, time.perf_counter() - t))
    gc.callbacks.remove(on_gc)
    ds = sorted(d for _, d in lat)
    cut = ds[int(len(ds) * 0.97)]
    slow = [(t, d) for t, d in lat if d >= cut]
    kinds: dict[str, int] = {}
    lines = [f"{requests} sequential requests in process: p50 {statistics.median(ds) * 1e3:.2f} ms, p99 "
             f"{ds[int(len(ds) * 0.99)] * 1e3:.2f} ms; the slowest {len(slow)} and what overlapped them:"]
    for t, d in slow:
        over = sorted({n for n, a, b in spans if a < t + d and b > t})
        for n in over or ["nothing traced"]:
            kinds[n] = kinds.get(n, 0) + 1
        lines.append(f"  {d * 1e3:6.1f} ms  " + (", ".join(over) or "nothing traced"))
    lines.append("  counts: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    return "\n".join(lines)


def trace(requests: int) -> str:
    wd = _targets.workdir()
    up = _targets.start_upstream(wd, 128)
    try:
        import uvloop

        return uvloop.run(_trace(requests, up.port))
    finally:
        up.stop()


async def _start(requests: int, port: int) -> str:
    from prometheus_client import CollectorRegistry

    import proxy.service as service_mod
    import proxy.upstream as upstream_mod
    from proxy.app import create_app
    from proxy.hotpath import h1
    from proxy.settings import Settings

    marks: dict[str, float] = {}

    def mark(k: str) -> None:
        marks.setdefault(k, time.perf_counter())

    def around(obj: Any, name: str, before: str, after: str) -> None:
        f = getattr(obj, name)

        async def w(*a: Any, **k: Any) -> Any:
            mark(before)
            r = await f(*a, **k)
            mark(after)
            return r

        setattr(obj, name, w)

    around(service_mod.ProxyService, "handle", "handler entered", "handler returned the response")
    around(service_mod, "read_body", "body read: start", "body read: done")
    around(upstream_mod.Upstream, "open_stream", "upstream call: start", "upstream call: status and headers in")
    received = h1._Conn.data_received

    def data_received(self: Any, data: bytes) -> None:
        mark("upstream: first bytes")
        received(self, data)

    h1._Conn.data_received = data_received  # type: ignore[method-assign]
    wd = tempfile.mkdtemp(prefix="request-path-")
    app = create_app(Settings(upstream=f"http://127.0.0.1:{port}", models=["smollm2"],
                              audit={"url": f"sqlite:///{wd}/audit.db"}), registry=CollectorRegistry())
    req = body(True, 64)

    async def sender(msg: dict[str, Any]) -> None:
        if msg["type"] == "http.response.start":
            mark("response start sent")
        elif msg["type"] == "http.response.body":
            mark("first body bytes sent")

    rows = []
    async with app.router.lifespan_context(app):
        for i in range(requests + 10):
            marks.clear()
            mark("ASGI call")
            await _call(app, req, sender)
            if i >= 10:
                rows.append(dict(marks))
            await asyncio.sleep(0.03)
    keys = sorted(rows[0], key=lambda k: statistics.median(r[k] - r["ASGI call"] for r in rows))
    out = [f"{requests} paced streams in process, median ms after the request's ASGI call:"]
    for k in keys:
        out.append(f"  {k:<40} {statistics.median((r[k] - r['ASGI call']) * 1e3 for r in rows):7.3f}")
    return "\n".join(out)


def start(requests: int) -> str:
    wd = _targets.workdir()
    up = _targets.start_upstream(wd, 64)
    try:
        import uvloop

        async def go() -> str:
            import httpx

            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{up.port}") as c:
                await c.post("/_replay/config", json={"token_delay_ms": 2.0})
            return await _start(requests, up.port)

        return uvloop.run(go())
    finally:
        up.stop()


def profile(streams: int, requests: int, rev: str | None = None) -> str:
    import pstats
    import signal
    import subprocess
    import sys

    from bench.profile_hotpath import groups

    wd = _targets.workdir()
    up = _targets.start_upstream(wd, 64)
    out = wd / "serve.prof"
    port = _targets.free_port()
    tree = _targets.ROOT
    if rev is not None:  # the proxy at a git revision of this repository, as bench.overhead --before does
        tree = wd / f"tree-{rev}"
        tree.mkdir()
        archive = subprocess.run(["git", "-C", str(_targets.ROOT), "archive", rev], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "ENTROPY_PROXY_AUDIT__URL": f"sqlite:///{wd}/audit.db",
           "ENTROPY_PROXY_LOG_LEVEL": "warning"}
    p = subprocess.Popen([sys.executable, "-m", "cProfile", "-o", str(out), "-m", "proxy.cli", "serve", "--upstream",
                          f"http://127.0.0.1:{up.port}", "--port", str(port)], env=env, cwd=wd,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _targets._wait_http(f"http://127.0.0.1:{port}/readyz", p, wd / "none.log", 60)
        req = body(True, 64)

        async def one() -> None:
            c = Connection("127.0.0.1", port)
            for _ in range(requests):
                r = await c.request("POST", CHAT, req)
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}")
            await c.close()

        async def drive() -> None:
            await asyncio.gather(*[one() for _ in range(streams)])

        asyncio.run(drive())
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(60)
        up.stop()
    n = streams * requests
    return (f"entropy-proxy serve{f' at {rev}' if rev else ''} under cProfile, {streams} concurrent unpaced "
            f"64-token streams x {requests}, "
            f"own time of the main thread per response:\n" + groups(pstats.Stats(str(out)), n, skip_suspended=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.request_path", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("parts")
    v = sub.add_parser("variants")
    v.add_argument("--rounds", type=int, default=3)
    v.add_argument("--requests", type=int, default=400)
    t = sub.add_parser("trace")
    t.add_argument("--requests", type=int, default=600)
    st = sub.add_parser("start")
    st.add_argument("--requests", type=int, default=60)
    pr = sub.add_parser("profile")
    pr.add_argument("--streams", type=int, default=16)
    pr.add_argument("--requests", type=int, default=60)
    pr.add_argument("--rev", help="profile entropy-proxy at this git revision instead of this tree")
    args = ap.parse_args(argv)
    if args.what == "parts":
        print(parts())
    elif args.what == "variants":
        print(variants(args.rounds, args.requests))
    elif args.what == "trace":
        print(trace(args.requests))
    elif args.what == "start":
        print(start(args.requests))
    else:
        print(profile(args.streams, args.requests, args.rev))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
