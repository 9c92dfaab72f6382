"""Real servers in threads: uvicorn for the proxy (and fake upstreams), on 127.0.0.1 and a free port.

httpx.ASGITransport buffers whole bodies, so anything about time-to-first-byte, disconnects or streaming
runs against a real socket.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # a thread cannot own signal handlers
        pass


@contextlib.contextmanager
def serve_in_thread(app: Any, port: int | None = None, **kwargs: Any) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread; yields its base URL; stops it on exit."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, **kwargs)
    server = _Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@pytest.fixture
def serve():
    """``with serve(app) as url:`` — a real server for one test."""
    return serve_in_thread
