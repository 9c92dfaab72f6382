"""``python -m bench.alerts [record | run] ...`` (see docs/alerts.md).

    python -m bench.alerts record --upstream http://127.0.0.1:8011      # once: bench/data/alerts-recording.json.gz
    python -m bench.alerts run                                           # every scenario, table into docs/alerts.md
    python -m bench.alerts run --smoke                                   # two short scenarios (the CI test)
    python -m bench.alerts run --only entropy-collapse quiet-model --no-doc
    python -m bench.alerts table results.json --header "..."          # the table from a run's --json file
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from . import record as record_mod
from . import upstream as upstream_mod
from .cluster import MODEL, Cluster, Replica, entropy_proxy_bin, free_port
from .report import table, verdict, write_doc
from .scenarios import Scenario, scenarios
from .simulate import prompt_lists, run
from .tsdb import evaluate_alerts, prometheus_with, signals

ROOT = Path(__file__).resolve().parent.parent.parent
DOC = ROOT / "docs" / "alerts.md"


def _stage_and_pin(sc: Scenario, recording: dict[str, Any], cluster: Cluster, workdir: Path) -> str:
    """A staging run of the new revision (its own proxy and store) until it has an automatic baseline, saved
    with ``entropy-proxy baseline save`` and pinned into the production store with ``baseline pin --file``."""
    assert sc.staging is not None
    revision, variant = sc.staging
    import random
    import subprocess

    url, _, stop = upstream_mod.start(recording, model=MODEL, revision=revision)
    stage = Cluster(url, workdir / "staging", n=1)
    rng = random.Random(7)
    prompts = prompt_lists(recording)
    try:
        with stage:
            replica: Replica = stage.replicas[0]
            with httpx.Client(timeout=60) as c:
                for i in range(2000):
                    body = record_mod.request_body(MODEL, variant, rng.choice(prompts[rng.choice(list(prompts))]))
                    c.post(f"{replica.url}/v1/chat/completions", json=body).raise_for_status()
                    if i % 20 == 19:
                        in_use = stage.baseline_in_use(replica)
                        if in_use and in_use.get("revision") == revision:
                            break
                else:
                    raise RuntimeError("staging: no automatic baseline after 2000 requests")
            saved = workdir / "staging-baseline.json"
            out = subprocess.run([entropy_proxy_bin(), "baseline", "save", str(saved), "--url", replica.url],
                                 capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                raise RuntimeError(f"baseline save: {out.stdout}{out.stderr}")
    finally:
        stop()
    return cluster.baseline_cli("pin", "--model", MODEL, "--revision", revision, "--file", str(saved),
                                "--note", "bench.alerts: staging run of the sharper revision").strip()


def run_scenario(sc: Scenario, recording: dict[str, Any], workdir: Path, prometheus: str,
                 progress: bool = False) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    day0 = (int(now) - sc.minutes * 60 - 3 * 3600) // 86400 * 86400  # simulated minute 0 = 00:00 UTC
    t_start, t_end = float(day0), float(day0 + (sc.minutes - 1) * 60)
    url, _, stop = upstream_mod.start(recording, model=MODEL, revision="r1")
    notes: list[str] = []
    try:
        with Cluster(url, workdir / "replicas", n=sc.replicas) as cluster:
            if sc.staging:
                notes.append(_stage_and_pin(sc, recording, cluster, workdir))
            samples, log = run(sc.plan, sc.minutes, cluster, url, t_start, prompts=prompt_lists(recording),
                                progress=progress)
    finally:
        stop()
    t_prom = time.monotonic()
    with prometheus_with(samples.samples, workdir / "prometheus", prometheus, free_port(), t_start, t_end) as prom:
        episodes = evaluate_alerts(prom, t_start, t_end)
        end_s = sc.minutes * 60.0
        phases = ({"all": (0.0, end_s)} if sc.fault is None else
                  {"before": (0.0, sc.fault[0] * 60.0), "fault": (sc.fault[0] * 60.0, sc.fault[1] * 60.0),
                   "after": (sc.fault[1] * 60.0, end_s)})
        seen = signals(prom, t_start, t_end, phases)
    result = verdict(sc, episodes)
    result["signals"] = seen
    result.update(requests=log.requests, errors=log.errors, restarts=log.restarts, pins=log.pins + notes,
                  replay_wall_s=round(log.wall_s, 1), request_s=round(log.request_s, 1),
                  scrape_s=round(log.scrape_s, 1), prometheus_wall_s=round(time.monotonic() - t_prom, 1),
                  series=len(samples.samples))
    return result


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.alerts", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    rec = sub.add_parser("record", help="record the traffic from a real vLLM")
    rec.add_argument("--upstream", default="http://127.0.0.1:8011")
    rec.add_argument("--model", default=MODEL)
    rec.add_argument("--out", type=Path, default=record_mod.DEFAULT_OUT)
    rec.add_argument("--concurrency", type=int, default=6)
    rec.add_argument("--only", nargs="*", help="record only these variants into the existing recording")
    r = sub.add_parser("run", help="run the scenarios (default)")
    r.add_argument("--recording", type=Path, default=record_mod.DEFAULT_OUT)
    r.add_argument("--smoke", action="store_true", help="two short scenarios: healthy and an entropy collapse")
    r.add_argument("--only", nargs="*", help="scenario names")
    r.add_argument("--workdir", type=Path, default=None)
    r.add_argument("--json", type=Path, default=None, help="write the per-scenario results here")
    r.add_argument("--no-doc", action="store_true", help="do not rewrite the table in docs/alerts.md")
    tb = sub.add_parser("table", help="write the docs table from a --json file of an earlier (partial) run")
    tb.add_argument("json_file", type=Path)
    tb.add_argument("--header", required=True, help="the line above the table: command, machine, what ran")
    args = ap.parse_args(argv if argv is not None else (sys.argv[1:] or ["run"]))
    if args.cmd == "table":
        text = table(json.loads(args.json_file.read_text()), args.header)
        print(text)
        write_doc(DOC, text)
        return 0
    if args.cmd == "record":
        meta = asyncio.run(record_mod.record(args.upstream, args.model, args.out, args.concurrency,
                                                  args.only))
        print(json.dumps(meta, indent=1))
        return 0
    prometheus = shutil.which("prometheus")
    if prometheus is None or shutil.which("promtool") is None:
        print("bench.alerts: needs Debian's prometheus package (prometheus and promtool on PATH)", file=sys.stderr)
        return 2
    recording = record_mod.load(args.recording)
    chosen = [s for s in scenarios(args.smoke) if not args.only or s.name in args.only]
    base = args.workdir or Path(tempfile.mkdtemp(prefix="bench-alerts-"))
    results = []
    started = time.monotonic()
    for sc in chosen:
        t = time.monotonic()
        print(f"{sc.name}: {sc.minutes} simulated minutes", flush=True)
        res = run_scenario(sc, recording, base / sc.name, prometheus, progress=True)
        results.append(res)
        print(f"{sc.name}: {'ok' if res['ok'] else 'FAIL'} raised={res['raised']} fire={res.get('fire_min')} "
              f"held={res.get('held')} resolve={res.get('resolve_min')} false={len(res['false_pages'])} "
              f"({time.monotonic() - t:.0f} s)", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    wall = time.monotonic() - started
    meta = recording["meta"]
    cmd = "python -m bench.alerts run" + (" --smoke" if args.smoke else "") + (
        f" --only {' '.join(args.only)}" if args.only else "")
    header = (f"Measured by `{cmd}` on {_machine()}, {time.strftime('%Y-%m-%d', time.gmtime())}, in "
              f"{wall / 60:.0f} minutes of wall time. Recording: {meta['responses']} responses, {meta['tokens']} "
              f"tokens of SmolLM2-135M-Instruct on vLLM (CPU), {len(meta['variants'])} variants. Times are "
              f"simulated minutes from the start of the fault (time to fire) and from its end (time to resolve).")
    text = table(results, header)
    print(text)
    if not args.no_doc:
        write_doc(DOC, text)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
