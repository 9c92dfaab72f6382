"""A real Arize Phoenix (``.venv-phoenix``, installed by ``scripts/setup-phoenix.sh`` from ``make setup-test``) for
the ``phoenix`` tier and for the docs' screenshot: started on 127.0.0.1 and free ports with a temporary working
directory, offline, stopped on exit. Spans are read back through Phoenix's own REST API.

Without ``.venv-phoenix`` the tier skips; with ``CI=true`` it fails instead, as it does when Phoenix does not come
up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.plugins.ci_guard import unavailable
from tests.plugins.servers import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
PHOENIX = Path(os.environ.get("PHOENIX_VENV", ROOT / ".venv-phoenix")) / "bin" / "phoenix"
START_TIMEOUT_S = 240.0  # about 40 s on a 2-core machine; more while other tiers load it


@contextlib.contextmanager
def start_phoenix(workdir: str | None = None) -> Iterator[str]:
    """Yields Phoenix's base URL (UI, REST API and OTLP/HTTP at ``/v1/traces``)."""
    if not PHOENIX.exists():
        unavailable(f"{PHOENIX} is missing: run scripts/setup-phoenix.sh (make setup-test)")
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="phoenix-"))
        port = free_port()
        env = {
            **os.environ, "PHOENIX_WORKING_DIR": workdir, "PHOENIX_HOST": "127.0.0.1", "PHOENIX_PORT": str(port),
            "PHOENIX_GRPC_PORT": str(free_port()), "PHOENIX_TELEMETRY_ENABLED": "false",
        }
        for name in list(env):  # Phoenix's own process must not export its traces anywhere
            if name.startswith("OTEL_"):
                del env[name]
        log = open(Path(workdir) / "phoenix.log", "w+b")  # noqa: SIM115 - closed below
        stack.callback(log.close)
        proc = subprocess.Popen([str(PHOENIX), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    unavailable(f"Phoenix exited with {proc.returncode}: {log.read()[-2000:].decode(errors='replace')}")
                try:
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    unavailable(f"Phoenix did not answer on {url} within {START_TIMEOUT_S:.0f} s")
                time.sleep(0.5)
            yield url
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)


class PhoenixAPI:
    def __init__(self, url: str, project: str = "default") -> None:
        self.http = httpx.Client(base_url=url, timeout=10.0)
        self.project = project

    def __enter__(self) -> PhoenixAPI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def spans(self, trace_id: str) -> list[dict[str, Any]]:
        r = self.http.get(f"/v1/projects/{self.project}/spans", params={"trace_id": trace_id, "limit": 100})
        if r.status_code == 404:  # the project is created by the first span Phoenix ingests
            return []
        r.raise_for_status()
        return list(r.json()["data"])

    def wait_spans(self, trace_id: str, count: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Phoenix ingests asynchronously: wait for ``count`` spans of the trace (an event, with a deadline)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans(trace_id)
            if len(spans) >= count:
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"Phoenix has {len(spans)} spans of trace {trace_id}, expected {count}")
            time.sleep(0.25)
