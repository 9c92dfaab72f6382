"""``entropy-proxy serve --workers 2`` as real processes: both workers answer on the one port, ``/metrics`` counts
every request whichever worker served it, a killed worker is replaced, SIGTERM drains the streams of both."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.replay_upstream import start_replay_upstream
from proxy.workers.aggregate import merge, render
from tests.plugins.reliability_support import CHAT, chat_body, sse_events
from tests.plugins.servers import free_port

WORKER = "x-entropy-proxy-worker"
TOKENS = 12


def _wait_up(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("the proxy did not start")


def _workers_seen(port: int, want: set[str], tries: int = 400) -> set[str]:
    """Fresh connections until every worker in ``want`` has answered one (the kernel picks the worker)."""
    seen: set[str] = set()
    for _ in range(tries):
        r = httpx.get(f"http://127.0.0.1:{port}/healthz", headers={"connection": "close"}, timeout=10)
        seen.add(r.headers[WORKER])
        if want <= seen:
            break
    return seen


@pytest.fixture
def upstream() -> Iterator[tuple[str, object]]:
    url, stop = start_replay_upstream(tokens=TOKENS)
    yield url, stop
    stop()


def _start(url: str, tmp_path: Path, port: int) -> subprocess.Popen[bytes]:
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(f"models: [smollm2]\naudit:\n  url: sqlite:///{tmp_path / 'audit.db'}\n  sample_rate: 1.0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENTROPY_PROXY_")}
    return subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--upstream", url, "--port", str(port), "--config", str(cfg),
         "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    if proc.stderr is not None:
        proc.stderr.close()


def _sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def _worker_pids(supervisor: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            environ = Path(f"/proc/{d}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != supervisor:
            continue
        for kv in environ:
            if kv.startswith(b"ENTROPY_PROXY_WORKER_INDEX="):
                out[kv.split(b"=", 1)[1].decode()] = int(d)
    return out


@pytest.mark.slow
def test_two_workers_one_port_metrics_summed_and_restart(upstream: tuple[str, object], tmp_path: Path) -> None:
    url, _ = upstream
    port = free_port()
    proc = _start(url, tmp_path, port)
    try:
        _wait_up(port, proc)
        assert _workers_seen(port, {"0", "1"}) == {"0", "1"}
        served: dict[str, int] = {}
        sent = 0
        # Each request on its own connection; go on until both workers served chat requests (at least 20 sent).
        while sent < 20 or len(served) < 2:
            assert sent < 400, served
            body = chat_body(stream=sent % 2 == 1, max_tokens=TOKENS)
            r = httpx.post(f"http://127.0.0.1:{port}{CHAT}", json=body, headers={"connection": "close"}, timeout=30)
            assert r.status_code == 200, r.text
            served[r.headers[WORKER]] = served.get(r.headers[WORKER], 0) + 1
            sent += 1
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        assert _sample(text, "entropy_proxy_requests_total", endpoint="chat", status="200") == sent
        assert _sample(text, "entropy_proxy_tokens_total", model="smollm2") == sent * TOKENS
        assert _sample(text, "entropy_proxy_overhead_seconds_count", endpoint="chat") == sent
        assert _sample(text, "entropy_proxy_workers") == 2 and _sample(text, "entropy_proxy_workers_scraped") == 2
        # one series per model for the monitors' gauges, as from one proxy
        states = [s for f in text_string_to_metric_families(text) if f.name == "entropy_proxy_entropy_state"
                  for s in f.samples if s.value == 1.0 and s.labels["model"] == "smollm2"]
        assert len(states) == 1

        # A worker killed outright is replaced under the same index; the totals keep the survivors' counts.
        pids = _worker_pids(proc.pid)
        assert set(pids) == {"0", "1"}
        os.kill(pids["1"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while _worker_pids(proc.pid).get("1") in (None, pids["1"]):
            assert time.monotonic() < deadline, "worker 1 was not restarted"
            time.sleep(0.2)
        assert _workers_seen(port, {"0", "1"}) == {"0", "1"}
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        assert _sample(text, "entropy_proxy_requests_total", endpoint="chat", status="200") == served["0"]
    finally:
        _stop(proc)


@pytest.mark.slow
def test_sigterm_drains_streams_on_every_worker(tmp_path: Path) -> None:
    url, stop = start_replay_upstream(tokens=40, token_delay_ms=100)  # each stream takes about 4 s
    port = free_port()
    proc = _start(url, tmp_path, port)
    try:
        _wait_up(port, proc)
        started: dict[str, threading.Event] = {"0": threading.Event(), "1": threading.Event()}
        mine: list[threading.Event] = []  # one per client: its stream is in flight
        go = threading.Event()
        results: dict[int, tuple[str, bytes]] = {}
        errors: list[BaseException] = []

        def client(i: int) -> None:
            try:
                with httpx.stream("POST", f"http://127.0.0.1:{port}{CHAT}", json=chat_body(stream=True),
                                  timeout=60) as r:
                    w = r.headers[WORKER]
                    it = r.iter_raw()
                    first = next(it)
                    started[w].set()
                    mine[i].set()
                    go.wait(60)
                    results[i] = (w, first + b"".join(it))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads: list[threading.Thread] = []
        while not all(e.is_set() for e in started.values()):  # streams in flight on both workers
            assert len(threads) < 40 and not errors, errors
            mine.append(threading.Event())
            t = threading.Thread(target=client, args=(len(threads),))
            t.start()
            threads.append(t)
            for e in started.values():
                e.wait(0.5)
        for e in mine:  # every client's stream in flight (none still connecting) before the signal
            assert e.wait(30) or errors, "a stream did not start"
        assert not errors, errors
        proc.send_signal(signal.SIGTERM)
        go.set()
        for t in threads:
            t.join(60)
        code = proc.wait(60)
        assert not errors, errors
        assert code == 0, proc.stderr.read().decode() if proc.stderr else ""
        assert {w for w, _ in results.values()} == {"0", "1"}
        for _, body in results.values():
            evs = sse_events(body)
            assert evs[-1] == "[DONE]" and not any(isinstance(e, dict) and "error" in e for e in evs)
            assert evs[-2]["choices"][0]["entropy"]["tokens"] == 40
    finally:
        _stop(proc)
        stop()


def test_merge_sums_counters_and_histograms_keeps_leader_gauges() -> None:
    leader = ('# HELP r_total Requests.\n# TYPE r_total counter\nr_total{m="a"} 3.0\n'
              '# HELP h Hist.\n# TYPE h histogram\nh_bucket{le="1.0"} 1.0\nh_bucket{le="+Inf"} 2.0\n'
              'h_count 2.0\nh_sum 1.5\n# HELP g Gauge.\n# TYPE g gauge\ng{m="a"} 0.25\n')
    other = ('# HELP r_total Requests.\n# TYPE r_total counter\nr_total{m="a"} 4.0\nr_total{m="b"} 1.0\n'
             '# HELP h Hist.\n# TYPE h histogram\nh_bucket{le="1.0"} 5.0\nh_bucket{le="+Inf"} 5.0\n'
             'h_count 5.0\nh_sum 2.0\n# HELP g Gauge.\n# TYPE g gauge\ng{m="a"} 0.9\ng{m="b"} 0.5\n')
    text = render(merge([leader, other])).decode()
    assert _sample(text, "r_total", m="a") == 7 and _sample(text, "r_total", m="b") == 1
    assert _sample(text, "h_bucket", le="1.0") == 6 and _sample(text, "h_bucket", le="+Inf") == 7
    assert _sample(text, "h_count") == 7 and _sample(text, "h_sum") == 3.5
    assert _sample(text, "g", m="a") == 0.25  # the leader's
    assert _sample(text, "g", m="b") == 0.5  # only another worker has it


def test_leader_is_worker_zero_or_a_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import CollectorRegistry

    from proxy.app import create_app
    from proxy.settings import Settings
    from proxy.workers import env as wenv

    s = Settings(upstream="http://127.0.0.1:9")
    for k in (wenv.INDEX, wenv.COUNT, wenv.RUN_DIR, wenv.SECRET):
        monkeypatch.delenv(k, raising=False)
    assert create_app(s, registry=CollectorRegistry(), components=()).state.is_leader is True
    monkeypatch.setenv(wenv.INDEX, "1")
    monkeypatch.setenv(wenv.COUNT, "2")
    assert create_app(s, registry=CollectorRegistry(), components=()).state.is_leader is False
    monkeypatch.setenv(wenv.INDEX, "0")
    assert create_app(s, registry=CollectorRegistry(), components=()).state.is_leader is True
