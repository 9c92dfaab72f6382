"""Time compression by backfill: simulated scrapes into a real Prometheus, the real rules evaluated over them.

Prometheus evaluates rules at the wall clock's now, so a day of `offset 1d` or a 15-minute `for:` cannot be
replayed in minutes through live scraping without rewriting the rules. Here nothing in the rule files changes:

1. the replicas' ``/metrics``, scraped at simulated timestamps, are written as OpenMetrics and turned into TSDB
   blocks by ``promtool tsdb create-blocks-from openmetrics``;
2. a real Prometheus serves those blocks; ``promtool tsdb create-blocks-from rules`` evaluates the recording
   rules of ``deploy/prometheus/rules/recording.yml`` over the whole simulated range against it (one pass per
   dependency level: a rule that reads another rule's output runs after it), and Prometheus restarts on the new
   blocks;
3. each alert's expression from ``alerts.yml`` is evaluated by that Prometheus over the range (``query_range``
   at the evaluation interval), and :func:`alert_timeline` applies Prometheus's ``for:`` rule to the result:
   a series is pending from the first evaluation that returns it, firing once it has been returned for
   ``for``, and resolved at the first evaluation that does not return it.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
RULES = ROOT / "deploy" / "prometheus" / "rules"
STEP_S = 60  # the rules' evaluation interval (deploy/prometheus/prometheus.yml)
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

Series = tuple[tuple[str, str], ...]  # sorted label pairs, __name__ included


def duration_s(text: str) -> float:
    return sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)", text))


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def write_openmetrics(samples: dict[Series, list[tuple[float, float]]], path: Path) -> int:
    """OpenMetrics text, one ``unknown`` family per metric name (the TSDB keeps no types); returns lines."""
    by_name: dict[str, list[Series]] = {}
    for key in samples:
        by_name.setdefault(dict(key)["__name__"], []).append(key)
    n = 0
    with path.open("w") as f:
        for name in sorted(by_name):
            f.write(f"# TYPE {name} unknown\n")
            for key in sorted(by_name[name]):
                labels = ",".join(f'{k}="{_escape(v)}"' for k, v in key if k != "__name__")
                prefix = f"{name}{{{labels}}}" if labels else name
                for t, v in sorted(samples[key]):
                    f.write(f"{prefix} {v!r} {t:.3f}\n")
                    n += 1
        f.write("# EOF\n")
    return n


def rule_levels(path: Path) -> list[list[dict[str, Any]]]:
    """The recording rules of ``path`` by dependency level (level 0 reads only scraped series)."""
    rules = [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"] if "record" in r]
    names = {r["record"] for r in rules}
    level: dict[str, int] = {}

    def depth(rule: dict[str, Any], seen: frozenset[str] = frozenset()) -> int:
        name = rule["record"]
        if name not in level:
            used = {m for m in re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", rule["expr"]) if m in names} - {name}
            if used & seen:
                raise ValueError(f"recording rules depend on each other in a cycle: {name}")
            deps = [next(r for r in rules if r["record"] == u) for u in used]
            level[name] = 1 + max((depth(d, seen | {name}) for d in deps), default=-1)
        return level[name]

    for r in rules:
        depth(r)
    out: list[list[dict[str, Any]]] = [[] for _ in range(max(level.values()) + 1)]
    for r in rules:
        out[level[r["record"]]].append(r)
    return out


class Prometheus:
    """A real Prometheus on a data directory, restartable (it reads new blocks at start)."""

    def __init__(self, binary: str, workdir: Path, port: int) -> None:
        self.binary, self.workdir, self.port = binary, workdir, port
        self.data = workdir / "tsdb"
        self.data.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({"global": {"evaluation_interval": "1m"}}))
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def start(self) -> None:
        log = (self.workdir / "prometheus.log").open("ab")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.data}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=90d",
             "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("prometheus exited: " + (self.workdir / "prometheus.log").read_text()[-2000:])
            with contextlib.suppress(httpx.HTTPError):
                if self.http.get("/-/ready").status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("prometheus did not become ready in 60 s")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def add_blocks(self, blocks: Path) -> int:
        moved = 0
        for block in blocks.iterdir():
            if block.is_dir() and (block / "meta.json").exists():
                shutil.move(str(block), str(self.data / block.name))
                moved += 1
        return moved

    def query_range(self, expr: str, start: float, end: float, step: float = STEP_S) -> list[dict[str, Any]]:
        r = self.http.post("/api/v1/query_range", data={"query": expr, "start": start, "end": end, "step": step})
        body = r.json()
        if r.status_code != 200 or body.get("status") != "success":
            raise RuntimeError(f"query_range {expr[:80]}...: {body.get('error', body)}")
        return list(body["data"]["result"])


def _promtool(*args: str, cwd: Path | None = None) -> str:
    out = subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=cwd)
    if out.returncode != 0:
        raise RuntimeError(f"promtool {' '.join(args[:4])}: {out.stdout[-1500:]}{out.stderr[-1500:]}")
    return out.stdout


@dataclass
class Episode:
    """One alert instance's time in pending/firing (simulated seconds from the start of the range)."""

    alert: str
    labels: dict[str, str]
    active: float
    firing: float | None
    resolved: float | None


def alert_timeline(times: Iterable[float], for_s: float, step: float = STEP_S) -> list[tuple[float, float | None,
                                                                                             float | None]]:
    """Prometheus's ``for:`` rule over the evaluations at which an alert's expression returned a series.

    ``times``: the evaluation timestamps (on a ``step`` grid) that returned it. Returns ``(active_at,
    firing_at or None, resolved_at or None)`` per run of consecutive evaluations: pending from the first one,
    firing at the first evaluation ``t`` with ``t - active_at >= for``, resolved at the first evaluation that
    did not return it (None while it still held at the end of the range).
    """
    out: list[tuple[float, float | None, float | None]] = []
    ts = sorted(times)
    i = 0
    while i < len(ts):
        j = i
        while j + 1 < len(ts) and ts[j + 1] - ts[j] <= step * 1.001:
            j += 1
        active, last = ts[i], ts[j]
        firing = active + for_s if last - active >= for_s else None
        if firing is not None:
            firing = active + step * -(-for_s // step)  # the first evaluation at or after active + for
        out.append((active, firing, last + step))
        i = j + 1
    return out


@contextlib.contextmanager
def prometheus_with(samples: dict[Series, list[tuple[float, float]]], workdir: Path, binary: str, port: int,
                    start: float, end: float) -> Iterator[Prometheus]:
    """A Prometheus holding ``samples`` and every recording rule evaluated over ``[start, end]``."""
    workdir.mkdir(parents=True, exist_ok=True)
    om = workdir / "scrapes.om"
    write_openmetrics(samples, om)
    blocks = workdir / "blocks"
    _promtool("tsdb", "create-blocks-from", "openmetrics", str(om), str(blocks))
    om.unlink()
    prom = Prometheus(binary, workdir, port)
    prom.add_blocks(blocks)
    prom.start()
    try:
        for i, rules in enumerate(rule_levels(RULES / "recording.yml")):
            level_file = workdir / f"recording-level{i}.yml"
            level_file.write_text(yaml.safe_dump({"groups": [{"name": f"level{i}", "interval": "1m",
                                                              "rules": rules}]}, sort_keys=False))
            out = workdir / f"rule-blocks-{i}"
            _promtool("tsdb", "create-blocks-from", "rules", f"--url={prom.url}", f"--start={int(start)}",
                      f"--end={int(end)}", f"--output-dir={out}", "--eval-interval=1m", str(level_file))
            prom.stop()
            prom.add_blocks(out)
            prom.start()
        yield prom
    finally:
        prom.stop()
        prom.http.close()


def evaluate_alerts(prom: Prometheus, start: float, end: float) -> list[Episode]:
    """Every alert of ``alerts.yml``, evaluated over ``[start, end]``: its episodes, times relative to start."""
    doc = yaml.safe_load((RULES / "alerts.yml").read_text())
    episodes: list[Episode] = []
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule or rule["alert"] == "EntropyProxyDown":
                continue  # the benchmark's scrapes are written, not scraped: `up` is not part of what it measures
            for series in prom.query_range(rule["expr"], start, end):
                labels = {k: v for k, v in series["metric"].items() if k != "__name__"}
                times = [float(t) for t, _ in series["values"]]
                for active, firing, resolved in alert_timeline(times, duration_s(rule.get("for", "0s"))):
                    episodes.append(Episode(rule["alert"], labels, active - start,
                                            None if firing is None else firing - start,
                                            None if resolved is None or resolved > end else resolved - start))
    return episodes


SIGNALS = {
    "mean/ref": "model:entropy_proxy_token_entropy_nats:mean30m"
                " / model:entropy_proxy_token_entropy_nats:reference_mean",
    "p80/ref": "model:entropy_proxy_token_entropy_nats:p80_30m / model:entropy_proxy_token_entropy_nats:reference_p80",
    "fork/ref": "model:entropy_proxy_forking_tokens:ratio30m / model:entropy_proxy_forking_tokens:reference_ratio",
    "tokens30m": "model:entropy_proxy_token_entropy_nats:increase30m",
    "diversity/ref": "model_measure:entropy_proxy_diversity:avg / model_measure:entropy_proxy_diversity:reference",
}


def signals(prom: Prometheus, start: float, end: float,
            phases: dict[str, tuple[float, float]]) -> dict[str, dict[str, list[float] | None]]:
    """Min, median and max of what the alerts compare, per phase (simulated seconds from ``start``)."""
    out: dict[str, dict[str, list[float] | None]] = {}
    for name, expr in SIGNALS.items():
        for series in prom.query_range(expr, start, end):
            key = name + "".join(f" {v}" for k, v in sorted(series["metric"].items()) if k == "measure")
            for phase, (lo, hi) in phases.items():
                vals = sorted(float(v) for t, v in series["values"] if lo <= float(t) - start < hi)
                vals = [v for v in vals if v == v]
                out.setdefault(key, {})[phase] = (None if not vals else
                                                  [round(vals[0], 3), round(vals[len(vals) // 2], 3),
                                                   round(vals[-1], 3)])
    return out
