"""`entropy-proxy baseline save|load|show` against a real proxy-like server (uvicorn on a free port)."""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from proxy import cli_baseline, metrics
from proxy.observe import ObserverHub
from proxy.settings import load_settings

from .synthetic import observation, token_entropies


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="entropy-proxy")
    cli_baseline.add_parser(p.add_subparsers(dest="command"))
    return p


def _run(*argv: str) -> int:
    args = _parser().parse_args(list(argv))
    return int(args.func(args))


@pytest.fixture()
def server():  # type: ignore[no-untyped-def]
    s = load_settings({"upstream": "http://u", "models": ["m"], "monitors.baseline": 1_000}, environ={})
    app, hub = FastAPI(), ObserverHub()
    metrics.install(app, s, hub, CollectorRegistry())
    rng = np.random.default_rng(0)
    for _ in range(20):
        hub.observe(observation(token_entropies(rng), "some text", model="m"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="error"))
    th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    th.join(5)
    sock.close()


def test_save_show_load(server, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "base.json"
    assert _run("baseline", "save", str(f), "--url", server) == 0
    data = json.loads(f.read_text())
    assert data["models"]["m"]["drift"]["complete"] is True
    assert _run("baseline", "show", str(f)) == 0
    out = capsys.readouterr().out
    assert "model m:" in out and "[0, 0.01)" in out
    assert _run("baseline", "load", str(f)) == 0
    assert "ENTROPY_PROXY_MONITORS__BASELINE_FILE=" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "entropy-proxy-baseline", "version": 1,
                               "models": {"m": {"drift": {"edges": [0, 1, 2], "token_counts": [1]}}}}))
    with pytest.raises(SystemExit, match="token_counts"):
        _run("baseline", "load", str(bad))


def test_save_unreachable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    assert _run("baseline", "save", str(tmp_path / "x.json"), "--url", f"http://127.0.0.1:{port}") == 1
