"""The supervisor of ``serve --workers N`` and the worker processes' entry point.

The supervisor binds the listening socket once and starts N worker processes (``spawn``: a fresh interpreter
each, nothing inherited but the socket) that all accept on it — the kernel hands each new connection to one of
them. A worker that exits on its own (a crash, an OOM kill) is started again under the same index, unless it
keeps dying right after start (then the supervisor stops: the configuration is broken). SIGTERM or SIGINT to the
supervisor is passed to every worker as SIGTERM: each stops accepting, finishes its in-flight requests and
streams (up to ``SHUTDOWN_DEADLINE_S``), runs its shutdown (audit queue flushed) and exits 0; the supervisor
exits 0 when all have, 1 if one had to be killed.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

from . import env as wenv

log = logging.getLogger("entropy_proxy.workers")

SHUTDOWN_DEADLINE_S = 30  # as single-process serve: in-flight streams get this long to finish
CRASH_LOOP_S = 5.0  # a worker that dies this soon after start, three times running, stops the supervisor
CRASH_LOOP_COUNT = 3


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve_worker(
    index: int, count: int, run_dir: str, secret: str, overrides: dict[str, Any], config_file: str | None,
    sock: socket.socket,
) -> None:
    """One worker process: the app on the shared socket and on its private Unix socket."""
    os.environ.update({wenv.INDEX: str(index), wenv.COUNT: str(count), wenv.RUN_DIR: run_dir,
                       wenv.SECRET: secret})
    import uvicorn

    from ..app import create_app
    from ..settings import load_settings
    from .aggregate import WorkerMiddleware

    settings = load_settings(overrides, config_file=config_file)
    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s [worker {index}] %(name)s: %(message)s")
    me = wenv.worker_env()
    app = create_app(settings)
    app.state.is_leader = me.is_leader
    private = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = me.socket_path(index)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # left by this index's previous process
    private.bind(str(path))
    private.listen(64)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # exit 0 after a graceful stop (see proxy.cli)
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    _exit_with_parent(server_exit=lambda: os.kill(os.getpid(), signal.SIGTERM))
    server = Server(uvicorn.Config(
        WorkerMiddleware(app, me), log_level=settings.log_level, access_log=False,
        timeout_graceful_shutdown=SHUTDOWN_DEADLINE_S, lifespan="on",
    ))
    gc.freeze()  # see proxy.cli: start-up objects out of the collector's reach
    server.run(sockets=[sock, private])
    sys.exit(0 if server.started else 3)


def _exit_with_parent(server_exit: Any) -> None:
    """A supervisor that vanished without passing on a signal (SIGKILL, OOM) must not leave workers serving
    on its port: each worker then drains and exits as on SIGTERM."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        log.warning("supervisor (pid %d) is gone; draining", parent)
        server_exit()

    threading.Thread(target=watch, name="entropy-proxy-parent-watch", daemon=True).start()


class Supervisor:
    def __init__(self, overrides: dict[str, Any], config_file: str | None, host: str, port: int, count: int) -> None:
        self.overrides, self.config_file, self.count = overrides, config_file, count
        self.sock = _bind(host, port)
        self.run_dir = tempfile.mkdtemp(prefix="entropy-proxy-workers-")
        self.secret = secrets.token_hex(16)
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: dict[int, BaseProcess] = {}
        self.started_at: dict[int, float] = {}
        self.quick_deaths: dict[int, int] = {}
        self.stopping = False

    def _start(self, index: int) -> None:
        p = self.ctx.Process(target=serve_worker, name=f"entropy-proxy-worker-{index}", args=(
            index, self.count, self.run_dir, self.secret, self.overrides, self.config_file, self.sock))
        mine = {wenv.INDEX: str(index), wenv.COUNT: str(self.count), wenv.RUN_DIR: self.run_dir,
                wenv.SECRET: self.secret}
        saved = {k: os.environ.get(k) for k in mine}
        os.environ.update(mine)  # the child's environment from its first instruction (and visible in /proc)
        try:
            p.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.procs[index] = p
        self.started_at[index] = time.monotonic()
        log.info("worker %d started (pid %s)", index, p.pid)

    def _stop(self, sig: int, frame: Any) -> None:
        if not self.stopping:
            log.info("signal %d: draining %d workers", sig, len(self.procs))
        self.stopping = True
        for p in self.procs.values():
            if p.is_alive() and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        try:
            for i in range(self.count):
                self._start(i)
            failed = False
            while not self.stopping:
                wait([p.sentinel for p in self.procs.values()], timeout=0.5)
                for i, p in list(self.procs.items()):
                    if p.is_alive() or self.stopping:
                        continue
                    quick = time.monotonic() - self.started_at[i] < CRASH_LOOP_S
                    self.quick_deaths[i] = self.quick_deaths.get(i, 0) + 1 if quick else 0
                    log.warning("worker %d (pid %s) exited with %s", i, p.pid, p.exitcode)
                    if self.quick_deaths[i] >= CRASH_LOOP_COUNT:
                        log.error("worker %d keeps failing at start; stopping", i)
                        failed = True
                        self._stop(signal.SIGTERM, None)
                        break
                    self._start(i)
            deadline = time.monotonic() + SHUTDOWN_DEADLINE_S + 15
            for p in self.procs.values():
                p.join(max(0.1, deadline - time.monotonic()))
            killed = [p for p in self.procs.values() if p.is_alive()]
            for p in killed:
                p.kill()
                p.join(5)
            clean = all(p.exitcode == 0 for p in self.procs.values())
            return 1 if failed or killed or not clean else 0
        finally:
            self.sock.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)


def supervise(overrides: dict[str, Any], config_file: str | None, count: int) -> int:
    from ..settings import load_settings

    settings = load_settings(overrides, config_file=config_file)  # checked once here: a bad one never forks
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s [supervisor] %(name)s: %(message)s")
    try:
        sup = Supervisor(overrides, config_file, settings.host, settings.port, count)
    except OSError as e:
        print(f"entropy-proxy: cannot listen on {settings.host}:{settings.port}: {e}", file=sys.stderr)
        return 1
    return sup.run()

