"""A real Prometheus (Debian's ``prometheus`` binary) for tests, and a small client for its HTTP API.

``start_prometheus(targets, rule_files, tmp_path)`` writes a test configuration (scrape and evaluation every
second), starts the server on 127.0.0.1 with a temporary TSDB and stops it on exit. The project's rules are
loaded with every duration compressed by :func:`compress_rules` (1 minute -> 1 second by default), so a
30-minute window, a 15-minute ``for`` and a day-long baseline play out in 30 s, 15 s and 24 min.

Without the binary the ``prometheus_bin`` fixture skips; under CI (``CI=1``, ``true`` or ``yes``) it fails instead.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.plugins.ci_guard import unavailable
from tests.plugins.servers import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
PROJECT_RULES = [ROOT / "deploy" / "prometheus" / "rules" / n for n in ("recording.yml", "alerts.yml")]
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# A PromQL or `for:` duration such as 5m, 1d, 90s; not the "5m" inside a name like mean5m or p80_30m.
_DURATION = re.compile(r"(?<![\w.:])(\d+)([smhd])(?![\w])")


def compress_durations(text: str, factor: int = 60) -> str:
    """Divide every duration in a PromQL expression (or a ``for`` value) by ``factor``, in whole seconds."""

    def shorten(m: re.Match[str]) -> str:
        seconds = int(m.group(1)) * _UNITS[m.group(2)]
        return f"{max(1, seconds // factor)}s"

    return _DURATION.sub(shorten, text)


def compress_rules(paths: list[Path] = PROJECT_RULES, factor: int = 60) -> list[dict[str, Any]]:
    """The rule groups of ``paths`` with every window, offset and ``for`` divided by ``factor``."""
    groups = []
    for path in paths:
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules = []
            for rule in group["rules"]:
                rule = dict(rule, expr=compress_durations(rule["expr"], factor))
                if "for" in rule:
                    rule["for"] = compress_durations(rule["for"], factor)
                rules.append(rule)
            groups.append(dict(group, rules=rules))
    return groups


class PrometheusAPI:
    """Thin client for the HTTP API (``/api/v1/...``); raises on an error status."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=10.0)

    def _get(self, path: str, **params: Any) -> Any:
        r = self.http.get(path, params=params)
        body = r.json()
        if r.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {r.status_code} {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query at the server's now; the vector's samples (``metric`` and ``value``)."""
        data = self._get("/api/v1/query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def alerts(self, name: str | None = None) -> list[dict[str, Any]]:
        """Active alerts (pending and firing), optionally of one alert name."""
        alerts = self._get("/api/v1/alerts")["alerts"]
        return [a for a in alerts if name is None or a["labels"].get("alertname") == name]

    def rules(self) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/rules")["groups"])

    def targets(self) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/targets")["activeTargets"])

    def wait_for(self, what: str, predicate: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(every)


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        unavailable("Debian's prometheus is not on PATH (apt-get install -y prometheus)")
    return path


@contextlib.contextmanager
def start_prometheus(
    targets: dict[str, list[str]], rule_groups: list[dict[str, Any]], workdir: Path, *, binary: str,
    interval: str = "1s",
) -> Iterator[PrometheusAPI]:
    """Run Prometheus scraping ``targets`` (job: ``host:port`` list) and ``rule_groups``; yields the API."""
    workdir.mkdir(parents=True, exist_ok=True)
    rules_file = workdir / "rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": rule_groups}, sort_keys=False))
    config = {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "rule_files": [str(rules_file)],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": hosts}]}
                           for job, hosts in targets.items()],
    }
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    log = (workdir / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={config_file}", f"--storage.tsdb.path={workdir / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    api = PrometheusAPI(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(workdir / 'prometheus.log').read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if api.http.get("/-/ready").status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("prometheus did not become ready in 30 s")
            time.sleep(0.1)
        yield api
    finally:
        api.http.close()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def prometheus_bin() -> str:
    return prometheus_binary()
