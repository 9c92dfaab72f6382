"""The processes an overhead run compares: the replaying upstream, entropy-proxy, LiteLLM's proxy.

Each runs as its own subprocess on 127.0.0.1, so the load client never shares an interpreter with what it
measures. LiteLLM lives in its own virtual environment (``.venv-bench``, created on first use) and never enters
the project's ``.venv``. CPU time and RSS are read from ``/proc`` (the process and its children).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_VENV = ROOT / ".venv-bench"
LITELLM_SPEC = os.environ.get("BENCH_LITELLM_SPEC", "litellm[proxy]")
_TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d))
    return kids


def tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live children."""
    total = 0
    for p in tree(pid):
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(f[11]) + int(f[12])
    return total / _TICK


def rss_mb(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


@dataclass
class Target:
    name: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    version: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited ({proc.returncode}); log {log}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready after {timeout} s; log {log}")


def _spawn(name: str, argv: list[str], ready_path: str, port: int, workdir: Path, env: dict[str, str] | None = None,
           timeout: float = 60.0) -> Target:
    log = workdir / f"{name}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=workdir,
                                env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    t = Target(name, port, proc, log)
    try:
        _wait_http(f"http://127.0.0.1:{port}{ready_path}", proc, log, timeout)
    except BaseException:
        t.stop()
        raise
    return t


def start_upstream(workdir: Path, tokens: int) -> Target:
    port = free_port()
    argv = [sys.executable, "-m", "bench.replay_upstream", "--port", str(port), "--tokens", str(tokens)]
    return _spawn("upstream", argv, "/v1/models", port, workdir)


def start_proxy(workdir: Path, upstream: str, workers: int = 1, top_k: int = 20, rev: str | None = None,
                name: str = "proxy", env: dict[str, str] | None = None) -> Target:
    """entropy-proxy from this tree, or (``rev``) from a git revision of it, extracted into ``workdir`` with
    ``git archive`` so that before and after run side by side in one benchmark."""
    port = free_port()
    argv = [sys.executable, "-m", "proxy.cli", "serve", "--upstream", upstream, "--port", str(port)]
    if workers != 1:
        argv += ["--workers", str(workers)]
    env = {"ENTROPY_PROXY_AUDIT__URL": f"sqlite:///{workdir}/{name}-audit.db", "ENTROPY_PROXY_LOG_LEVEL": "warning",
           "ENTROPY_PROXY_TOP_K": str(top_k), **(env or {})}
    if rev is not None:
        tree = workdir / f"tree-{rev}"
        tree.mkdir(exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        env["PYTHONPATH"] = str(tree)
    t = _spawn(name, argv, "/readyz", port, workdir, env)
    from importlib.metadata import version

    t.version = f"entropy-proxy {version('entropy-proxy')}" + (f" ({name}: {rev})" if rev else "")
    return t


def ensure_litellm() -> Path:
    """The ``litellm`` script of ``.venv-bench``, installing ``litellm[proxy]`` there on first use."""
    exe = BENCH_VENV / "bin" / "litellm"
    if not exe.exists():
        print(f"creating {BENCH_VENV} with {LITELLM_SPEC} (once; about a minute)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        subprocess.run([str(BENCH_VENV / "bin" / "pip"), "install", "-q", LITELLM_SPEC], check=True)
    return exe


def start_litellm(workdir: Path, upstream: str, model: str) -> Target:
    exe = ensure_litellm()
    port = free_port()
    cfg = workdir / "litellm.yaml"
    cfg.write_text(
        "model_list:\n"
        f"  - model_name: {model}\n"
        "    litellm_params:\n"
        f"      model: hosted_vllm/{model}\n"
        f"      api_base: {upstream}/v1\n"
        "      api_key: none\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    env = {"LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true", "LITELLM_LOG": "ERROR",
           "LITELLM_TELEMETRY": "False", "PYTHONPATH": ""}
    argv = [str(exe), "--config", str(cfg), "--port", str(port), "--host", "127.0.0.1"]
    t = _spawn("litellm", argv, "/health/liveliness", port, workdir, env, timeout=180)
    out = subprocess.run([str(BENCH_VENV / "bin" / "python"), "-c",
                          "from importlib.metadata import version; print(version('litellm'))"],
                         capture_output=True, text=True, check=False)
    t.version = f"litellm {out.stdout.strip()}"
    return t


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="bench-overhead-"))
