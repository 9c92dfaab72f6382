"""A real vLLM (CPU build) serving SmolLM2-135M-Instruct, run as a child process for the demo and the tests.

The proxy itself never imports vLLM: vLLM lives in its own environment (``.venv-vllm/``, made by
``scripts/setup-vllm.sh``) and this module only starts its OpenAI server and talks HTTP to it, so it needs
nothing beyond the standard library and httpx.

    with LocalVLLM() as vllm:          # blocks until GET /v1/models answers (about 40 s on 2 cores)
        httpx.post(vllm.base_url + "/v1/chat/completions", json={...})

Paths come from the environment when set: ``ENTROPY_PROXY_VLLM_PYTHON`` (the python that has vLLM) and
``ENTROPY_PROXY_VLLM_MODEL_DIR`` (a Hugging Face model directory); otherwise from the repository checkout.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx

REPO = Path(__file__).resolve().parent.parent
SERVED_MODEL_NAME = "smollm2"
SETUP_HINT = "run `scripts/setup-vllm.sh` (or `make setup`) first"

# Fixed for comparability with the exact-entropy reference (float32 agrees with transformers to < 1e-4) and
# small enough for a 2-core machine's memory: 2 GiB of KV cache holds many 2048-token sequences of this model.
_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    # vLLM 0.32 CPU cannot load its own AOT compile cache ("'function' object has no attribute
    # 'finalize_loading'") and recompiles on every start; the older torch.compile cache does load.
    "VLLM_USE_AOT_COMPILE": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def die_with_parent(sig: int = signal.SIGUSR1) -> Callable[[], None] | None:
    """A ``preexec_fn`` by which Linux sends the child ``sig`` when its parent dies (None elsewhere).

    Linux ties this to the spawning *thread*: spawn from the main one. Resolved here, not in the child, where
    only a plain call is safe after fork.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, int(sig))


# A killed pytest or demo must not leave vLLM holding the cores. vLLM itself cannot be that child: it ignores
# SIGTERM while starting, and its engine core outlives a SIGKILLed API server. So a tiny sh is the group
# leader; on its parent's death it kills the whole group. A plain SIGTERM to the group still reaches vLLM.
_WATCHDOG = 'trap "kill -KILL 0" USR1; "$@" & wait $!'
_PREEXEC = die_with_parent(signal.SIGUSR1)


class VLLMStartError(RuntimeError):
    """vLLM is not installed, has no model, exited during start-up, or did not become ready in time."""


def _candidates(env_key: str, relative: str) -> list[Path]:
    if os.environ.get(env_key):
        return [Path(os.environ[env_key]).expanduser()]
    # An editable install finds the checkout next to this package; a plain install looks in the working dir.
    return [REPO / relative, Path.cwd() / relative]


def vllm_python() -> Path:
    """The python of the environment that has vLLM (it may not exist yet: check before use)."""
    found = _candidates("ENTROPY_PROXY_VLLM_PYTHON", ".venv-vllm/bin/python")
    return next((p for p in found if p.exists()), found[0])


def model_dir() -> Path:
    """The float32 SmolLM2 directory made by ``scripts/prepare_model.py`` (it may not exist yet)."""
    found = _candidates("ENTROPY_PROXY_VLLM_MODEL_DIR", ".cache/models/smollm2-135m-instruct")
    return next((p for p in found if (p / "config.json").is_file()), found[0])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalVLLM:
    """Start ``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1; a context manager.

    ``start()`` = ``spawn()`` then ``wait_ready()``; callers that want the warm-up to overlap
    other work call ``spawn()`` early and ``wait_ready()`` when they need the server. ``stop()`` ends the
    whole process group (vLLM runs its engine core in a child process): SIGTERM first, SIGKILL after a
    grace period.

    ``torch_compile=False`` (the default) runs the model eagerly: seen on 2 shared cores, ready in 35-40 s
    instead of 90-110 s (warm compile cache) or 130-235 s (cold), for 17 instead of 20 tokens/s on one stream
    and 114 instead of 143 tokens/s over 16 streams (top_logprobs 20). Throughput benchmarks pass
    ``torch_compile=True``.
    """

    def __init__(
        self,
        *,
        python: str | os.PathLike[str] | None = None,
        model: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        served_model_name: str = SERVED_MODEL_NAME,
        max_model_len: int = 2048,
        torch_compile: bool = False,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 300.0,
    ) -> None:
        self.python = Path(python) if python else vllm_python()
        self.model = Path(model) if model else model_dir()
        self.host = host
        self.port = port or free_port(host)
        self.served_model_name = served_model_name
        self.max_model_len = max_model_len
        self.torch_compile = torch_compile
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.log_path = Path(log_path) if log_path else REPO / ".cache" / "logs" / f"vllm-{self.port}.log"
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.ready_after: float | None = None  # seconds from spawn to the first answer of GET /v1/models
        self._spawned_at = 0.0

    @property
    def base_url(self) -> str:
        """``http://host:port`` without ``/v1``."""
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model),
            "--served-model-name", self.served_model_name,
            "--host", self.host,
            "--port", str(self.port),
            "--max-model-len", str(self.max_model_len),
            "--dtype", "float32",
            *([] if self.torch_compile else ["--enforce-eager"]),
            *self.extra_args,
        ]  # fmt: skip

    def spawn(self) -> None:
        if self.process is not None:
            return
        if not self.python.exists():
            raise VLLMStartError(f"no vLLM environment at {self.python}: {SETUP_HINT}")
        if not (self.model / "config.json").is_file():
            raise VLLMStartError(f"no model directory at {self.model}: {SETUP_HINT}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **_ENV, **self.env}
        with open(self.log_path, "wb") as log:
            # Our own session (process group) so stop() reaches the engine-core child too, and a Ctrl-C meant
            # for the parent does not kill vLLM before we stop it in order.
            argv = ["/bin/sh", "-c", _WATCHDOG, "sh", *self.command()] if _PREEXEC else self.command()
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_PREEXEC,
            )
        self._spawned_at = time.monotonic()

    def wait_ready(self) -> None:
        if self.process is None:
            self.spawn()
        assert self.process is not None
        if self.ready_after is not None:
            return
        deadline = self._spawned_at + self.startup_timeout
        with httpx.Client(timeout=5.0) as client:
            while True:
                code = self.process.poll()
                if code is not None:
                    raise VLLMStartError(f"vLLM exited with code {code} during start-up; {self._log_note()}")
                try:
                    if client.get(self.base_url + "/v1/models").status_code == 200:
                        self.ready_after = time.monotonic() - self._spawned_at
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise VLLMStartError(
                        f"vLLM not ready after {self.startup_timeout:.0f} s; {self._log_note()}"
                    )
                time.sleep(1.0)

    def start(self) -> LocalVLLM:
        try:
            self.spawn()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace: float = 20.0) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the group id is the leader's pid
        _signal_group(pgid, signal.SIGTERM)
        # Wait for the group, not the leader: the API server and its engine core wind down after the leader.
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap our own child, or it stays in the group as a zombie
            if not _group_alive(pgid):
                break
            time.sleep(0.2)
        _signal_group(pgid, signal.SIGKILL)
        proc.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _log_note(self) -> str:
        return f"log {self.log_path}, last lines:\n{self.log_tail()}"

    def __enter__(self) -> LocalVLLM:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
