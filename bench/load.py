"""Load and soak: many concurrent streaming clients through entropy-proxy, against the replaying upstream.

Phases (each client is a keep-alive connection looping streaming chat requests until its phase ends; loopback
only, every loop bounded by the phase's deadline):

1. ``direct``: the clients against the replaying upstream itself (the baseline latency at that load);
2. ``proxy``: the same clients through the proxy. Reported: errors (a non-200, a broken connection, a stream
   without ``data: [DONE]`` or with an error event), time to first token and whole-stream latency, p50/p99 for
   both phases and the difference (the latency the proxy adds at that load), and the proxy's own accounting
   (``entropy_proxy_overhead_seconds``, p50/p99 from its histogram);
3. ``soak``: fewer clients for ``--soak-s`` seconds while the proxy's RSS is sampled; reported: the RSS at the
   start and the end, and the least-squares slope over the samples after the first 10% (MiB per minute).

    python -m bench.load                      # 500 clients x 60 s, soak 600 s (about 13 minutes)
    python -m bench.load --quick              # a few seconds of each, for CI
    python -m bench.load --json /tmp/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from bench._client import Connection
from bench._targets import Target, _spawn, free_port, rss_mb, start_proxy, workdir
from bench.overhead import machine

CHAT = "/v1/chat/completions"


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


@dataclass
class PhaseResult:
    name: str
    clients: int
    seconds: float
    ok: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    ttft: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    tokens: int = 0

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    def summary(self) -> dict[str, Any]:
        return {"clients": self.clients, "seconds": round(self.seconds, 1), "requests": self.ok + self.errors,
                "errors": self.errors, "error_kinds": self.error_kinds,
                "tokens_per_s": round(self.tokens / self.seconds) if self.seconds else 0,
                "ttft_p50_ms": round(pct(self.ttft, 0.5) * 1e3, 1), "ttft_p99_ms": round(pct(self.ttft, 0.99) * 1e3, 1),
                "total_p50_ms": round(pct(self.total, 0.5) * 1e3, 1),
                "total_p99_ms": round(pct(self.total, 0.99) * 1e3, 1)}


def request_body(tokens: int) -> bytes:
    # K=20 asked for explicitly so that the direct phase moves the same bytes as the proxied one
    return orjson.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "Tell me a story."}],
                         "stream": True, "max_tokens": tokens, "logprobs": True, "top_logprobs": 20})


async def _client(port: int, body: bytes, deadline: float, res: PhaseResult, timeout: float) -> None:
    conn = Connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline:
            try:
                resp = await conn.request("POST", CHAT, body, timeout=timeout)
            except (OSError, ConnectionError, TimeoutError) as e:
                res.error(type(e).__name__)
                await conn.close()
                await asyncio.sleep(0.05)
                continue
            tail = bytes(resp.body[-64:])
            if resp.status != 200:
                res.error(f"status_{resp.status}")
            elif not tail.endswith(b"data: [DONE]\n\n"):
                res.error("no_done")
            elif b'data: {"error"' in resp.body:
                res.error("error_event")
            else:
                res.ok += 1
                res.ttft.append(resp.event_times[1] - resp.started if len(resp.event_times) > 1 else resp.latency)
                res.total.append(resp.latency)
                res.tokens += max(0, len(resp.event_times) - 2)  # role chunk and [DONE] carry no token
    finally:
        await conn.close()


async def phase(name: str, port: int, clients: int, seconds: float, tokens: int, timeout: float) -> PhaseResult:
    res = PhaseResult(name, clients, seconds)
    body = request_body(tokens)
    t0 = time.perf_counter()
    deadline = t0 + seconds
    # ramp up over at most a second so that 500 connects do not arrive as one burst
    tasks = []
    for i in range(clients):
        tasks.append(asyncio.create_task(_client(port, body, deadline, res, timeout)))
        if i % 50 == 49:
            await asyncio.sleep(min(1.0, seconds / 10) * 50 / clients)
    await asyncio.gather(*tasks)
    res.seconds = time.perf_counter() - t0
    return res


def overhead_quantiles(metrics_text: str) -> dict[str, float]:
    """p50/p99 of entropy_proxy_overhead_seconds{endpoint="chat"} from its cumulative buckets (upper edges)."""
    buckets: list[tuple[float, float]] = []
    for line in metrics_text.splitlines():
        if line.startswith("entropy_proxy_overhead_seconds_bucket{") and 'endpoint="chat"' in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    out = {}
    for q in (0.5, 0.99):
        edge = next((le for le, c in buckets if total and c >= q * total), float("nan"))
        out[f"p{int(q * 100)}_ms_at_most"] = edge * 1e3
    out["requests"] = total
    return out


def _get(port: int, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read().decode()


def slope_mib_per_min(samples: list[tuple[float, float]]) -> float:
    pts = samples[len(samples) // 10:]
    if len(pts) < 2:
        return float("nan")
    n = len(pts)
    mt = sum(t for t, _ in pts) / n
    mr = sum(r for _, r in pts) / n
    var = sum((t - mt) ** 2 for t, _ in pts)
    return 60 * sum((t - mt) * (r - mr) for t, r in pts) / var if var else float("nan")


async def soak(proxy: Target, clients: int, seconds: float, tokens: int, every: float,
               timeout: float) -> dict[str, Any]:
    samples: list[tuple[float, float]] = []
    t0 = time.monotonic()
    load = asyncio.create_task(phase("soak", proxy.port, clients, seconds, tokens, timeout))
    while not load.done():
        samples.append((time.monotonic() - t0, rss_mb(proxy.pid)))
        await asyncio.wait([load], timeout=every)
    res = load.result()
    samples.append((time.monotonic() - t0, rss_mb(proxy.pid)))
    return {**res.summary(), "rss_start_mib": round(samples[0][1], 1), "rss_end_mib": round(samples[-1][1], 1),
            "rss_max_mib": round(max(r for _, r in samples), 1), "samples": len(samples),
            "rss_slope_mib_per_min": round(slope_mib_per_min(samples), 3)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    wd = workdir()
    up_port = free_port()
    upstream = _spawn("upstream", [sys.executable, "-m", "bench.replay_upstream", "--port", str(up_port),
                                   "--tokens", str(args.tokens), "--token-delay-ms", str(args.token_delay_ms)],
                      "/v1/models", up_port, wd)
    proxy: Target | None = None
    try:
        out: dict[str, Any] = {"machine": machine(), "command": "python -m bench.load " + " ".join(args.argv)}
        direct = await phase("direct", up_port, args.clients, args.seconds, args.tokens, args.timeout)
        out["direct"] = direct.summary()
        proxy = start_proxy(wd, f"http://127.0.0.1:{up_port}")
        before = overhead_quantiles(_get(proxy.port, "/metrics"))
        proxied = await phase("proxy", proxy.port, args.clients, args.seconds, args.tokens, args.timeout)
        out["proxy"] = proxied.summary()
        out["proxy_overhead"] = overhead_quantiles(_get(proxy.port, "/metrics"))
        out["proxy_overhead"]["requests"] -= before["requests"]
        out["added_ms"] = {k: round(out["proxy"][k] - out["direct"][k], 1)
                           for k in ("ttft_p50_ms", "ttft_p99_ms", "total_p50_ms", "total_p99_ms")}
        if args.soak_s > 0:
            out["soak"] = await soak(proxy, args.soak_clients, args.soak_s, args.tokens, args.sample_s, args.timeout)
        out["proxy_rss_mib_after"] = round(rss_mb(proxy.pid), 1)
        return out
    finally:
        if proxy is not None:
            proxy.stop()
        upstream.stop()


def report(res: dict[str, Any]) -> str:
    lines = [f"machine: {res['machine']}", f"command: {res['command']}", ""]
    cols = ("requests", "errors", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "total_p50_ms", "total_p99_ms")
    lines.append(f"{'phase':8} {'clients':>7} " + " ".join(f"{c:>13}" for c in cols))
    for name in ("direct", "proxy", "soak"):
        if name in res:
            r = res[name]
            lines.append(f"{name:8} {r['clients']:>7} " + " ".join(f"{r[c]!s:>13}" for c in cols))
    a = res["added_ms"]
    lines.append(f"added by the proxy at this load: TTFT p50 {a['ttft_p50_ms']} ms, p99 {a['ttft_p99_ms']} ms; "
                 f"whole stream p50 {a['total_p50_ms']} ms, p99 {a['total_p99_ms']} ms")
    o = res["proxy_overhead"]
    lines.append(f"proxy's own time per request (entropy_proxy_overhead_seconds): p50 <= {o['p50_ms_at_most']} ms, "
                 f"p99 <= {o['p99_ms_at_most']} ms over {int(o['requests'])} requests")
    if "soak" in res:
        s = res["soak"]
        lines.append(f"soak: RSS {s['rss_start_mib']} -> {s['rss_end_mib']} MiB (max {s['rss_max_mib']}), "
                     f"slope {s['rss_slope_mib_per_min']} MiB/min over {s['samples']} samples, "
                     f"{s['errors']} errors in {s['requests']} requests")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per response")
    ap.add_argument("--token-delay-ms", type=float, default=50.0, help="upstream pace per token (20 tokens/s)")
    ap.add_argument("--soak-s", type=float, default=600.0)
    ap.add_argument("--soak-clients", type=int, default=50)
    ap.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling interval during the soak")
    ap.add_argument("--timeout", type=float, default=120.0, help="per-request client timeout")
    ap.add_argument("--quick", action="store_true", help="seconds instead of minutes: 20 clients, 3 s, soak 6 s")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.clients, args.seconds, args.soak_s = min(args.clients, 20), min(args.seconds, 3.0), min(args.soak_s, 6.0)
        args.soak_clients, args.sample_s, args.tokens = min(args.soak_clients, 10), 0.5, min(args.tokens, 16)
        args.token_delay_ms = min(args.token_delay_ms, 10.0)
    args.argv = argv
    res = asyncio.run(run(args))
    print(report(res))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    errors = res["direct"]["errors"] + res["proxy"]["errors"] + res.get("soak", {}).get("errors", 0)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
