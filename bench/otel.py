"""What ``otel.enabled`` costs a request: the proxy with OpenTelemetry export on, beside the same proxy with it off,
in one run.

Processes (each its own, on 127.0.0.1): the replaying upstream (``bench.replay_upstream``, recorded vLLM K=20
positions), an OTLP/HTTP sink that answers 200 and counts the spans it decodes, and four proxies:

- ``off``    otel off (the default);
- ``off_b``  a second, identical otel-off proxy: the A/A pair whose difference is what noise looks like here;
- ``on``     ``otel.enabled`` with the OTLP exporter pointed at the sink;
- ``down``   ``otel.enabled`` with the exporter pointed at a port nobody listens on (every batch lost, counted).

Every client request carries a W3C ``traceparent``. Phases: non-streaming latency (one request at a time, the
arms taking turns request by request, 128 tokens, ``top_logprobs: 20``) with each proxy's CPU per request, paced
streams (time to first token and to the last token, arms in turn), 16 concurrent unpaced streams for throughput
and CPU per 1,000 tokens (arms rotated over rounds), and the in-process cost of building one span. The added
latency of ``on`` and ``down`` over ``off`` is the median of paired differences (request i of one arm against
request i of ``off``, made back to back) with a 95 % bootstrap interval, next to the A/A pair ``off_b - off``.

    python -m bench.otel                  # the run in docs/benchmarks.md (about 4 minutes)
    python -m bench.otel --quick          # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import orjson

from bench import _targets
from bench._client import Connection
from bench.overhead import CHAT, body, machine, token_events

ARMS = ("off", "off_b", "on", "down")
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


# -- the OTLP sink (run as its own process: python -m bench.otel --sink PORT) -------------------------------------
def sink(port: int) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    count = {"spans": 0, "requests": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            req = ExportTraceServiceRequest()
            req.ParseFromString(self.rfile.read(int(self.headers.get("content-length", "0"))))
            n = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
            with lock:
                count["spans"] += n
                count["requests"] += 1
            self._answer(b"")

        def do_GET(self) -> None:  # noqa: N802
            with lock:
                self._answer(json.dumps(count).encode())

        def _answer(self, data: bytes) -> None:
            self.send_response(200)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def start_sink(wd: Any) -> _targets.Target:
    port = _targets.free_port()
    return _targets._spawn("otlp-sink", [sys.executable, "-m", "bench.otel", "--sink", str(port)], "/", port, wd)


def start_proxy(wd: Any, name: str, upstream: str, otlp: str | None) -> _targets.Target:
    port = _targets.free_port()
    argv = [sys.executable, "-m", "proxy.cli", "serve", "--upstream", upstream, "--port", str(port)]
    env = {"ENTROPY_PROXY_AUDIT__URL": f"sqlite:///{wd}/audit-{name}.db", "ENTROPY_PROXY_LOG_LEVEL": "warning",
           "ENTROPY_PROXY_MODELS": "smollm2"}
    if otlp is not None:
        env.update({"ENTROPY_PROXY_OTEL__ENABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": otlp,
                    "OTEL_SERVICE_NAME": f"entropy-proxy-bench-{name}"})
    return _targets._spawn(f"proxy-{name}", argv, "/readyz", port, wd, env)


def scrape(port: int, metric: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line.startswith(metric) and "_created" not in line}


# -- measurement ------------------------------------------------------------------------------------------------------
def paired_ci(a: list[float], b: list[float], n: int = 2000) -> tuple[float, float, float]:
    """Median of the paired differences a[i] - b[i] (requests made back to back) and its 95 % bootstrap interval."""
    rng = np.random.default_rng(7)
    d = np.asarray(a) - np.asarray(b)
    boots = np.median(rng.choice(d, (n, d.size)), axis=1)
    return float(np.median(d)), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def boot_ci(a: list[float], b: list[float], stat: Any = np.median, n: int = 2000) -> tuple[float, float, float]:
    """stat(a) - stat(b) and its 95 % bootstrap interval (independent resampling of both samples)."""
    rng = np.random.default_rng(7)
    xa, xb = np.asarray(a), np.asarray(b)
    diffs = np.array([stat(rng.choice(xa, xa.size)) - stat(rng.choice(xb, xb.size)) for _ in range(n)])
    return float(stat(xa) - stat(xb)), float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def p99(x: Any) -> float:
    return float(np.percentile(x, 99))


class Run:
    def __init__(self, args: argparse.Namespace, ports: dict[str, int], upstream: int) -> None:
        self.args, self.ports, self.upstream = args, ports, upstream
        self.names = list(ports)
        self.headers = {"traceparent": TRACEPARENT}

    def order(self, r: int) -> list[str]:
        return self.names[r % len(self.names):] + self.names[: r % len(self.names)]

    async def upstream_delay(self, ms: float) -> None:
        c = Connection("127.0.0.1", self.upstream)
        await c.request("POST", "/_replay/config", orjson.dumps({"token_delay_ms": ms}))
        await c.close()

    async def latency(self) -> dict[str, list[float]]:
        """One request per arm in turn (order rotated each time), so that the machine's other load falls on every
        arm alike and request i of one arm can be paired with request i of another."""
        a = self.args
        await self.upstream_delay(0)
        conns = {n: Connection("127.0.0.1", p) for n, p in self.ports.items()}
        req = body(False, a.tokens)
        lat: dict[str, list[float]] = {n: [] for n in self.names}
        for n in self.names:
            for _ in range(20):
                await conns[n].request("POST", CHAT, req, headers=self.headers)
        for i in range(a.requests):
            for n in self.order(i):
                resp = await conns[n].request("POST", CHAT, req, headers=self.headers)
                if resp.status != 200:
                    raise RuntimeError(f"{n}: HTTP {resp.status}: {bytes(resp.body)[:300]!r}")
                lat[n].append(resp.latency)
        for c in conns.values():
            await c.close()
        return lat

    async def streams(self) -> dict[str, dict[str, list[float]]]:
        a = self.args
        await self.upstream_delay(a.stream_delay_ms)
        conns = {n: Connection("127.0.0.1", p) for n, p in self.ports.items()}
        req = body(True, a.stream_tokens)
        out: dict[str, dict[str, list[float]]] = {n: {"ttft": [], "last": []} for n in self.names}
        for n in self.names:
            await conns[n].request("POST", CHAT, req, headers=self.headers)
        for i in range(a.streams):
            for n in self.order(i):
                resp = await conns[n].request("POST", CHAT, req, headers=self.headers)
                toks = token_events(resp)
                if resp.status != 200 or not toks:
                    raise RuntimeError(f"{n}: stream HTTP {resp.status}")
                out[n]["ttft"].append(toks[0][0] - resp.started)
                out[n]["last"].append(toks[-1][0] - resp.started)
        for c in conns.values():
            await c.close()
        await self.upstream_delay(0)
        return out

    async def throughput(self, pids: dict[str, int]) -> dict[str, dict[str, float]]:
        """``--concurrency`` unpaced streams per arm, ``--tp-rounds`` rounds of ``--level-seconds`` each, arms
        rotated every round (the machine's other load then falls on every arm alike)."""
        a = self.args
        req = body(True, a.tokens)
        acc = {n: {"done": 0, "elapsed": 0.0, "cpu": 0.0} for n in self.names}
        for r in range(a.tp_rounds):
            for n in self.order(r):
                done = 0
                deadline = time.perf_counter() + a.level_seconds

                async def worker(port: int, deadline: float) -> None:
                    nonlocal done
                    c = Connection("127.0.0.1", port)
                    while time.perf_counter() < deadline:
                        resp = await c.request("POST", CHAT, req, headers=self.headers, timeout=120)
                        done += resp.status == 200 and bytes(resp.body).rstrip().endswith(b"data: [DONE]")
                    await c.close()

                cpu0, t0 = _targets.cpu_seconds(pids[n]), time.perf_counter()
                await asyncio.gather(*(worker(self.ports[n], deadline) for _ in range(a.concurrency)))
                acc[n]["elapsed"] += time.perf_counter() - t0
                acc[n]["cpu"] += _targets.cpu_seconds(pids[n]) - cpu0
                acc[n]["done"] += done
        out = {}
        for n, v in acc.items():
            tokens = v["done"] * a.tokens
            out[n] = {"tokens_per_s": tokens / v["elapsed"],
                      "cpu_s_per_1k_tokens": v["cpu"] / tokens * 1000 if tokens else 0.0}
        return out


async def span_cost(args: argparse.Namespace, upstream: str, otlp: str) -> dict[str, float]:
    """CPU and wall time of building one request's span (``Tracing.finish``, run after the response is sent),
    measured in this process around that call, over ``--span-requests`` non-streaming requests."""
    import os

    import httpx

    from proxy.app import create_app
    from proxy.settings import load_settings

    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp
    settings = load_settings({"upstream": upstream, "models": ["smollm2"], "otel.enabled": True,
                              "audit.enabled": False}, environ={})
    app = create_app(settings, components=("proxy.otel",))
    wall: list[float] = []
    cpu: list[float] = []
    async with app.router.lifespan_context(app):
        tracing = app.state.otel
        inner = tracing.finish

        def timed(rec: Any) -> None:
            w, c = time.perf_counter(), time.thread_time()
            inner(rec)
            cpu.append(time.thread_time() - c)
            wall.append(time.perf_counter() - w)

        tracing.finish = timed
        req = body(False, args.tokens)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as c:
            for _ in range(args.span_requests):
                r = await c.post(CHAT, content=req, headers={"content-type": "application/json",
                                                               "traceparent": TRACEPARENT})
                assert r.status_code == 200
    us = 1e6
    return {"n": len(wall), "wall_p50_us": float(np.median(wall)) * us, "wall_p99_us": p99(wall) * us,
            "cpu_mean_us": float(np.mean(cpu)) * us}


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    lat, st = res.pop("latency_raw"), res.pop("streams_raw")
    ms = 1e3
    res["latency_ms"] = {n: {"p50": float(np.median(v)) * ms, "p99": p99(v) * ms, "n": len(v)} for n, v in lat.items()}
    res["stream_ms"] = {n: {"ttft_p50": float(np.median(v["ttft"])) * ms, "last_p50": float(np.median(v["last"])) * ms,
                            "n": len(v["ttft"])} for n, v in st.items()}
    res["added_vs_off_ms"] = {}
    for n in ("off_b", "on", "down"):
        if n not in lat:
            continue
        d50 = paired_ci(lat[n], lat["off"])
        d99 = boot_ci(lat[n], lat["off"], stat=p99)
        dt = paired_ci(st[n]["ttft"], st["off"]["ttft"])
        dl = paired_ci(st[n]["last"], st["off"]["last"])
        res["added_vs_off_ms"][n] = {k: [x * ms for x in v] for k, v in
                                     (("paired_median", d50), ("p99", d99), ("ttft_paired_median", dt),
                                                            ("stream_last_paired_median", dl))}
    return res


def report(res: dict[str, Any]) -> str:
    a = res["args"]
    lines = [f"machine: {res['machine']}", ""]
    lines.append(f"non-streaming, {a['tokens']} tokens K=20, one at a time, arms in turn ({a['requests']} each)"
                 "        p50 ms   p99 ms")
    for n, v in res["latency_ms"].items():
        lines.append(f"  {n:<8} {v['p50']:>68.2f} {v['p99']:>8.2f}")
    lines.append("  CPU per request of each proxy process (ms, the exporter's thread included): " + ", ".join(
        f"{n} {v:.2f}" for n, v in res["cpu_ms_per_request"].items()))
    lines.append(f"\nstreams paced at {a['stream_delay_ms']} ms/token, {a['stream_tokens']} tokens, {a['streams']} each"
                 "           TTFT p50 ms   last token p50 ms")
    for n, v in res["stream_ms"].items():
        lines.append(f"  {n:<8} {v['ttft_p50']:>60.2f} {v['last_p50']:>19.2f}")
    lines.append("\nadded over `off`, ms: median of paired differences (p99: difference of p99s) "
                 "[95 % bootstrap interval]")
    for n, v in res["added_vs_off_ms"].items():
        cells = "  ".join(f"{k} {d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for k, (d, lo, hi) in v.items())
        lines.append(f"  {n:<6} {cells}")
    lines.append(f"\n{a['concurrency']} concurrent unpaced streams, {a['tp_rounds']} rounds x {a['level_seconds']} s "
                 "per arm: tokens/s (CPU s per 1,000 tokens of that proxy process)")
    for n, v in res["throughput"].items():
        lines.append(f"  {n:<8} {v['tokens_per_s']:>8.0f} ({v['cpu_s_per_1k_tokens']:.3f})")
    sc = res["span_cost"]
    lines.append(f"\nbuilding one span after its response (Tracing.finish, in-process, {sc['n']} requests): wall "
                 f"p50 {sc['wall_p50_us']:.0f} us, p99 {sc['wall_p99_us']:.0f} us, CPU mean {sc['cpu_mean_us']:.0f} us")
    lines.append(f"\nspans: the sink decoded {res['sink']['spans']} in {res['sink']['requests']} OTLP requests")
    for n, counters in res["otel_counters"].items():
        lines.append(f"  {n}: " + ", ".join(f"{k.removeprefix('entropy_proxy_otel_')} {v:.0f}"
                                            for k, v in counters.items()))
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    wd = _targets.workdir()
    started: list[_targets.Target] = []
    try:
        up = _targets.start_upstream(wd, args.tokens)
        started.append(up)
        sk = start_sink(wd)
        started.append(sk)
        url = f"http://127.0.0.1:{up.port}"
        otlp = {"off": None, "off_b": None, "on": f"http://127.0.0.1:{sk.port}",
                "down": f"http://127.0.0.1:{_targets.free_port()}"}
        ports, pids = {}, {}
        for name in ARMS:
            t = start_proxy(wd, name, url, otlp[name])
            started.append(t)
            ports[name], pids[name] = t.port, t.pid
        r = Run(args, ports, up.port)
        res: dict[str, Any] = {"machine": machine(), "args": vars(args)}
        cpu0 = {n: _targets.cpu_seconds(pids[n]) for n in ARMS}
        res["latency_raw"] = await r.latency()
        res["cpu_ms_per_request"] = {n: (_targets.cpu_seconds(pids[n]) - cpu0[n]) / (args.requests + 20) * 1e3
                                     for n in ARMS}
        res["streams_raw"] = await r.streams()
        res["throughput"] = await r.throughput(pids)
        res["span_cost"] = await span_cost(args, url, f"http://127.0.0.1:{sk.port}")
        await asyncio.sleep(6)  # one schedule delay (OTEL_BSP_SCHEDULE_DELAY, 5 s) for the last batch
        with urllib.request.urlopen(f"http://127.0.0.1:{sk.port}/", timeout=5) as resp:
            res["sink"] = json.loads(resp.read())
        res["otel_counters"] = {n: scrape(ports[n], "entropy_proxy_otel_") for n in ("on", "down")}
        return summarise(res)
    finally:
        for t in reversed(started):
            t.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.otel", description=__doc__.split("\n")[0])
    ap.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=1000, help="non-streaming requests per arm")
    ap.add_argument("--streams", type=int, default=80, help="paced streams per arm")
    ap.add_argument("--stream-tokens", type=int, default=64)
    ap.add_argument("--stream-delay-ms", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--level-seconds", type=float, default=4.0)
    ap.add_argument("--tp-rounds", type=int, default=4, help="rounds of the throughput phase")
    ap.add_argument("--span-requests", type=int, default=500, help="requests timed in-process for the span cost")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    if args.sink:
        sink(args.sink)
        return 0
    if args.quick:
        args.requests, args.streams, args.stream_tokens, args.level_seconds = 40, 4, 16, 1.0
        args.tp_rounds, args.span_requests = 1, 50
    res = asyncio.run(run(args))
    print(report(res))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
