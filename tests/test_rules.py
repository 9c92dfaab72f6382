"""Prometheus rules: promtool check and unit tests, and the conventions every rule keeps.

promtool comes from Debian's ``prometheus`` package (``apt-get install -y prometheus``). Without it
these tests skip locally; under CI (``CI=1``, ``true`` or ``yes``) a missing promtool fails them, so CI never
passes by skipping.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.plugins.ci_guard import unavailable

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "rules"
RULE_FILES = [RULES / "recording.yml", RULES / "alerts.yml"]
UNIT_TESTS = ROOT / "deploy" / "prometheus" / "tests" / "alerts_test.yml"
SCENARIO_TESTS = ROOT / "deploy" / "prometheus" / "tests" / "scenarios_test.yml"  # days, every 5 minutes
RUNBOOKS = ROOT / "docs" / "runbooks.md"

CONTRACT_ALERTS = {  # CONTRACT section 8
    "EntropyProxyEntropyCollapse", "EntropyProxyEntropyDrift", "EntropyProxyDiversityCollapse",
    "EntropyProxyConfidentWrongRateHigh", "EntropyProxyLogprobsMissing", "EntropyProxyUpstreamErrors",
    "EntropyProxyDown",
}
CONTRACT_METRICS = {  # CONTRACT section 6, with the series a histogram exposes
    "requests_total", "tokens_total", "responses_flagged_total", "logprobs_missing_total",
    "upstream_errors_total", "entropy_drift", "collapse_score", "diversity", "recognition_ratio",
    "feedback_total", "confident_wrong_total", "calibration", "audit_dropped_total", "entropy_state",
    # CONTRACT section 9: baselines per model revision, and the fixed-threshold forking counters behind them
    "baseline", "baseline_info", "diversity_samples", "forking_tokens_total", "forking_checked_tokens_total",
} | {f"{h}{s}" for h in ("token_entropy_nats", "response_entropy_nats", "response_confidence",
                         "forking_fraction", "overhead_seconds") for s in ("_bucket", "_sum", "_count")}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        unavailable("promtool is not on PATH (apt-get install -y prometheus)")
    return path


def _rules(path: Path) -> list[dict]:
    return [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


def _alerts() -> dict[str, dict]:
    return {r["alert"]: r for r in _rules(RULES / "alerts.yml")}


def _duration_s(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smhd])", text))


def _github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_promtool_check_rules() -> None:
    result = subprocess.run([promtool(), "check", "rules", *map(str, RULE_FILES)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 32 rules found" in result.stdout and "SUCCESS: 7 rules found" in result.stdout


@pytest.mark.parametrize("tests", [UNIT_TESTS, SCENARIO_TESTS], ids=lambda p: p.name)
def test_promtool_unit_tests(tests: Path) -> None:
    result = subprocess.run([promtool(), "test", "rules", tests.name], cwd=tests.parent,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    # A wrong expected annotation must fail, or the test above proves nothing.
    text = UNIT_TESTS.read_text().replace("is 10% of its baseline", "is 11% of its baseline")
    assert text != UNIT_TESTS.read_text()
    broken = UNIT_TESTS.parent / f".broken-{os.getpid()}.yml"
    broken.write_text(text)
    try:
        result = subprocess.run([promtool(), "test", "rules", broken.name], cwd=broken.parent,
                                capture_output=True, text=True)
    finally:
        broken.unlink()
    assert result.returncode != 0 and "EntropyProxyEntropyCollapse" in result.stderr


def test_every_contract_alert_exists_once_and_nothing_else() -> None:
    names = [r["alert"] for r in _rules(RULES / "alerts.yml")]
    assert sorted(names) == sorted(CONTRACT_ALERTS)


@pytest.mark.parametrize("name", sorted(CONTRACT_ALERTS))
def test_alert_conventions(name: str) -> None:
    rule = _alerts()[name]
    assert _duration_s(rule["for"]) > 0
    assert rule["labels"]["severity"] in {"warning", "critical"}
    ann = rule["annotations"]
    assert set(ann) == {"summary", "description", "runbook_url"}
    assert "{{" not in ann["summary"], "summary is fixed text; details go to description"
    assert "$labels." in ann["description"] and "$value" in ann["description"]
    url = ann["runbook_url"]
    assert url == f"docs/runbooks.md#{name.lower()}"
    headings = [line[3:] for line in RUNBOOKS.read_text().splitlines() if line.startswith("## ")]
    assert url.split("#")[1] in {_github_anchor(h) for h in headings}


def test_each_runbook_section_says_what_to_check_and_do() -> None:
    sections = RUNBOOKS.read_text().split("\n## ")[1:]
    assert {s.splitlines()[0] for s in sections} == CONTRACT_ALERTS
    for s in sections:
        assert "**What it means.**" in s and "**What to check.**" in s and "**What to do.**" in s, s[:40]


LEVEL_LABELS = {"model": {"model"}, "model_flag": {"model", "flag"}, "model_measure": {"model", "measure"},
                "model_token_class": {"model", "token_class"}, "endpoint_quantile": {"endpoint"},
                "model_reference": {"model", "reference"},
                "model_measure_reference": {"model", "measure", "reference"}}


def test_recording_rule_names_follow_level_metric_operation() -> None:
    for rule in _rules(RULES / "recording.yml"):
        level, metric, operation = rule["record"].split(":")
        assert level in LEVEL_LABELS and metric.startswith("entropy_proxy_"), rule["record"]
        assert re.fullmatch(r"[a-z0-9_]+", operation), rule["record"]
        # The level names the labels the result keeps: the outer aggregation groups by exactly those, plus the
        # label a label_replace adds (the `reference` of each baseline a window is compared with).
        by = re.search(r"by \(([^)]*)\)", rule["expr"])
        if by:
            kept = {label.strip() for label in by.group(1).split(",")} - {"le"}
            kept |= set(re.findall(r'"(\w+)",\s*"[^"]*",\s*"[^"]*",\s*"[^"]*"\s*\)', rule["expr"]))
            assert kept == LEVEL_LABELS[level], (rule["record"], kept)


def test_rules_only_use_contract_metrics() -> None:
    # A typo in a metric name would silently never fire; every name must be one CONTRACT section 6 exports.
    recorded = {r["record"] for r in _rules(RULES / "recording.yml")}
    for path in RULE_FILES:
        for rule in _rules(path):
            for metric in re.findall(r"(?<![\w:])entropy_proxy_\w+", rule["expr"]):
                assert metric[len("entropy_proxy_"):] in CONTRACT_METRICS, metric
            for used in re.findall(r"\b[a-z_]+:entropy_proxy_\w+:\w+", rule["expr"]):
                assert used in recorded, used


def test_unit_tests_cover_every_alert_at_its_for_boundary() -> None:
    """Each alert is tested silent at T - 1m and firing at T with its exact annotations.

    With a 1m evaluation interval that pins the alert's activation to T - for: firing at T needs the condition
    since T - for at the latest, silence at T - 1m needs it to have started after T - 1m - for.
    """
    doc = yaml.safe_load(UNIT_TESTS.read_text())
    assert doc["evaluation_interval"] == "1m"
    groups = [g["name"] for path in RULE_FILES for g in yaml.safe_load(path.read_text())["groups"]]
    assert sorted(doc["group_eval_order"]) == sorted(groups)
    assert yaml.safe_load(SCENARIO_TESTS.read_text())["group_eval_order"] == doc["group_eval_order"]
    alerts = _alerts()
    covered: set[str] = set()
    for group in doc["tests"]:
        cases = group.get("alert_rule_test", [])
        by_time = {(c["alertname"], _duration_s(c["eval_time"])): c for c in cases}
        for (name, t), case in by_time.items():
            before = by_time.get((name, t - 60))
            if before is None:
                continue
            firing = {tuple(sorted(a["exp_labels"].items())) for a in case["exp_alerts"]}
            earlier = {tuple(sorted(a["exp_labels"].items())) for a in before["exp_alerts"]}
            if not firing or firing <= earlier:
                continue
            assert t >= _duration_s(alerts[name]["for"])
            for expected in case["exp_alerts"]:
                assert expected["exp_labels"]["severity"] == alerts[name]["labels"]["severity"]
                assert set(expected["exp_annotations"]) == {"summary", "description", "runbook_url"}
                for key in ("summary", "runbook_url"):
                    assert expected["exp_annotations"][key] == alerts[name]["annotations"][key]
            covered.add(name)
    assert covered == CONTRACT_ALERTS
