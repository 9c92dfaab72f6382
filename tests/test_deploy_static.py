"""Deploy files checked without Docker or a cluster: they parse, agree with each other and with the code.

Generated files (dashboard JSON, Grafana alert rules, PrometheusRule) must equal a fresh regeneration.
Dashboard queries are parsed by promtool (as recording rules in a temporary file); running them against a
real Prometheus is tests/test_prometheus_e2e.py.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from dashboards import alerting, entropy_proxy, generate
from proxy.cli import build_parser
from proxy.settings import load_settings
from tests.test_rules import promtool

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DIR = ROOT / "deploy" / "compose"
K8S = ROOT / "deploy" / "k8s"
PROXY_PORT = 8080


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _k8s() -> dict[str, dict]:
    return {doc["kind"]: doc for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(path.read_text())}


def _dashboard() -> dict:
    return json.loads((ROOT / "dashboards" / "entropy-proxy.json").read_text())


# --- generated files ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", list(generate.outputs()), ids=lambda p: str(p.relative_to(ROOT)))
def test_generated_file_matches_regeneration(path: Path) -> None:
    assert path.exists(), f"{path} missing: run python -m dashboards.generate"
    assert path.read_text() == generate.outputs()[path], f"{path} is stale: run python -m dashboards.generate"


def test_generate_check_detects_a_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "entropy-proxy.json"
    target.write_text("{}\n")
    monkeypatch.setattr(generate, "outputs", lambda: {target: generate.dashboard_json()})
    monkeypatch.setattr(generate, "ROOT", tmp_path)
    assert generate.main(["--check"]) == 1
    assert generate.main([]) == 0 and generate.main(["--check"]) == 0


def test_prometheusrule_holds_exactly_the_rule_files() -> None:
    rule = _yaml(K8S / "prometheusrule.yaml")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    files = [g for name in ("recording.yml", "alerts.yml")
             for g in _yaml(ROOT / "deploy" / "prometheus" / "rules" / name)["groups"]]
    assert rule["spec"]["groups"] == files


# --- dashboard ---------------------------------------------------------------------------------------------

def test_dashboard_structure() -> None:
    d = _dashboard()
    assert d["uid"] == "entropy-proxy-overview" and d["timezone"] == "UTC" and "entropy-proxy" in d["tags"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["datasource"]["uid"] == "${datasource}"
    panels = [p for p in d["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in d["panels"]}) == len(d["panels"])
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p.get("targets") and p.get("description"), p["title"]
    # No two panels overlap on the 24-column grid.
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine and g["x"] + g["w"] <= 24, p["title"]
        cells |= mine


def test_dashboard_has_the_panels_the_issue_asks_for() -> None:
    text = json.dumps(_dashboard())
    for metric in ("token_entropy_nats_bucket", "entropy_drift", "collapse_score", "diversity",
                   "format_entropy", 'token_class!=\\"all\\"', "recognition_ratio", "responses_flagged_total",
                   "confident_wrong", "calibration", "overhead_seconds_bucket", "logprobs_missing_total",
                   "upstream_errors_total"):
        assert metric in text, metric
    heatmaps = [p for p in _dashboard()["panels"] if p["type"] == "heatmap"]
    assert heatmaps and heatmaps[0]["targets"][0]["format"] == "heatmap"


def test_dashboard_rates_use_rate_interval() -> None:
    for expr in entropy_proxy.queries(_dashboard()):
        for window in re.findall(r"(?:rate|increase)\([^\[]*\[([^\]]+)\]", expr):
            assert window == "$__rate_interval", expr
        assert "model:" in expr or 'model=~"$model"' in expr or "by (endpoint" in expr or "by (reason" in expr


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    # promtool parses every expression as a recording rule; Grafana's variables get plausible values.
    rules = [{"record": f"dashboard:query_{i}:check",
              "expr": q.replace("$__rate_interval", "1m").replace("$model", ".*")}
             for i, q in enumerate(entropy_proxy.queries(_dashboard()))]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana provisioning ----------------------------------------------------------------------------------

def test_grafana_alert_rules_carry_the_prometheus_conditions() -> None:
    doc = _yaml(ROOT / "dashboards" / "provisioning" / "alerting" / "entropy-proxy.yaml")
    source = alerting.prometheus_alerts()
    rules = {r["title"]: r for g in doc["groups"] for r in g["rules"]}
    assert set(rules) == {"EntropyProxyEntropyCollapse", "EntropyProxyEntropyDrift"}
    for name, rule in rules.items():
        query = next(q for q in rule["data"] if q["refId"] == "A")
        assert query["model"]["expr"] == source[name]["expr"].strip()
        assert query["datasourceUid"] == _yaml(ROOT / "dashboards" / "provisioning" / "datasources" /
                                               "prometheus.yaml")["datasources"][0]["uid"]
        assert rule["for"] == source[name]["for"] and rule["labels"] == source[name]["labels"]
        assert rule["annotations"]["summary"] == source[name]["annotations"]["summary"]
        assert rule["annotations"]["runbook_url"] == source[name]["annotations"]["runbook_url"]
        assert "$values.A.Value" in rule["annotations"]["description"]
        assert rule["condition"] in {q["refId"] for q in rule["data"]}


# --- compose -----------------------------------------------------------------------------------------------

def _compose() -> dict:
    return _yaml(COMPOSE_DIR / "docker-compose.yml")


def _host_port(target: str) -> tuple[str, int]:
    host, port = target.rsplit(":", 1)
    return host, int(port)


def test_compose_services_images_and_mounts() -> None:
    services = _compose()["services"]
    assert set(services) == {"vllm", "proxy", "prometheus", "alertmanager", "grafana"}
    for name, svc in services.items():
        image = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", svc["image"])
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image ({image})"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source} does not exist"
    assert "${MODEL" in " ".join(services["vllm"]["command"])
    assert services["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    build = services["proxy"]["build"]
    assert (COMPOSE_DIR / build["context"] / build["dockerfile"]).exists()


def test_compose_proxy_command_is_a_valid_cli_call_with_a_valid_config() -> None:
    services = _compose()["services"]
    command = services["proxy"]["command"]
    args = build_parser().parse_args(command)
    vllm_port = int(services["vllm"]["command"][services["vllm"]["command"].index("--port") + 1])
    assert args.upstream == f"http://vllm:{vllm_port}" and args.host == "0.0.0.0" and args.port == PROXY_PORT
    assert f"{PROXY_PORT}:{PROXY_PORT}" in services["proxy"]["ports"]
    mounts = dict(v.split(":")[:2][::-1] for v in services["proxy"]["volumes"])
    settings = load_settings({"upstream": args.upstream}, environ={}, config_file=str(COMPOSE_DIR /
                                                                                      mounts[args.config]))
    assert settings.port == PROXY_PORT


def test_prometheus_config_scrapes_the_compose_services() -> None:
    result = subprocess.run([promtool(), "check", "config", str(ROOT / "deploy/prometheus/prometheus.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    config = _yaml(ROOT / "deploy" / "prometheus" / "prometheus.yml")
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in config["scrape_configs"]}
    services = _compose()["services"]
    assert jobs["entropy-proxy"] == [f"proxy:{PROXY_PORT}"]
    assert re.search(r'up\{job="entropy-proxy"\}', alerting.prometheus_alerts()["EntropyProxyDown"]["expr"])
    host, port = _host_port(jobs["vllm"][0])
    assert host in services and str(port) in services["vllm"]["command"]
    host, port = _host_port(config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0])
    assert host in services and f"{port}:{port}" in services[host]["ports"]
    datasource = _yaml(ROOT / "dashboards" / "provisioning" / "datasources" / "prometheus.yaml")
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert "9090:9090" in services["prometheus"]["ports"]


def test_alertmanager_config_routes_to_a_defined_receiver() -> None:
    config = _yaml(ROOT / "deploy" / "alertmanager" / "alertmanager.yml")
    receivers = {r["name"] for r in config["receivers"]}
    routes = [config["route"], *config["route"].get("routes", [])]
    assert all(r["receiver"] in receivers for r in routes)


# --- Dockerfile --------------------------------------------------------------------------------------------

def test_dockerfile_builds_the_cli_on_the_shared_port() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert f"EXPOSE {PROXY_PORT}" in text and 'ENTRYPOINT ["entropy-proxy"]' in text
    cmd = json.loads(re.search(r"^CMD (.*)$", text, re.M).group(1))
    assert build_parser().parse_args(cmd).port == PROXY_PORT
    ignored = (ROOT / ".dockerignore").read_text().split()
    for copied in re.findall(r"^COPY (?!--from)(.*) \S+$", text, re.M):
        for source in shlex.split(copied):
            assert (ROOT / source).exists(), source
            assert source not in ignored, f"{source} is copied but .dockerignore drops it"


# --- Kubernetes --------------------------------------------------------------------------------------------

def test_kustomization_lists_every_manifest() -> None:
    listed = set(_yaml(K8S / "kustomization.yaml")["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_k8s_objects_agree() -> None:
    objs = _k8s()
    assert {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "ServiceMonitor",
            "PrometheusRule"} <= set(objs)
    deploy, service, monitor, hpa = objs["Deployment"], objs["Service"], objs["ServiceMonitor"], \
        objs["HorizontalPodAutoscaler"]
    pod = deploy["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["image"] == _compose()["services"]["proxy"]["image"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": PROXY_PORT}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    args = build_parser().parse_args(container["args"])
    assert args.port == PROXY_PORT and args.host == "0.0.0.0"
    # The config file the container reads is the ConfigMap's key, and it is a valid configuration.
    mount = next(m for m in container["volumeMounts"] if args.config.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    configmap = objs["ConfigMap"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    config_text = configmap["data"][args.config.rsplit("/", 1)[1]]
    assert load_settings(yaml.safe_load(config_text), environ={}).port == PROXY_PORT
    # Service -> pods, ServiceMonitor -> Service, HPA -> Deployment.
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    # prometheus-operator names the job after the Service: EntropyProxyDown must match it.
    assert "jobLabel" not in monitor["spec"] and service["metadata"]["name"] == "entropy-proxy"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deploy["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2


# --- who may read the audit trail in the examples ------------------------------------------------------------

def _env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not
             line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def test_compose_proxy_takes_admin_keys_from_an_env_file() -> None:
    proxy = _compose()["services"]["proxy"]
    env_files = proxy["env_file"]
    assert env_files == ["./proxy-keys.env"]
    assert (COMPOSE_DIR / ".gitignore").read_text().split() == ["proxy-keys.env"]
    example = _env_file(COMPOSE_DIR / "proxy-keys.env.example")
    assert set(example) == {"ENTROPY_PROXY_ADMIN_KEYS"} and example["ENTROPY_PROXY_ADMIN_KEYS"] == ""
    args = build_parser().parse_args(proxy["command"])
    config = str(COMPOSE_DIR / "entropy-proxy.yaml")
    # the example as shipped: no key, so the audit trail is closed to every non-loopback client
    empty = load_settings({"upstream": args.upstream}, environ=example, config_file=config)
    assert empty.admin_keys == [] and not empty.audit.public and empty.host == "0.0.0.0"
    filled = load_settings({"upstream": args.upstream}, environ={"ENTROPY_PROXY_ADMIN_KEYS": "k1,k2"},
                           config_file=config)
    assert filled.admin_keys == ["k1", "k2"]


def test_k8s_admin_keys_come_from_a_secret_and_are_required() -> None:
    objs = _k8s()
    container = objs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    admin = env["ENTROPY_PROXY_ADMIN_KEYS"]["valueFrom"]["secretKeyRef"]
    assert admin["key"] == "admin_keys" and not admin.get("optional", False)
    api = env["ENTROPY_PROXY_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert api["name"] == admin["name"] and api["key"] == "api_keys"
    assert admin["name"] in (K8S / "kustomization.yaml").read_text()  # the apply instructions name the Secret
    config = yaml.safe_load(objs["ConfigMap"]["data"]["config.yaml"])
    assert "public" not in config.get("audit", {}) and "admin_keys" not in config  # keys never in the ConfigMap
    s = load_settings(config, environ={"ENTROPY_PROXY_ADMIN_KEYS": "from-the-secret"})
    assert s.admin_keys == ["from-the-secret"] and s.host == "0.0.0.0"
