"""What the proxy itself costs, side by side with going direct and with LiteLLM's proxy, in one run.

All three paths reach the same replaying upstream (``bench.replay_upstream``, recorded vLLM K=20 positions, 128
tokens a response), each in its own process; the load client asks every path for ``logprobs`` with
``top_logprobs: 20``. Phases, each A/B interleaved (targets rotate every round):

1. non-streaming latency (one request at a time): p50/p99 and what each path adds to direct;
2. streams paced by the upstream (``--stream-delay-ms`` a token): added time to first token and per chunk;
3. throughput at 1/16/64/256 concurrent streams (upstream unpaced) and CPU seconds per 1,000 tokens;
4. RSS of the proxy before/after ``--long-seconds`` of sustained streaming;
5. whether logprobs came back intact (token, logprob, top list) through each path, streamed and not;
3b. streams paced like vLLM's (one token per upstream write), ``--paced-streams`` at once: tokens per CPU-second of
   each path's own processes.

Proxy targets besides ``proxy`` (this tree), for before/after figures from one run: ``careful`` (this tree with
the fast path off), ``before`` (``--before REV``: the proxy at a git revision, extracted with ``git archive``),
``first`` (``--first REV``: a second, earlier revision), ``workers`` (``serve --workers N``, ``--workers``).
``--top-k K`` sets the proxy's K and the clients' request.

    python -m bench.overhead                       # full run (about 15 minutes with the 600 s soak)
    python -m bench.overhead --quick               # CI smoke: a few seconds a phase, no thresholds
    python -m bench.overhead --targets direct,proxy --json out.json
    python -m bench.overhead --targets direct,careful,proxy,workers --before REV --long-seconds 120
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from bench import _targets
from bench._client import Connection, Response

CHAT = "/v1/chat/completions"
MODEL = "smollm2"
TOP_K = 20  # --top-k: the proxy's K and what every client asks for
# Proxy targets: this tree; the same with the fast path off; a git revision (--before); N workers (--workers).
PROXIES: dict[str, Any] = {
    "proxy": lambda a: {},
    "careful": lambda a: {"env": {"ENTROPY_PROXY_HOTPATH": "off"}},
    "before": lambda a: {"rev": a.before},
    "first": lambda a: {"rev": a.first},
    "workers": lambda a: {"workers": a.workers},
}


def body(stream: bool, tokens: int) -> bytes:
    return orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}],
                         "max_tokens": tokens, "logprobs": True, "top_logprobs": TOP_K, "stream": stream})


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def token_events(resp: Response) -> list[tuple[float, dict[str, Any]]]:
    """(arrival time, chunk) for each chunk that carries a generated token."""
    out = []
    for t, ev in zip(resp.event_times, resp.events(), strict=False):
        if isinstance(ev, dict) and ev.get("choices"):
            delta = ev["choices"][0].get("delta") or {}
            if delta.get("content"):
                out.append((t, ev))
    return out


def lp_signature(entries: list[dict[str, Any]]) -> list[Any]:
    return [(e.get("token"), e.get("logprob"),
             [(t.get("token"), t.get("logprob")) for t in e.get("top_logprobs") or []]) for e in entries]


class Bench:
    def __init__(self, args: argparse.Namespace, ports: dict[str, int], upstream_port: int) -> None:
        self.args, self.ports, self.upstream_port = args, ports, upstream_port
        self.names = list(ports)

    def order(self, r: int) -> list[str]:
        return self.names[r % len(self.names):] + self.names[: r % len(self.names)]

    async def configure_upstream(self, **cfg: Any) -> None:
        c = Connection("127.0.0.1", self.upstream_port)
        await c.request("POST", "/_replay/config", orjson.dumps(cfg))
        await c.close()

    # 1 -------------------------------------------------------------------------------------------------------
    async def latency(self) -> dict[str, Any]:
        a = self.args
        await self.configure_upstream(token_delay_ms=0)
        conns = {n: Connection("127.0.0.1", p) for n, p in self.ports.items()}
        lat: dict[str, list[float]] = {n: [] for n in self.names}
        req = body(False, a.tokens)
        for n in self.names:  # warm-up: connections, caches, JIT-less but lazy imports
            for _ in range(10):
                await conns[n].request("POST", CHAT, req)
        for r in range(a.rounds):
            for n in self.order(r):
                for _ in range(a.requests):
                    resp = await conns[n].request("POST", CHAT, req)
                    if resp.status != 200:
                        raise RuntimeError(f"{n}: HTTP {resp.status}: {bytes(resp.body)[:300]!r}")
                    lat[n].append(resp.latency)
        for c in conns.values():
            await c.close()
        return {n: {"p50_ms": pct(v, 0.5) * 1e3, "p99_ms": pct(v, 0.99) * 1e3, "n": len(v)} for n, v in lat.items()}

    # 2 -------------------------------------------------------------------------------------------------------
    async def streaming(self) -> dict[str, Any]:
        a = self.args
        await self.configure_upstream(token_delay_ms=a.stream_delay_ms)
        conns = {n: Connection("127.0.0.1", p) for n, p in self.ports.items()}
        ttft: dict[str, list[float]] = {n: [] for n in self.names}
        offsets: dict[str, list[list[float]]] = {n: [] for n in self.names}
        req = body(True, a.stream_tokens)
        for n in self.names:
            await conns[n].request("POST", CHAT, req)
        for r in range(a.rounds):
            for n in self.order(r):
                for _ in range(a.streams):
                    resp = await conns[n].request("POST", CHAT, req)
                    toks = token_events(resp)
                    if resp.status != 200 or not toks:
                        raise RuntimeError(f"{n}: stream HTTP {resp.status}: {bytes(resp.body)[:300]!r}")
                    ttft[n].append(toks[0][0] - resp.started)
                    offsets[n].append([t - resp.started for t, _ in toks])
        for c in conns.values():
            await c.close()
        await self.configure_upstream(token_delay_ms=0)
        out: dict[str, Any] = {}
        base = [statistics.median(col) for col in zip(*offsets[self.names[0]], strict=False)]
        for n in self.names:
            per_index = [statistics.median(col) for col in zip(*offsets[n], strict=False)]
            added = [x - b for x, b in zip(per_index, base, strict=False)]
            out[n] = {"ttft_p50_ms": pct(ttft[n], 0.5) * 1e3, "ttft_p99_ms": pct(ttft[n], 0.99) * 1e3,
                      "chunk_added_p50_ms": statistics.median(added) * 1e3 if added else float("nan"),
                      "chunks": len(per_index)}
        return out

    # 3 -------------------------------------------------------------------------------------------------------
    async def throughput(self, pids: dict[str, int]) -> dict[str, Any]:
        a = self.args
        await self.configure_upstream(token_delay_ms=0)
        req = body(True, a.tokens)
        out: dict[str, Any] = {}
        for level in a.levels:
            out[str(level)] = {}
            for n in self.order(level):
                done = errors = 0
                deadline = time.perf_counter() + a.level_seconds

                async def worker(port: int, deadline: float) -> None:
                    nonlocal done, errors
                    c = Connection("127.0.0.1", port)
                    while time.perf_counter() < deadline:
                        try:
                            resp = await c.request("POST", CHAT, req, timeout=120)
                            ok = resp.status == 200 and bytes(resp.body).rstrip().endswith(b"data: [DONE]")
                            done, errors = done + ok, errors + (not ok)
                        except (OSError, ConnectionError, TimeoutError):
                            errors += 1
                            await asyncio.sleep(0.05)
                    await c.close()

                cpu0, t0 = _targets.cpu_seconds(pids[n]), time.perf_counter()
                await asyncio.gather(*(worker(self.ports[n], deadline) for _ in range(level)))
                elapsed, cpu = time.perf_counter() - t0, _targets.cpu_seconds(pids[n]) - cpu0
                tokens = done * a.tokens
                out[str(level)][n] = {"tokens_per_s": tokens / elapsed, "streams": done, "errors": errors,
                                      "cpu_s_per_1k_tokens": cpu / tokens * 1000 if tokens else float("nan")}
        return out

    # 3b ------------------------------------------------------------------------------------------------------
    async def paced_cpu(self, pids: dict[str, int]) -> dict[str, Any]:
        """Streams paced like vLLM's (one token per upstream write, ``--stream-delay-ms`` apart), ``--paced-streams``
        at once for ``--level-seconds``: tokens delivered per CPU-second of each path's own process."""
        a = self.args
        await self.configure_upstream(token_delay_ms=a.stream_delay_ms)
        req = body(True, a.stream_tokens)
        out: dict[str, Any] = {}
        for n in self.names:
            done = errors = 0
            deadline = time.perf_counter() + a.level_seconds

            async def worker(port: int, deadline: float) -> None:
                nonlocal done, errors
                c = Connection("127.0.0.1", port)
                while time.perf_counter() < deadline:
                    resp = await c.request("POST", CHAT, req, timeout=120)
                    ok = resp.status == 200 and bytes(resp.body).rstrip().endswith(b"data: [DONE]")
                    done, errors = done + ok, errors + (not ok)
                await c.close()

            cpu0 = _targets.cpu_seconds(pids[n])
            await asyncio.gather(*(worker(self.ports[n], deadline) for _ in range(a.paced_streams)))
            cpu = _targets.cpu_seconds(pids[n]) - cpu0
            tokens = done * a.stream_tokens
            out[n] = {"tokens": tokens, "cpu_s": cpu, "errors": errors,
                      "tokens_per_cpu_s": tokens / cpu if cpu > 0 else float("nan")}
        await self.configure_upstream(token_delay_ms=0)
        return out

    # 4 -------------------------------------------------------------------------------------------------------
    async def sustained(self, name: str, pid: int) -> dict[str, Any]:
        a = self.args
        req_s, req_n = body(True, a.tokens), body(False, a.tokens)
        deadline = time.perf_counter() + a.long_seconds
        count = {"ok": 0, "errors": 0}

        async def worker(i: int) -> None:
            c = Connection("127.0.0.1", self.ports[name])
            while time.perf_counter() < deadline:
                try:
                    resp = await c.request("POST", CHAT, req_s if i % 2 else req_n, timeout=120)
                    count["ok" if resp.status == 200 else "errors"] += 1
                except (OSError, ConnectionError, TimeoutError):
                    count["errors"] += 1
            await c.close()

        rss0 = _targets.rss_mb(pid)
        samples: list[tuple[float, float]] = []
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(worker(i)) for i in range(a.long_concurrency)]
        while time.perf_counter() < deadline:
            samples.append((time.perf_counter() - t0, _targets.rss_mb(pid)))
            await asyncio.sleep(max(0.5, a.long_seconds / 40))
        await asyncio.gather(*tasks)
        samples.append((time.perf_counter() - t0, _targets.rss_mb(pid)))
        half = samples[len(samples) // 2:]
        slope = statistics.linear_regression([s[0] for s in half], [s[1] for s in half]).slope if len(half) > 1 else 0.0
        return {"target": name, "seconds": a.long_seconds, "rss_before_mb": rss0, "rss_after_mb": samples[-1][1],
                "rss_max_mb": max(s[1] for s in samples), "slope_second_half_mb_per_min": slope * 60, **count}

    # 5 -------------------------------------------------------------------------------------------------------
    async def integrity(self) -> dict[str, Any]:
        await self.configure_upstream(token_delay_ms=0)
        sigs: dict[str, dict[str, Any]] = {}
        for n, port in self.ports.items():
            c = Connection("127.0.0.1", port)
            s = await c.request("POST", CHAT, body(True, 16))
            ns = await c.request("POST", CHAT, body(False, 16))
            await c.close()
            streamed = [e for _, ev in token_events(s)
                        for e in (ev["choices"][0].get("logprobs") or {}).get("content") or []]
            full = orjson.loads(bytes(ns.body))["choices"][0].get("logprobs") or {}
            sigs[n] = {"stream": lp_signature(streamed), "full": lp_signature(full.get("content") or []),
                       "stream_chunks": len(token_events(s))}
        ref = sigs[self.names[0]]
        return {n: {"stream_logprobs_intact": v["stream"] == ref["stream"] and len(v["stream"]) == 16,
                    "nonstream_logprobs_intact": v["full"] == ref["full"] and len(v["full"]) == 16,
                    "stream_token_chunks": v["stream_chunks"]} for n, v in sigs.items()}


def report(res: dict[str, Any]) -> str:
    names = list(res["latency"])
    lines = [f"machine: {res['machine']}", f"versions: {', '.join(res['versions'])}", ""]
    d = res["latency"][names[0]]
    lines.append(f"non-streaming {res['args']['tokens']}-token K=20 latency (ms)   p50     p99   added p50  added p99")
    added = {}
    for n in names:
        v = res["latency"][n]
        added[n] = (v["p50_ms"] - d["p50_ms"], v["p99_ms"] - d["p99_ms"])
        lines.append(f"  {n:<10} {v['p50_ms']:>38.2f} {v['p99_ms']:>7.2f} {added[n][0]:>10.2f} {added[n][1]:>10.2f}")
    if "proxy" in added and "litellm" in added and added["proxy"][0] > 0:
        lines.append(f"  LiteLLM adds {added['litellm'][0] / added['proxy'][0]:.1f}x (p50) and "
                     f"{added['litellm'][1] / max(added['proxy'][1], 1e-9):.1f}x (p99) what entropy-proxy adds")
    if "streaming" in res:
        s0 = res["streaming"][names[0]]
        lines.append(f"\nstreams paced at {res['args']['stream_delay_ms']} ms/token    TTFT p50  added TTFT  "
                     "added per chunk (ms)")
        for n in names:
            v = res["streaming"][n]
            lines.append(f"  {n:<10} {v['ttft_p50_ms']:>24.2f} {v['ttft_p50_ms'] - s0['ttft_p50_ms']:>11.2f} "
                         f"{v['chunk_added_p50_ms']:>12.2f}")
    if "throughput" in res:
        lines.append("\nthroughput, tokens/s (CPU s per 1,000 tokens of that path's own process; direct: upstream)")
        for level, per in res["throughput"].items():
            cells = "  ".join(f"{n}: {v['tokens_per_s']:>8.0f} ({v['cpu_s_per_1k_tokens']:.3f}, err {v['errors']})"
                              for n, v in per.items())
            lines.append(f"  {level:>3} streams  {cells}")
            base = per.get("proxy")
            for other in ("workers", "careful", "before", "first"):
                if base and other in per and base["tokens_per_s"]:
                    lines.append(f"        {other} / proxy: {per[other]['tokens_per_s'] / base['tokens_per_s']:.2f}x "
                                 "tokens/s")
    if "paced_cpu" in res:
        a = res["args"]
        lines.append(f"\nstreams paced at {a['stream_delay_ms']} ms/token, {a['paced_streams']} at once: "
                     "tokens per CPU-second of that path's own process")
        for n, v in res["paced_cpu"].items():
            lines.append(f"  {n:<10} {v['tokens_per_cpu_s']:>10.0f}  ({v['tokens']} tokens, {v['cpu_s']:.2f} CPU s, "
                         f"err {v['errors']})")
    if "sustained" in res:
        v = res["sustained"]
        lines.append(f"\nsustained {v['seconds']} s on {v['target']}: RSS {v['rss_before_mb']:.1f} -> "
                     f"{v['rss_after_mb']:.1f} MB (max {v['rss_max_mb']:.1f}, second-half slope "
                     f"{v['slope_second_half_mb_per_min']:+.2f} MB/min), {v['ok']} ok, {v['errors']} errors")
    if "integrity" in res:
        lines.append("\nlogprobs intact vs direct: " + ", ".join(
            f"{n}: stream {v['stream_logprobs_intact']}, non-stream {v['nonstream_logprobs_intact']}"
            for n, v in res["integrity"].items()))
    return "\n".join(lines)


def machine() -> str:
    info = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "?")

    return f"{os.cpu_count()} CPUs ({cpu}), {platform.platform()}, Python {platform.python_version()}"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    wd = _targets.workdir()
    started: list[_targets.Target] = []
    try:
        up = _targets.start_upstream(wd, args.tokens)
        started.append(up)
        url = f"http://127.0.0.1:{up.port}"
        ports, pids = {"direct": up.port}, {"direct": up.pid}
        for name in args.targets[1:]:
            if name in PROXIES:
                t = _targets.start_proxy(wd, url, top_k=args.top_k, name=name, **PROXIES[name](args))
            else:
                t = _targets.start_litellm(wd, url, MODEL)
            started.append(t)
            ports[name], pids[name] = t.port, t.pid
        b = Bench(args, ports, up.port)
        res: dict[str, Any] = {"machine": machine(), "args": vars(args),
                               "versions": [t.version for t in started if t.version], "workdir": str(wd)}
        res["integrity"] = await b.integrity()
        res["latency"] = await b.latency()
        res["streaming"] = await b.streaming()
        res["throughput"] = await b.throughput(pids)
        res["paced_cpu"] = await b.paced_cpu(pids)
        long_target = "proxy" if "proxy" in ports else args.targets[-1]
        if args.long_seconds > 0:
            res["sustained"] = await b.sustained(long_target, pids[long_target])
        return res
    finally:
        for t in reversed(started):
            t.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default="direct,proxy,litellm", help="comma list; direct must come first")
    ap.add_argument("--quick", action="store_true", help="CI smoke: a few seconds a phase")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=200, help="non-streaming requests per target per round")
    ap.add_argument("--streams", type=int, default=10, help="paced streams per target per round")
    ap.add_argument("--stream-tokens", type=int, default=64)
    ap.add_argument("--stream-delay-ms", type=float, default=2.0)
    ap.add_argument("--levels", help="concurrent streams, comma list (default 1,16,64,256; --quick: 1,16)")
    ap.add_argument("--level-seconds", type=float, default=5.0)
    ap.add_argument("--paced-streams", type=int, default=16, help="concurrent paced streams for tokens/CPU-s")
    ap.add_argument("--workers", type=int, default=2, help="N of the 'workers' target (serve --workers N)")
    ap.add_argument("--before", help="also run entropy-proxy at this git revision (target 'before'), same options")
    ap.add_argument("--first", help="and at a second, earlier revision (target 'first')")
    ap.add_argument("--top-k", type=int, default=20, help="the proxy's K (top_k) and the clients' top_logprobs")
    ap.add_argument("--long-seconds", type=float, default=600.0)
    ap.add_argument("--long-concurrency", type=int, default=16)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.requests, args.streams, args.stream_tokens = 2, 20, 3, 16
        args.levels, args.level_seconds = args.levels or "1,16", 1.0
        args.long_seconds = min(args.long_seconds, 3.0)
        args.paced_streams = min(args.paced_streams, 4)
    global TOP_K
    TOP_K = args.top_k
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.levels = [int(x) for x in (args.levels or "1,16,64,256").split(",")]
    if args.before and "before" not in args.targets:
        args.targets.insert(1, "before")
    if args.first and "first" not in args.targets:
        args.targets.insert(1, "first")
    if args.targets[0] != "direct" or not set(args.targets) <= {"direct", "litellm", *PROXIES}:
        ap.error(f"--targets: direct first, then any of {', '.join(PROXIES)}, litellm")
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        res = runner.run(run(args))
    print(report(res))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
