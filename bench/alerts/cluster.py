"""Proxy replicas for the benchmark: ``entropy-proxy serve`` processes sharing one SQLite audit store.

Sharing the store is what makes them share baselines (an automatic baseline written by the first replica to
finish its warm-up, a pin made with ``entropy-proxy baseline pin``), as replicas of a deployment do. A replica
restarts on the same port, like a process restarted by its supervisor.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

MODEL = "smollm2"
# Sized for the benchmark's ~4 responses a simulated minute over 3 replicas (docs/alerts.md): a window of 200
# responses a replica is ~2.5 simulated hours; an automatic baseline after 100 responses and 6,000 tokens.
MONITORS = {"window": 200, "baseline": 6000, "baseline_responses": 100, "baseline_poll_s": 0.5,
            "collapse_reference": 100}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def entropy_proxy_bin() -> str:
    exe = Path(sys.executable).with_name("entropy-proxy")
    return str(exe) if exe.exists() else "entropy-proxy"


class Replica:
    def __init__(self, name: str, config: Path, workdir: Path) -> None:
        self.name, self.config, self.workdir = name, config, workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 60.0) -> None:
        log = (self.workdir / f"{self.name}.log").open("ab")
        self.proc = subprocess.Popen(
            [entropy_proxy_bin(), "serve", "--config", str(self.config), "--host", "127.0.0.1",
             "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                tail = (self.workdir / f"{self.name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"replica {self.name} exited: {tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {self.name} did not start in {timeout} s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/v1/entropy/status", timeout=10).json()


class Cluster:
    """``n`` replicas in front of ``upstream``; a context manager that stops them all."""

    def __init__(self, upstream: str, workdir: Path, n: int = 3) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.config = workdir / "proxy.yaml"
        self.config.write_text(yaml.safe_dump({
            "upstream": upstream, "models": [MODEL], "log_level": "warning",
            "audit": {"url": f"sqlite:///{workdir / 'audit.db'}", "sample_rate": 0.0},
            "monitors": MONITORS,
        }))
        self.replicas = [Replica(chr(ord("a") + i), self.config, workdir) for i in range(n)]

    def __enter__(self) -> Cluster:
        for r in self.replicas:
            r.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for r in self.replicas:
            r.stop()

    def baseline_cli(self, *args: str) -> str:
        out = subprocess.run([entropy_proxy_bin(), "baseline", *args, "--config", str(self.config)],
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"entropy-proxy baseline {' '.join(args)}: {out.stdout}{out.stderr}")
        return out.stdout

    def baseline_in_use(self, replica: Replica) -> dict[str, Any] | None:
        model = replica.status().get("models", {}).get(MODEL) or {}
        return (model.get("baseline") or {}).get("in_use")
