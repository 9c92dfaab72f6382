"""The audit trail inside the whole proxy: requests, feedback, metrics, the page and the report.

Two tiers: the recorded vLLM answers (fast, through ``create_app`` with every component) and the real vLLM
(CPU build, SmolLM2) behind the proxy on a real socket, driven by the official ``openai`` client.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from proxy.app import create_app
from proxy.cli_audit import add_parser
from proxy.settings import load_settings
from tests.plugins.recorded import UPSTREAM, RecordedUpstream
from tests.plugins.servers import serve_in_thread

CLIENT_KEY = "sk-client-NEVER-STORED-7731"
MARKER = "Xylophonic marmoset question"


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@contextlib.asynccontextmanager
async def app_client(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    # Entered inside the test: the app's lifespan owns task groups that must exit in the task that opened them.
    upstream = RecordedUpstream()
    upstream.serve("/v1/chat/completions", "chat_k20.json")
    settings = load_settings(
        {"upstream": UPSTREAM, "audit.url": f"sqlite:///{tmp_path}/audit.db", "audit.sample_rate": 0.0,
         "thresholds.confident_mean": 50.0},  # every answer counts as confident here
        environ={},
    )
    app = create_app(settings, transport=httpx.MockTransport(upstream))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as client:
            yield client, app


async def test_request_feedback_metrics_page(tmp_path: Path) -> None:
    async with app_client(tmp_path) as (client, app):
        await _request_feedback_metrics_page(client, app)


async def _request_feedback_metrics_page(client: httpx.AsyncClient, app: FastAPI) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={"model": "smollm2", "messages": [{"role": "user", "content": MARKER}], "max_tokens": 8},
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
    )
    assert r.status_code == 200, r.text
    rid = r.headers["X-Entropy-Request-Id"]
    assert "confident" in r.json()["choices"][0]["entropy"]["flags"]
    fb = await client.post("/v1/feedback", json={"id": rid, "correct": False, "note": "made up"})
    assert fb.status_code == 200, fb.text
    metrics = (await client.get("/metrics")).text
    assert _metric(metrics, "entropy_proxy_feedback_total", label="incorrect") == 1.0
    assert _metric(metrics, "entropy_proxy_confident_wrong_total") == 1.0
    assert 0.0 < _metric(metrics, "entropy_proxy_calibration", measure="brier") <= 1.0
    page = (await client.get("/audit")).text
    section = page.split('id="confident-wrong"')[1].split('id="calibration"')[0]
    assert f'data-id="{rid}"' in section
    dump = await app.state.audit_writer.store.dump_tables()
    cells = "\n".join(str(c) for rows in dump.values() for row in rows for c in row)
    assert rid in cells
    assert CLIENT_KEY not in cells and MARKER not in cells  # no key ever; no text with store_text off


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="entropy-proxy")
    add_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


QUESTIONS = [
    ("What is the capital of France? Answer in one word.", True),
    ("What is 2 + 2? Answer with a number.", False),
    ("Name the largest planet in the solar system.", True),
    ("What colour is the sky on a clear day?", False),
]


@pytest.mark.vllm
def test_real_vllm_feedback_report(vllm_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = f"sqlite:///{tmp_path}/audit.db"
    settings = load_settings(
        {"upstream": vllm_server, "audit.url": db, "audit.sample_rate": 0.0, "audit.store_text": True,
         "thresholds.confident_mean": 50.0},
        environ={},
    )
    labels: dict[str, bool] = {}
    with serve_in_thread(create_app(settings)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=120)
        for q, ok in QUESTIONS:
            raw = client.chat.completions.with_raw_response.create(
                model="smollm2", messages=[{"role": "user", "content": q}], max_tokens=16, temperature=0.0,
            )
            rid = raw.headers["x-entropy-request-id"]
            assert rid and rid == raw.parse().id
            labels[rid] = ok
        with httpx.Client(base_url=url, timeout=30) as http:
            for rid, ok in labels.items():
                r = http.post("/v1/feedback", json={"id": rid, "correct": ok})
                assert r.status_code == 200, r.text
            assert http.post("/v1/feedback", json={"id": "chatcmpl-unknown", "correct": True}).status_code == 404
            page = http.get("/audit").text
            metrics = http.get("/metrics").text
    wrong = {rid for rid, ok in labels.items() if not ok}
    section = page.split('id="confident-wrong"')[1].split('id="calibration"')[0]
    assert set(re.findall(r'class="resp confident-wrong" data-id="([^"]+)"', section)) == wrong
    assert _metric(metrics, "entropy_proxy_confident_wrong_total") == 2.0

    png = tmp_path / "reliability.png"
    assert _cli(["audit", "--url", db, "report", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    listed = out.split("Confident but wrong (2):")[1].split("Calibration")[0]
    assert {line.split()[0] for line in listed.strip().splitlines()} == wrong
    assert "labelled responses: 4 (2 correct, 2 incorrect)" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert _cli(["audit", "--url", db, "show", next(iter(wrong))]) == 0
    shown: Any = capsys.readouterr().out
    assert '"tokens": [' in shown and CLIENT_KEY not in shown
