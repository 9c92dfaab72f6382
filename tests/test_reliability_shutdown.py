"""Graceful shutdown: ``entropy-proxy serve`` as a real process, streams in flight, SIGTERM.

The listener closes at once (new connections are refused), the streams in flight run to ``data: [DONE]``, the
audit records of those streams (which finish after the signal) are in the database, and the exit code is 0.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from bench.replay_upstream import start_replay_upstream
from tests.plugins.reliability_support import CHAT, chat_body, sse_events
from tests.plugins.servers import free_port

STREAMS = 4


def _wait_up(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("the proxy did not start")


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except (ConnectionRefusedError, TimeoutError):
        return True
    return False


@pytest.mark.slow
def test_sigterm_finishes_streams_flushes_audit_and_exits_zero(tmp_path: Path) -> None:
    url, stop = start_replay_upstream(tokens=60, token_delay_ms=100)  # each stream takes about 6 s
    db = tmp_path / "audit.db"
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(f"models: [smollm2]\naudit:\n  url: sqlite:///{db}\n  sample_rate: 1.0\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENTROPY_PROXY_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--upstream", url, "--port", str(port), "--config", str(cfg)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    try:
        _wait_up(port, proc)
        started = threading.Barrier(STREAMS + 1, timeout=20)
        results: list[bytes] = []
        errors: list[BaseException] = []

        def client() -> None:
            try:
                with httpx.stream("POST", f"http://127.0.0.1:{port}{CHAT}", json=chat_body(stream=True),
                                  timeout=30) as r:
                    it = r.iter_raw()
                    first = next(it)
                    started.wait()
                    results.append(first + b"".join(it))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=client) for _ in range(STREAMS)]
        for t in threads:
            t.start()
        started.wait()
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30  # bounds a hang; the claim is the order of events below
        while not _refused(port) and time.monotonic() < deadline:
            time.sleep(0.05)
        # "At once": the listener is closed while every stream is still in flight (none has finished).
        in_flight = sum(t.is_alive() for t in threads)
        assert _refused(port), "the proxy still accepts connections after SIGTERM"
        assert not results and in_flight == STREAMS, (len(results), in_flight)
        for t in threads:
            t.join(30)
        code = proc.wait(40)
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        assert not errors, errors
        assert code == 0, stderr
        assert len(results) == STREAMS
        for body in results:
            evs = sse_events(body)
            assert evs[-1] == "[DONE]" and not any(isinstance(e, dict) and "error" in e for e in evs)
            assert evs[-2]["choices"][0]["entropy"]["tokens"] == 60
        with sqlite3.connect(db) as con:
            (n,) = con.execute("select count(*) from audit_responses").fetchone()
        assert n == STREAMS  # recorded after the signal: the queue was flushed on the way out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        stop()
