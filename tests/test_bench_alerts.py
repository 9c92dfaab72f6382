"""The alert-quality benchmark (bench/alerts): its pieces, and a smoke run of two scenarios on a real Prometheus.

The smoke run replays the committed recording (real SmolLM2 answers from vLLM) through two real
``entropy-proxy serve`` replicas on a simulated clock, backfills their scrapes into a real Prometheus, evaluates
the project's unmodified rule files over them, and checks the pages: none on healthy traffic, the collapse
alert during a genuine entropy collapse.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from bench.alerts import record, scenarios
from bench.alerts.report import clopper_pearson, table, verdict, write_doc
from bench.alerts.tsdb import RULES, Episode, alert_timeline, rule_levels, write_openmetrics
from tests.plugins.prometheus import prometheus_binary

ROOT = Path(__file__).resolve().parent.parent


def test_alert_timeline_follows_prometheus_for_semantics() -> None:
    # Returned at 0..14 min (15 evaluations) with for 15m: pending from 0, never firing (it would fire at 15).
    assert alert_timeline([60.0 * i for i in range(15)], 900) == [(0.0, None, 900.0)]
    # Returned at 0..15 min: fires at the evaluation at 15 min, resolves at the first evaluation without it.
    assert alert_timeline([60.0 * i for i in range(16)], 900) == [(0.0, 900.0, 960.0)]
    # A gap of one evaluation resets the pending time: two runs, the second fires 15 minutes after it began.
    times = [60.0 * i for i in range(10)] + [60.0 * i for i in range(11, 40)]
    assert alert_timeline(times, 900) == [(0.0, None, 600.0), (660.0, 1560.0, 2400.0)]


def test_rule_levels_put_each_rule_after_what_it_reads() -> None:
    levels = rule_levels(RULES / "recording.yml")
    where = {r["record"]: i for i, rules in enumerate(levels) for r in rules}
    assert where["model:entropy_proxy_token_entropy_nats:mean30m"] == 0
    assert where["model_reference:entropy_proxy_token_entropy_nats:mean"] == 1
    assert where["model:entropy_proxy_token_entropy_nats:reference_mean"] == 2
    assert len(levels) == 3


def test_openmetrics_writer_groups_each_name_and_orders_time(tmp_path: Path) -> None:
    key = (("__name__", "entropy_proxy_baseline"), ("measure", "token_entropy_mean"), ("model", "m"))
    other = (("__name__", "up"), ("instance", 'a"b'))
    path = tmp_path / "x.om"
    assert write_openmetrics({key: [(120.0, 2.0), (60.0, 1.0)], other: [(60.0, 1.0)]}, path) == 3
    lines = path.read_text().splitlines()
    assert lines[0] == "# TYPE entropy_proxy_baseline unknown" and lines[-1] == "# EOF"
    assert lines[1] == 'entropy_proxy_baseline{measure="token_entropy_mean",model="m"} 1.0 60.000'
    assert lines[2].endswith(" 2.0 120.000") and lines[4] == 'up{instance="a\\"b"} 1.0 60.000'


def _scenario(**kw: object) -> scenarios.Scenario:
    base = scenarios.Scenario("s", "t", 600, lambda m, rng: scenarios.Tick([]))
    return dataclasses.replace(base, **kw)


def test_verdict_counts_false_pages_misses_and_holding() -> None:
    healthy = verdict(_scenario(), [Episode("EntropyProxyEntropyDrift", {}, 0, 1800.0, 3600.0)])
    assert not healthy["ok"] and len(healthy["false_pages"]) == 1
    sc = _scenario(expect=("EntropyProxyEntropyCollapse",), fault=(100, 400))
    # Fires 45 min into the fault, holds to its end, resolves 20 min after it.
    good = verdict(sc, [Episode("EntropyProxyEntropyCollapse", {}, 6000 + 1800, 6000 + 2700, 24000 + 1200)])
    assert good["ok"] and good["fire_min"] == {"EntropyProxyEntropyCollapse": 45.0}
    assert good["held"]["EntropyProxyEntropyCollapse"] == 1.0
    assert good["resolve_min"]["EntropyProxyEntropyCollapse"] == 20.0
    # Stops firing halfway through the fault: not ok, and the holding share says so.
    gap = verdict(sc, [Episode("EntropyProxyEntropyCollapse", {}, 6000, 6900, 15450)])
    assert not gap["ok"] and gap["held"]["EntropyProxyEntropyCollapse"] == 0.5
    missed = verdict(sc, [])
    assert not missed["ok"] and missed["missed"] == ["EntropyProxyEntropyCollapse"]
    early = verdict(sc, [Episode("EntropyProxyEntropyCollapse", {}, 0, 900.0, 2000.0)])
    assert not early["ok"] and len(early["false_pages"]) == 1


def test_clopper_pearson_known_values() -> None:
    lo, hi = clopper_pearson(0, 10)
    assert lo == 0.0 and abs(hi - 0.3085) < 1e-3
    lo, hi = clopper_pearson(5, 10)
    assert abs(lo - 0.1871) < 1e-3 and abs(hi - 0.8129) < 1e-3


def test_the_table_goes_between_the_markers(tmp_path: Path) -> None:
    doc = tmp_path / "alerts.md"
    doc.write_text("# Alerts\n\nbefore\n<!-- bench.alerts:begin -->\nold\n<!-- bench.alerts:end -->\nafter\n")
    res = verdict(_scenario(), [])
    write_doc(doc, table([res], "Measured by test."))
    text = doc.read_text()
    assert text.startswith("# Alerts\n\nbefore\n") and text.endswith("after\n") and "old" not in text
    assert "| s: t | 10 h | none | none | 0 |" in text


def test_the_committed_recording_is_compact_and_complete() -> None:
    path = record.DEFAULT_OUT
    assert path.stat().st_size < 5_000_000
    doc = record.load(path)
    keys = {k.split("|")[0] for k in doc["answers"]}
    assert keys == set(record.VARIANTS)
    assert doc["meta"]["top_k"] == 20 and doc["meta"]["upstream_model"] == "smollm2"
    some = next(iter(doc["answers"].values()))[0]
    assert len(some["positions"][0][2]) == 20 and some["text"]


@pytest.mark.prometheus
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smoke_healthy_is_silent_and_a_collapse_pages(tmp_path: Path) -> None:
    from bench.alerts.__main__ import run_scenario

    binary = prometheus_binary()
    assert shutil.which("promtool"), "promtool comes with the prometheus package"
    recording = record.load(record.DEFAULT_OUT)
    healthy, collapse = scenarios.scenarios(smoke=True)
    quiet = run_scenario(healthy, recording, tmp_path / "healthy", binary)
    assert quiet["errors"] == 0 and quiet["requests"] > 0
    assert quiet["signals"]["tokens30m"]["all"][2] > 2000  # the rules saw the traffic
    assert quiet["raised"] == [], quiet["episodes"]
    paged = run_scenario(collapse, recording, tmp_path / "collapse", binary)
    assert paged["errors"] == 0
    assert "EntropyProxyEntropyCollapse" in paged["raised"], (paged["signals"], paged["episodes"])
    assert paged["false_pages"] == [] and paged["held"]["EntropyProxyEntropyCollapse"] >= 0.99
