"""The upstream client's own cost: httpx against the lean HTTP/1.1 client (proxy/hotpath/h1.py), in one process.

Reads what the proxy reads from a vLLM-shaped upstream (``bench.replay_upstream``, started here): streams of
64 tokens paced at 2 ms a token, 16 at once (CPU per streamed event), and 128-token K=20 bodies one at a time
(CPU and wall time per request). The two clients alternate round by round; CPU is this process's.

    python -m bench.upstream_reader [--rounds 6] [--streams 16] [--requests 300]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import httpx

from bench import _targets
from bench.overhead import CHAT, body
from proxy.hotpath.h1 import H1Client

HEADERS = {"content-type": "application/json", "accept-encoding": "identity"}


async def stream_httpx(client: httpx.AsyncClient, req: bytes) -> int:
    """The number of SSE events read (both clients must read the same: checked)."""
    pieces = []
    async with client.stream("POST", CHAT, content=req, headers=HEADERS) as r:
        async for piece in r.aiter_raw():
            pieces.append(piece)
    return b"".join(pieces).count(b"\n\n")


async def stream_lean(client: H1Client, req: bytes) -> int:
    pieces = []
    r = await client.post(CHAT, req, HEADERS)
    try:
        async for piece in r.aiter_raw():
            pieces.append(piece)
    finally:
        await r.aclose()
    return b"".join(pieces).count(b"\n\n")


async def unary_httpx(client: httpx.AsyncClient, req: bytes) -> int:
    return len((await client.post(CHAT, content=req, headers=HEADERS)).content)


async def unary_lean(client: H1Client, req: bytes) -> int:
    r = await client.post(CHAT, req, HEADERS)
    try:
        return len(await r.aread())
    finally:
        await r.aclose()


async def configure(port: int, delay_ms: float, tokens: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
        (await c.post("/_replay/config", json={"token_delay_ms": delay_ms, "tokens": tokens})).raise_for_status()


async def run(args: argparse.Namespace, port: int) -> dict[str, Any]:
    hx = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60,
                           limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
    lean = H1Client("127.0.0.1", port, timeout=60, connect_timeout=5)
    clients: dict[str, Any] = {"httpx": hx, "lean": lean}
    streamers = {"httpx": stream_httpx, "lean": stream_lean}
    unaries = {"httpx": unary_httpx, "lean": unary_lean}
    out: dict[str, Any] = {n: {"us_per_event": [], "ms_cpu_per_body": [], "ms_wall_per_body": [], "events": set(),
                               "body_bytes": set()} for n in clients}
    sreq, ureq = body(True, 64), body(False, 128)
    await configure(port, 2.0, 64)
    for n in clients:  # warm-up: connections open, code paths taken
        await asyncio.gather(*[streamers[n](clients[n], sreq) for _ in range(args.streams)])
    for r in range(args.rounds):
        for n in (list(clients) if r % 2 == 0 else list(clients)[::-1]):
            c0 = time.process_time()
            events = sum(await asyncio.gather(*[streamers[n](clients[n], sreq) for _ in range(args.streams)]))
            out[n]["us_per_event"].append((time.process_time() - c0) / events * 1e6)
            out[n]["events"].add(events)
    await configure(port, 0.0, 128)
    for n in clients:
        for _ in range(20):
            await unaries[n](clients[n], ureq)
    for r in range(args.rounds):
        for n in (list(clients) if r % 2 == 0 else list(clients)[::-1]):
            lat = []
            c0 = time.process_time()
            for _ in range(args.requests // args.rounds):
                t = time.perf_counter()
                out[n]["body_bytes"].add(await unaries[n](clients[n], ureq))
                lat.append(time.perf_counter() - t)
            out[n]["ms_cpu_per_body"].append((time.process_time() - c0) / len(lat) * 1e3)
            out[n]["ms_wall_per_body"].append(statistics.median(lat) * 1e3)
    await hx.aclose()
    await lean.aclose()
    if out["httpx"]["events"] != out["lean"]["events"] or out["httpx"]["body_bytes"] != out["lean"]["body_bytes"]:
        raise RuntimeError(f"the clients read different things: {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.upstream_reader", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args(argv)
    wd = _targets.workdir()
    up = _targets.start_upstream(wd, 128)
    try:
        import uvloop

        res = uvloop.run(run(args, up.port))
    finally:
        up.stop()
    print("client  CPU µs per streamed event (16 paced streams)   CPU ms per 204 kB body   wall ms per body (p50)")
    for n, v in res.items():
        print(f"{n:<7} {statistics.median(v['us_per_event']):>12.1f} (rounds {min(v['us_per_event']):.1f}-"
              f"{max(v['us_per_event']):.1f}) {statistics.median(v['ms_cpu_per_body']):>22.3f} "
              f"{statistics.median(v['ms_wall_per_body']):>24.3f}")
    h, lean = res["httpx"], res["lean"]
    print(f"lean / httpx: {statistics.median(lean['us_per_event']) / statistics.median(h['us_per_event']):.2f}x CPU "
          f"per event, {statistics.median(lean['ms_cpu_per_body']) / statistics.median(h['ms_cpu_per_body']):.2f}x "
          "CPU per body")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
