"""One ``/metrics`` for N worker processes: gather every worker's exposition and merge it.

Each worker serves the app on the shared port and on its own Unix socket (``worker-<i>.sock`` in the run
directory). ``GET /metrics`` arriving on the shared port (any worker may take it) is answered by
:class:`WorkerMiddleware`: it asks every worker — itself included — over those sockets for its own exposition
(a request carrying the supervisor's secret, which the middleware passes to the app's ``/metrics``, with the
client's other headers, so whatever access rule guards ``/metrics`` still applies), then merges:

- counters, histograms, summaries: summed per (sample, label set) — the proxy's totals; ``_created`` is the
  earliest;
- gauges (and info/untyped): per (sample, label set), the leader's value (worker 0), else the lowest-index
  worker that has the series. The live monitors' gauges (drift, collapse, diversity, state, ...) are the
  leader's monitors' readings over the traffic the leader served: one reading per model, as from one proxy,
  taken over a share of the traffic (see docs/configuration.md, "Workers").

Two gauges describe the set: ``entropy_proxy_workers`` (configured) and ``entropy_proxy_workers_scraped``
(answered this scrape). A worker that does not answer in time (restarting) is left out of that scrape.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Iterable

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .env import WorkerEnv

log = logging.getLogger("entropy_proxy.workers")

SCRAPE_HEADER = "x-entropy-proxy-scrape"
WORKER_HEADER = "x-entropy-proxy-worker"
SUMMED = frozenset({"counter", "histogram", "summary", "gaugehistogram"})
SCRAPE_TIMEOUT_S = 5.0


def merge(expositions: Iterable[str]) -> list[Metric]:
    """Merge text expositions given leader first (then by worker index) into one set of metric families."""
    fams: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], Sample]] = {}
    for text in expositions:
        for fam in text_string_to_metric_families(text):
            out = fams.get(fam.name)
            if out is None:
                out = fams[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                values[fam.name] = {}
            acc = values[fam.name]
            summed = fam.type in SUMMED
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                prev = acc.get(key)
                if prev is None:
                    acc[key] = s
                elif summed:
                    v = min(prev.value, s.value) if s.name.endswith("_created") else prev.value + s.value
                    acc[key] = prev._replace(value=v)
                # a gauge: the first worker's (the leader's, or the lowest index that has the series) stays
    for name, out in fams.items():
        out.samples = list(values[name].values())
    return list(fams.values())


class _Fixed(Collector):
    def __init__(self, fams: list[Metric]) -> None:
        self.fams = fams

    def collect(self) -> list[Metric]:
        return self.fams


def render(fams: list[Metric]) -> bytes:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Fixed(fams))
    return generate_latest(reg)


def _gauge(name: str, doc: str, value: float) -> Metric:
    m = Metric(name, doc, "gauge")
    m.add_sample(name, {}, value)
    return m


async def _scrape(env: WorkerEnv, index: int, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes] | None:
    transport = httpx.AsyncHTTPTransport(uds=str(env.socket_path(index)))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://worker",
                                     timeout=SCRAPE_TIMEOUT_S) as client:
            r = await client.get("/metrics", headers=headers)
            return r.status_code, r.content
    except (httpx.HTTPError, OSError) as e:
        log.info("worker %d did not answer the metrics scrape (%s)", index, type(e).__name__)
        return None


class WorkerMiddleware:
    """Pure ASGI: ``/metrics`` merged across workers; every response names the worker that answered
    (``X-Entropy-Proxy-Worker: <index>``)."""

    def __init__(self, app: ASGIApp, env: WorkerEnv) -> None:
        self.app = app
        self.env = env
        self._index = str(env.index).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] != "/metrics" or scope["method"] not in ("GET", "HEAD") or not self.env.supervised:
            await self.app(scope, receive, self._tag(send))
            return
        given = next((v for k, v in scope["headers"] if k == SCRAPE_HEADER.encode()), b"")
        if given and hmac.compare_digest(given, self.env.secret.encode()):
            await self.app(scope, receive, send)  # a sibling gathering: this worker's own view
            return
        await self._gather(scope, send)

    def _tag(self, send: Send) -> Send:
        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (WORKER_HEADER.encode(),
                                                                                  self._index)]}
            await send(message)

        return tagged

    async def _gather(self, scope: Scope, send: Send) -> None:
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"host", b"content-length", b"connection")]
        headers.append((SCRAPE_HEADER.encode(), self.env.secret.encode()))
        got = await asyncio.gather(*(_scrape(self.env, i, headers) for i in range(self.env.count)))
        answered = [g for g in got if g is not None]
        refused = next((g for g in answered if g[0] != 200), None)
        if refused is not None or not answered:  # e.g. 401 from an access rule: the app's answer, as it is
            status, content = refused if refused is not None else (503, b"no worker answered\n")
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
            await send({"type": "http.response.body", "body": content})
            return
        fams = merge(c.decode() for _, c in answered)
        fams.append(_gauge("entropy_proxy_workers", "Worker processes configured (serve --workers).",
                           self.env.count))
        fams.append(_gauge("entropy_proxy_workers_scraped", "Worker processes whose metrics this scrape holds.",
                           len(answered)))
        body = render(fams)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode()),
                                (b"content-length", str(len(body)).encode()),
                                (WORKER_HEADER.encode(), self._index)]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

