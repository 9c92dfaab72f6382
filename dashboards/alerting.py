"""Grafana-managed alert rules for entropy collapse and drift (CONTRACT section 8), as a provisioning file.

They carry the very PromQL of ``deploy/prometheus/rules/alerts.yml`` (read from it, not copied), so Grafana
and Prometheus alert on the same condition. The expression already holds the comparison, so every series it
returns is a breach: query A runs it as an instant query and condition B (``is_number($A)``) turns each
returned series into a firing instance; no series means OK, not "no data".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from grafana_foundation_sdk.builders import alerting, expr, prometheus
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.alerting import RelativeTimeRange

ROOT = Path(__file__).resolve().parent.parent
ALERTS_FILE = ROOT / "deploy" / "prometheus" / "rules" / "alerts.yml"
DATASOURCE_UID = "prometheus"  # the uid given in provisioning/datasources/prometheus.yaml
FOLDER = "entropy-proxy"
GRAFANA_ALERTS = {"EntropyProxyEntropyCollapse": "entropy-proxy-collapse",
                  "EntropyProxyEntropyDrift": "entropy-proxy-drift"}


def prometheus_alerts(path: Path = ALERTS_FILE) -> dict[str, dict[str, Any]]:
    """The alerting rules of a Prometheus rules file, by alert name."""
    doc = yaml.safe_load(path.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}


def _grafana_template(text: str) -> str:
    # Grafana's templates know $labels like Prometheus, but a rule's value is $values.<refId>.Value.
    return text.replace("$value ", "$values.A.Value ").replace("$value}", "$values.A.Value}")


def _rule(name: str, uid: str, rule: dict[str, Any]) -> alerting.Rule:
    query = (prometheus.Dataquery().expr(rule["expr"].strip()).instant().ref_id("A"))
    condition = expr.TypeMath().expression("is_number($A)").ref_id("B")
    annotations = {k: _grafana_template(v) for k, v in rule["annotations"].items()}
    return (
        alerting.Rule(name)
        .uid(uid)
        .condition("B")
        .queries([
            alerting.Query("A").datasource_uid(DATASOURCE_UID)
            .relative_time_range(RelativeTimeRange(from_val=600, to=0)).model(query),
            alerting.Query("B").datasource_uid("__expr__").model(condition),
        ])
        .for_val(rule["for"])
        .no_data_state("OK")
        .exec_err_state("Error")
        .labels(dict(rule["labels"]))
        .annotations(annotations)
    )


def build() -> dict[str, Any]:
    """The provisioning document (Grafana ``provisioning/alerting`` file format)."""
    source = prometheus_alerts()
    rules = []
    for name, uid in GRAFANA_ALERTS.items():
        encoded = json.loads(json.dumps(_rule(name, uid, source[name]).build(), cls=JSONEncoder))
        # The file format names the group and folder once per group; the API fields for them are dropped.
        for key in ("folderUID", "orgID", "ruleGroup"):
            encoded.pop(key, None)
        rules.append(encoded)
    return {"apiVersion": 1,
            "groups": [{"orgId": 1, "name": "entropy-proxy.entropy", "folder": FOLDER, "interval": "1m",
                        "rules": rules}]}
