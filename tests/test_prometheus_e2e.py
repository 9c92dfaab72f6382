"""End to end on a real Prometheus: two proxy replicas under traffic, the rules and the dashboard queries.

A replaying upstream (bench/replay_upstream.py) serves recorded SmolLM2 positions; halfway through it switches
to peaked, low-entropy distributions (``entropy: low``): what a collapsed policy looks like to the proxy.
Prometheus scrapes both replicas and the upstream every second and evaluates the rules with every duration
divided by 60 (tests/plugins/prometheus.py), so the 15-minute ``for`` of EntropyProxyEntropyCollapse is 15 s.

Asserted: the collapse alert stays silent through the healthy phase, then goes pending and firing; every
recording rule, every alert's underlying signal and every dashboard query returns data.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.replay_upstream import start_replay_upstream
from dashboards.entropy_proxy import queries
from proxy.app import create_app
from proxy.settings import load_settings
from tests.plugins.prometheus import compress_durations, compress_rules, start_prometheus
from tests.plugins.servers import serve_in_thread

pytestmark = [pytest.mark.prometheus, pytest.mark.slow, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2"
HEALTHY_S = 45  # longer than the compressed 30m window + 30m offset: the baseline exists before the switch
RATE_INTERVAL = "10s"  # what Grafana's $__rate_interval gives for a 1 s scrape and a ~9 s step
# Series that exist only once an operator pinned a baseline (entropy-proxy baseline pin); nobody pins here.
ONLY_WITH_A_PIN = {"model:entropy_proxy_baseline_pinned:max"}
PROMPTS = ["Name three colours.", "Write a short recipe.", "Tell a robot story.", "What is entropy?"]
REFERENCES = ["Red, green and blue.", "Boil pasta, add butter and cheese, stir and serve.",
              "A robot learned to paint and sold its first picture.", "A measure of uncertainty."]


class Traffic:
    """Client load on both replicas from a thread: chat (plain and streaming), completions, feedback labels on
    replica A (wrong ones on confident answers: the confident-wrong rate), and an unknown model now and then
    (the upstream's 404: upstream errors)."""

    def __init__(self, replicas: list[str]) -> None:
        self.replicas = replicas
        self.stop = threading.Event()
        self.counts: dict[str, int] = {}
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def _run(self) -> None:
        with httpx.Client(timeout=30) as c:
            i, last_side_request = 0, 0.0
            while not self.stop.is_set():
                i += 1
                base = self.replicas[i % len(self.replicas)]
                prompt = PROMPTS[i % len(PROMPTS)]
                try:
                    if i % 5 == 0:
                        r = c.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": prompt})
                    elif i % 3 == 0:
                        body = {"model": MODEL, "stream": True,
                                "messages": [{"role": "user", "content": prompt}]}
                        with c.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
                            r.read()
                    else:
                        r = c.post(f"{base}/v1/chat/completions",
                                   json={"model": MODEL, "messages": [{"role": "user", "content": prompt}]})
                    if r.status_code != 200:
                        self.errors.append(f"{r.status_code} {r.text[:200]}")
                    self._count("requests")
                    now = time.monotonic()
                    labelled = base == self.replicas[0] and "x-entropy-request-id" in r.headers
                    if labelled and now - last_side_request > 1:
                        last_side_request = now
                        confident = "confident" in r.headers.get("x-entropy-flags", "")
                        # with a reference answer: the recognition probe re-scores it (the ratio's pairs)
                        fb = c.post(f"{base}/v1/feedback", json={"id": r.headers["x-entropy-request-id"],
                                                                  "correct": not confident and i % 2 == 0,
                                                                  "reference": REFERENCES[i % len(REFERENCES)]})
                        self._count(f"feedback {fb.status_code}")
                        unknown = {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}
                        bad = c.post(f"{base}/v1/chat/completions", json=unknown)
                        self._count(f"unknown model {bad.status_code}")
                except httpx.HTTPError as e:
                    self.errors.append(repr(e))
                time.sleep(0.03)  # ~25 requests/s: leaves CPU to Prometheus on a 2-core machine


@pytest.fixture
def stack(tmp_path: Path, prometheus_bin: str) -> Iterator[dict[str, Any]]:
    upstream, stop_upstream = start_replay_upstream(tokens=32, model=MODEL)
    (tmp_path / "not-a-dir").write_text("")  # replica B's audit store lives "under" a file: it is down
    common = {"upstream": upstream, "models": [MODEL], "monitors.window": 20, "monitors.baseline": 500}
    # Replica A runs the recognition probe: references from the feedback traffic, re-scored through the
    # upstream's /tokenize and prompt_logprobs, make the ratio Prometheus scrapes.
    settings_a = load_settings({**common, "audit.url": f"sqlite:///{tmp_path / 'a.db'}",
                                "probe.sample_rate": 0.05}, environ={})
    settings_b = load_settings({**common, "audit.url": f"sqlite:///{tmp_path / 'not-a-dir' / 'b.db'}"},
                               environ={})
    app_a, app_b = create_app(settings_a), create_app(settings_b)
    try:
        with serve_in_thread(app_a) as a, serve_in_thread(app_b) as b:
            targets = {"entropy-proxy": [a.removeprefix("http://"), b.removeprefix("http://")],
                       "vllm": [upstream.removeprefix("http://")]}
            workdir = tmp_path / "prometheus"
            with start_prometheus(targets, compress_rules(), workdir, binary=prometheus_bin) as prom:
                traffic = Traffic([a, b])
                traffic.thread.start()
                try:
                    yield {"prom": prom, "upstream": upstream, "traffic": traffic, "app_a": app_a}
                finally:
                    traffic.stop.set()
                    traffic.thread.join(timeout=30)
    finally:
        stop_upstream()


def _states(prom: Any, name: str) -> set[str]:
    return {a["state"] for a in prom.alerts(name)}


def _has_data(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in result)


def _signal(expr: str) -> str:
    """An alert expression without its thresholds: the values it compares, which must exist all the time."""
    return re.sub(r"\s*(<=|>=|==|!=|<|>)\s*-?\d+(\.\d+)?", "", expr)


def test_collapse_alert_fires_and_every_query_returns_data(stack: dict[str, Any]) -> None:
    prom, traffic = stack["prom"], stack["traffic"]
    collapse = "EntropyProxyEntropyCollapse"

    prom.wait_for("both replicas and the upstream scraped",
                  lambda: [t for t in prom.targets() if t["health"] == "up"].__len__() == 3, timeout=30)
    start = time.monotonic()
    while time.monotonic() - start < HEALTHY_S:
        assert not _states(prom, collapse), f"{collapse} during healthy traffic: {prom.alerts(collapse)}"
        time.sleep(0.5)
    healthy_mean = prom.query('model:entropy_proxy_token_entropy_nats:mean30m{model="smollm2"}')
    assert _has_data(healthy_mean)
    # The recognition ratio comes from the probe's own pairs (nothing sets it by hand), as Prometheus scraped it.
    probe = stack["app_a"].state.probe
    ratio = prom.wait_for("the probe's recognition ratio", lambda: prom.query(
        f'entropy_proxy_recognition_ratio{{model="{MODEL}"}}'), timeout=60)
    assert probe.counts["scored"] > 0 and probe.models[MODEL].ratio() is not None
    assert math.isfinite(float(ratio[0]["value"][1])) and float(ratio[0]["value"][1]) > 0

    httpx.post(f"{stack['upstream']}/_replay/config", json={"entropy": "low"}).raise_for_status()
    switched = time.monotonic()
    prom.wait_for(f"{collapse} pending", lambda: "pending" in _states(prom, collapse), timeout=90, every=0.25)
    pending_after = time.monotonic() - switched
    prom.wait_for(f"{collapse} firing", lambda: "firing" in _states(prom, collapse), timeout=60, every=0.25)
    firing_after = time.monotonic() - switched
    alert = next(a for a in prom.alerts(collapse) if a["state"] == "firing")
    assert alert["labels"]["model"] == MODEL and alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["runbook_url"] == "docs/runbooks.md#entropyproxyentropycollapse"
    assert f"model {MODEL} over the last 30 minutes is" in alert["annotations"]["description"]
    # for = 15 s compressed: firing cannot come sooner than that after pending.
    assert firing_after - pending_after >= 14

    empty: list[str] = []
    # Recording rules: each recorded series exists, and each rule evaluated without error.
    for group in prom.rules():
        for rule in group["rules"]:
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
            if rule["name"] in ONLY_WITH_A_PIN:
                continue
            if rule["type"] == "recording" and not _has_data(prom.query(rule["name"])):
                empty.append(f"record {rule['name']}")
            if rule["type"] == "alerting" and not _has_data(prom.query(_signal(rule["query"]))):
                empty.append(f"alert {rule['name']}: {_signal(rule['query'])}")
    dashboard = json.loads((ROOT / "dashboards" / "entropy-proxy.json").read_text())
    for expr in queries(dashboard):
        runnable = compress_durations(expr).replace("$__rate_interval", RATE_INTERVAL).replace("$model", ".*")
        if not _has_data(prom.query(runnable)):
            empty.append(f"dashboard {runnable}")
    timeline = {"pending_s": round(pending_after, 1), "firing_s": round(firing_after, 1), **traffic.counts}
    print(f"\ncollapse timeline (compressed 60x) and traffic: {timeline}")
    assert not empty, "queries without data:\n" + "\n".join(empty)
    assert not traffic.errors[:5], traffic.errors[:5]

    # What a user sees, drawn from this Prometheus while it still runs (docs/dashboard.png is a copy).
    from dashboards.render import main_panels, percent_outside_range, prometheus_query_range, render

    now, now_monotonic = time.time(), time.monotonic()

    def wall(monotonic: float) -> float:
        return now - (now_monotonic - monotonic)

    markers = [(wall(switched), "low-entropy traffic"),
               (wall(switched + firing_after), "collapse alert firing")]
    png = ROOT / "test-artifacts" / "dashboard.png"
    drawn = render(prometheus_query_range(prom.url), main_panels(dashboard), png, start=wall(start) - 5,
                   end=now, step=1, rate_interval_value=RATE_INTERVAL, rewrite=compress_durations,
                   markers=markers, subtitle="tests/test_prometheus_e2e.py: 2 replicas, replayed traffic; "
                   "rule windows compressed 60x; times UTC")
    assert all(drawn.values()), f"panels drawn without data: {drawn}"
    # Every query drawn on a percent axis (the whole dashboard, not only the pictured panels) stayed within
    # 0-100 % on this traffic: a count on a percent axis once showed the confident-wrong rate at 1,000 %.
    outside = percent_outside_range(prometheus_query_range(prom.url), dashboard["panels"], start=wall(start) - 5,
                                    end=now, step=1, rate_interval_value=RATE_INTERVAL, rewrite=compress_durations)
    assert not outside, f"percent panels outside 0-100 % (title, query, worst value): {outside}"
