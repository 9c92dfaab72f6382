"""Replay one scenario through real proxy replicas on a simulated clock, scraping them at simulated times.

Each simulated minute: the scenario says which requests arrive (prompt class and variant) and which replica
takes each; they are sent for real, then every replica that is up is scraped (``GET /metrics``) and its
samples are kept with the simulated timestamp, labelled ``job="entropy-proxy"`` and ``instance`` as Prometheus
would. Only the series the rules read are kept (names taken from the rule files), which keeps days of scrapes
small. Events (restart a replica, deploy a revision, pin a baseline) run between minutes.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .cluster import MODEL, Cluster, Replica
from .record import request_body
from .tsdb import RULES, Series


def rule_metric_names() -> set[str]:
    names: set[str] = set()
    for path in RULES.glob("*.yml"):
        names |= set(re.findall(r"(?<![\w:])entropy_proxy_\w+", path.read_text()))
    return names | {"entropy_proxy_entropy_state"}


@dataclass
class Request:
    variant: str
    cls: str
    replica: int | None = None  # None: round robin


@dataclass
class Tick:
    requests: list[Request]
    events: list[str] = field(default_factory=list)  # "restart:<i>", "revision:<r>", "pin:<r>"


Plan = Callable[[int, random.Random], Tick]


class Recorder:
    def __init__(self, keep: set[str]) -> None:
        self.keep = keep
        self.samples: dict[Series, list[tuple[float, float]]] = {}

    def add(self, text: str, instance: str, t: float) -> None:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name not in self.keep:
                    continue
                if s.labels.get("token_class", "all") != "all" or s.labels.get("model", MODEL) != MODEL:
                    continue
                key = tuple(sorted({**s.labels, "__name__": s.name, "job": "entropy-proxy",
                                    "instance": instance}.items()))
                self.samples.setdefault(key, []).append((t, float(s.value)))

    def up(self, instance: str, t: float, value: float) -> None:
        key = (("__name__", "up"), ("instance", instance), ("job", "entropy-proxy"))
        self.samples.setdefault(key, []).append((t, value))


@dataclass
class RunLog:
    requests: int = 0
    errors: int = 0
    restarts: int = 0
    pins: list[str] = field(default_factory=list)
    revisions: list[tuple[int, str]] = field(default_factory=list)
    wall_s: float = 0.0
    request_s: float = 0.0
    scrape_s: float = 0.0
    notes: list[str] = field(default_factory=list)


async def _send(client: httpx.AsyncClient, replica: Replica, variant: str, prompt: str) -> bool:
    body = request_body(MODEL, variant, prompt)
    try:
        r = await client.post(f"{replica.url}/v1/chat/completions", json=body)
        return r.status_code == 200
    except httpx.HTTPError:
        return False


def _wait_for_revision(cluster: Cluster, revision: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = []
        for r in cluster.replicas:
            if r.up:
                seen.append((r.status().get("models", {}).get(MODEL) or {}).get("revision"))
        if seen and all(s == revision for s in seen):
            return
        time.sleep(0.2)
    raise RuntimeError(f"replicas did not see revision {revision} in {timeout} s")


def run(plan: Plan, minutes: int, cluster: Cluster, upstream_url: str, t0: float, seed: int = 1,
        prompts: dict[str, list[str]] | None = None, progress: bool = False) -> tuple[Recorder, RunLog]:
    """Drive ``minutes`` simulated minutes starting at ``t0`` (unix seconds, on the minute)."""
    rng = random.Random(seed)
    rec = Recorder(rule_metric_names())
    log = RunLog()
    started = time.monotonic()
    rr = 0
    pending_pin: str | None = None
    assert prompts is not None

    async def minute(client: httpx.AsyncClient, tick: Tick, t: float) -> None:
        nonlocal rr
        jobs = []
        for req in tick.requests:
            up = [i for i, r in enumerate(cluster.replicas) if r.up]
            if req.replica is not None and cluster.replicas[req.replica].up:
                i = req.replica
            else:
                i = up[rr % len(up)]
                rr += 1
            prompt = rng.choice(prompts[req.cls])
            jobs.append(_send(client, cluster.replicas[i], req.variant, prompt))
        t_req = time.monotonic()
        results = await asyncio.gather(*jobs)
        log.request_s += time.monotonic() - t_req
        log.requests += len(results)
        log.errors += sum(1 for ok in results if not ok)
        await asyncio.sleep(0.01)  # the monitors' worker takes the text work off the request path
        t_scrape = time.monotonic()
        for r in cluster.replicas:
            if not r.up:
                rec.up(f"replica-{r.name}", t, 0.0)
                continue
            text = (await client.get(f"{r.url}/metrics")).text
            rec.add(text, f"replica-{r.name}", t)
            rec.up(f"replica-{r.name}", t, 1.0)
        log.scrape_s += time.monotonic() - t_scrape

    async def main() -> None:
        nonlocal pending_pin
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            for m in range(minutes):
                tick = plan(m, rng)
                for ev in tick.events:
                    kind, _, arg = ev.partition(":")
                    if kind == "restart":
                        r = cluster.replicas[int(arg)]
                        r.stop()
                        r.start()
                        log.restarts += 1
                    elif kind == "revision":
                        await client.post(f"{upstream_url}/_replay/config", json={"revision": arg})
                        _wait_for_revision(cluster, arg)
                        log.revisions.append((m, arg))
                    elif kind == "pin":
                        pending_pin = arg
                if pending_pin is not None:
                    # Pin as soon as the new revision's automatic baseline exists, as the runbook says.
                    in_use = cluster.baseline_in_use(cluster.replicas[0])
                    if in_use and in_use.get("revision") == pending_pin:
                        cluster.baseline_cli("pin", "--model", MODEL, "--revision", pending_pin,
                                             "--note", "bench.alerts: sharper revision deployed on purpose")
                        log.pins.append(f"minute {m}: pinned revision {pending_pin}")
                        pending_pin = None
                await minute(client, tick, t0 + 60 * m)
                if progress and m % 240 == 239:
                    print(f"  minute {m + 1}/{minutes}: {log.requests} requests, {log.errors} errors, "
                          f"{log.restarts} restarts, {time.monotonic() - started:.0f} s", flush=True)

    asyncio.run(main())
    log.wall_s = time.monotonic() - started
    return rec, log


def prompt_lists(recording: dict[str, Any]) -> dict[str, list[str]]:
    return {cls: list(ps) for cls, ps in recording["prompts"].items()}


def workdir_for(base: Path, name: str) -> Path:
    d = base / name
    d.mkdir(parents=True, exist_ok=True)
    return d
