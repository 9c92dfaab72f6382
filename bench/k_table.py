"""Choosing K: what the proxy costs and how close its entropy is at K = 5, 10, 20, in one run.

For each K the replaying upstream serves K alternatives (the client asks ``top_logprobs: K``, the proxy runs with
``top_k: K``) and ``bench.overhead``'s phases measure, side by side with going direct: the added non-streaming
latency (p50/p99), the tokens per CPU-second of the proxy on unpaced and on paced streams (one token per upstream
write); the estimator's error against exact full-vocabulary entropy comes from the fixtures of
``bench.estimator_fresh`` (6,320 positions; no upstream involved). K is the ``top_k`` setting
(``ENTROPY_PROXY_TOP_K``).

    python -m bench.k_table [--ks 5,10,20] [--requests 100] [--seconds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from bench import _targets, estimator_fresh
from bench import overhead as ov


async def _one(k: int, args: argparse.Namespace) -> dict[str, Any]:
    ov.TOP_K = k
    wd = _targets.workdir()
    up = _targets.start_upstream(wd, args.tokens)
    px = None
    try:
        url = f"http://127.0.0.1:{up.port}"
        px = _targets.start_proxy(wd, url, top_k=k)
        ns = argparse.Namespace(tokens=args.tokens, rounds=args.rounds, requests=args.requests, streams=2,
                                stream_tokens=64, stream_delay_ms=2.0, levels=[16], level_seconds=args.seconds,
                                paced_streams=16)
        b = ov.Bench(ns, {"direct": up.port, "proxy": px.port}, up.port)
        pids = {"direct": up.pid, "proxy": px.pid}
        lat = await b.latency()
        thr = await b.throughput(pids)
        paced = await b.paced_cpu(pids)
        integ = await b.integrity()
        return {"latency": lat, "throughput": thr, "paced": paced, "integrity": integ}
    finally:
        if px is not None:
            px.stop()
        up.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.k_table", description=__doc__.split("\n")[0])
    ap.add_argument("--ks", default="5,10,20")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    ks = [int(x) for x in args.ks.split(",")]
    est = estimator_fresh.evaluate()["by_k"]
    rows: dict[int, Any] = {}
    for k in ks:
        rows[k] = asyncio.run(_one(k, args))
    print(f"machine: {ov.machine()}")
    print("| K (`top_k`) | added p50 / p99, ms (128 tokens, non-streaming) | tokens per CPU-s, unpaced (16 streams) "
          "| tokens per CPU-s, paced (16 streams) | estimator median / p90 error, nats |")
    print("| --- | --- | --- | --- | --- |")
    for k, r in rows.items():
        d, p = r["latency"]["direct"], r["latency"]["proxy"]
        thr = r["throughput"]["16"]["proxy"]
        cpu_tok = 1000 / thr["cpu_s_per_1k_tokens"] if thr["cpu_s_per_1k_tokens"] else float("nan")
        e = est.get(k, est.get(str(k), {})).get("all", {}).get("point") if est else None
        err = f"{e['median']:.3f} / {e['p90']:.3f}" if e else "n/a"
        print(f"| {k} | {p['p50_ms'] - d['p50_ms']:.2f} / {p['p99_ms'] - d['p99_ms']:.2f} | {cpu_tok:,.0f} "
              f"| {r['paced']['proxy']['tokens_per_cpu_s']:,.0f} | {err} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({str(k): v for k, v in rows.items()}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
