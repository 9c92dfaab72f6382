"""CPU per streamed token of the whole proxy process, paced like vLLM, in process: observers' settings A/B.

The app (every component: metrics, monitors with their text worker thread, audit with its SQLite writer) runs in
one process, driven by raw ASGI calls (``bench.profile_hotpath``'s driver); the upstream is the ``Replayer``
behind ``httpx.MockTransport``, writing one token per chunk with an ``asyncio.sleep`` of ``--pace-ms`` between
them, ``--streams`` at once. No sockets and no profiler: the figure is the process's CPU time (every thread) per
1,000 tokens delivered, counted until the monitors' queue is empty and the audit writer has written everything,
so work that is deferred is still charged. Variants alternate round by round in the same process, so the
machine's load shifts both alike:

- ``all-on``: every observer as configured (the defaults, or what the flags below set);
- ``uncapped``: the monitors' text work without its share cap (``monitors.text_work_share: 0``);
- ``no-linger``: the audit writer writes as soon as a record is queued (no batching window);
- ``no-rows``: stream chunks estimated through ``estimate_positions``' arrays (not ``estimate_rows``);
- ``no-observers``: metrics, monitors and audit observers unhooked (the annotation alone); ``no-monitors``,
  ``no-metrics``, ``no-audit``: that one unhooked;
- ``before``: ``uncapped+no-linger+no-rows`` (the proxy as it was before issue 14's second step). Modifiers
  combine with ``+``, e.g. ``no-observers+no-rows``.

    python -m bench.observer_cost --rounds 6 --requests 160
    python -m bench.observer_cost --variants before,all-on --prompts distinct
    python -m bench.observer_cost --variants no-observers,no-observers+no-rows --pace-ms 0
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from typing import Any

import httpx
import orjson

from bench.profile_hotpath import _call, _Stream
from bench.replay_upstream import Replayer
from proxy import annotate

MODIFIERS = ("uncapped", "no-linger", "no-rows", "no-observers", "no-monitors", "no-metrics", "no-audit")
_OBSERVER = {"no-monitors": "Monitoring", "no-metrics": "Metrics", "no-audit": "AuditWriter"}
ALIASES = {"all-on": "", "before": "uncapped+no-linger+no-rows"}


def _paced_transport(rep: Replayer, pace_s: float) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        reply = rep.handle(request.method, request.url.path, request.content)
        headers = {"content-type": reply.content_type.decode()}
        parts = list(reply.parts)

        async def gen() -> Any:
            for p in parts:  # one token a write, as vLLM sends them
                await asyncio.sleep(pace_s)
                yield p

        return httpx.Response(reply.status, headers=headers, stream=_Stream(gen()))

    return httpx.MockTransport(handler)


class _Switch:
    """Puts the app's observers into one variant's configuration (attributes only; nothing rebuilt)."""

    def __init__(self, app: Any) -> None:
        self.mon = app.state.monitoring
        self.writer = app.state.audit_writer
        self.hub = app.state.hub
        self.observers = list(self.hub.observers)
        self.budget = self.mon.text_budget
        self.linger = self.writer.linger_s
        self.rows = annotate.estimate_rows

    def set(self, variant: str) -> None:
        mods = _modifiers(variant)
        gone = {_OBSERVER[m] for m in mods if m in _OBSERVER}
        self.hub.observers[:] = [] if "no-observers" in mods else [
            o for o in self.observers if type(o).__name__ not in gone]
        self.mon.text_budget = None if "uncapped" in mods else self.budget
        if self.budget is not None:  # every phase starts with a full bucket, whatever ran before
            self.budget.credit, self.budget._last = self.budget.capacity, self.budget.clock()
        self.writer.linger_s = 0.0 if "no-linger" in mods else self.linger
        annotate.estimate_rows = _no_rows if "no-rows" in mods else self.rows  # type: ignore[assignment]


def _modifiers(variant: str) -> set[str]:
    mods = {m for part in variant.split("+") for m in ALIASES.get(part, part).split("+") if m}
    bad = mods - set(MODIFIERS)
    if bad:
        raise SystemExit(f"unknown variant part {sorted(bad)}; use {', '.join(MODIFIERS)} joined by '+', "
                         f"or {', '.join(ALIASES)}")
    return mods


def _no_rows(*_: Any) -> None:
    return None


async def _drain(app: Any) -> None:
    mon, writer = app.state.monitoring, app.state.audit_writer
    while mon._q.qsize():  # the text worker is part of the cost
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.02)  # the job it is on
    await writer.flush(30)


async def _phase(app: Any, bodies: list[bytes], streams: int) -> None:
    it = iter(bodies)

    async def client() -> None:
        for body in it:
            status, out = await _call(app, body)
            assert status == 200, out[:300]

    await asyncio.gather(*(client() for _ in range(streams)))


async def run(args: argparse.Namespace) -> str:
    from prometheus_client import CollectorRegistry

    from proxy.app import create_app
    from proxy.settings import Settings

    variants = args.variants.split(",")
    for v in variants:
        _modifiers(v)
    rep = Replayer(tokens=args.tokens)
    wd = tempfile.mkdtemp(prefix="observer-cost-")
    extra: dict[str, Any] = {}
    if args.text_work_share is not None:
        extra["text_work_share"] = args.text_work_share
    settings = Settings(upstream="http://upstream.invalid", models=["smollm2"], top_k=args.k,
                        audit={"url": f"sqlite:///{wd}/audit.db"}, monitors=extra)
    app = create_app(settings, registry=CollectorRegistry(), transport=_paced_transport(rep, args.pace_ms / 1e3))
    seq = iter(range(10**9))

    def bodies(n: int) -> list[bytes]:
        out = []
        for _ in range(n):
            i = next(seq)
            prompt = "Tell me a story." if args.prompts == "repeated" else f"Tell me story number {i}."
            out.append(orjson.dumps({"model": "smollm2", "messages": [{"role": "user", "content": prompt}],
                                     "max_tokens": args.tokens, "logprobs": True, "top_logprobs": args.k,
                                     "stream": True}))
        return out

    cpu: dict[str, list[float]] = {v: [] for v in variants}
    skipped: dict[str, int] = {v: 0 for v in variants}
    async with app.router.lifespan_context(app):
        sw = _Switch(app)
        await _phase(app, bodies(args.streams * 4), args.streams)  # warm-up
        await _drain(app)
        gc.freeze()  # as `entropy-proxy serve` does after start-up
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for v in order:
                sw.set(v)
                b = bodies(args.requests)
                await _drain(app)
                s0 = app.state.monitoring.skipped_total()
                c0 = time.process_time()
                await _phase(app, b, args.streams)
                await _drain(app)
                cpu[v].append((time.process_time() - c0) / (args.requests * args.tokens) * 1e3)
                skipped[v] += app.state.monitoring.skipped_total() - s0
        sw.set("all-on")
    lines = [f"in process, {args.streams} streams paced at {args.pace_ms} ms/token, {args.tokens}-token responses, "
             f"K={args.k}, prompts {args.prompts}, {args.rounds} rounds x {args.requests} responses a variant",
             f"{'variant':<14} {'CPU s / 1,000 tokens (median, min-max)':<40} {'tokens per CPU-s':>16}  "
             f"text jobs skipped"]
    for v in variants:
        med = statistics.median(cpu[v])
        lines.append(f"{v:<14} {med:.4f} ({min(cpu[v]):.4f}-{max(cpu[v]):.4f}){'':<17} {1e3 / med:>16,.0f}  "
                     f"{skipped[v]} of {args.rounds * args.requests}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.observer_cost", description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="before,all-on,no-observers")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=160, help="responses per variant per round")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--pace-ms", type=float, default=2.0)
    ap.add_argument("--prompts", choices=("repeated", "distinct"), default="repeated")
    ap.add_argument("--text-work-share", type=float, default=None, help="monitors.text_work_share (default: as set)")
    args = ap.parse_args(argv)
    print(asyncio.run(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
