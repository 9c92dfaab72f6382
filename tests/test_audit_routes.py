"""``POST /v1/feedback`` and ``GET /audit`` on a FastAPI app built from ``proxy.audit.install``."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from proxy.audit import install
from proxy.audit.routes import MAX_FEEDBACK_BYTES
from proxy.audit.writer import AuditWriter
from proxy.observe import ObserverHub
from proxy.settings import load_settings
from tests.test_audit_store import COMPLETION_TOKENS, make_obs
from tests.test_audit_writer import FakeMetrics

ADMIN = "admin-key-0123456789"


async def _client(tmp_path: Path, **audit: Any) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI, ObserverHub]]:
    overrides: dict[str, Any] = {"upstream": "http://127.0.0.1:9", "audit.url": f"sqlite:///{tmp_path}/a.db"}
    overrides.update({f"audit.{k}": v for k, v in audit.items() if k != "admin_keys"})
    if "admin_keys" in audit:
        overrides["admin_keys"] = audit["admin_keys"]
    settings = load_settings(overrides, environ={})
    app = FastAPI()
    app.state.metrics = FakeMetrics()
    hub = ObserverHub()
    cm = install(app, settings, hub, None)
    assert cm is not None
    async with cm:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            yield client, app, hub


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI, ObserverHub]]:
    async for x in _client(tmp_path, sample_rate=0.0):
        yield x


@pytest.fixture
async def admin_env(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI, ObserverHub]]:
    async for x in _client(tmp_path, sample_rate=0.0, store_text=True, admin_keys=[ADMIN, "second-key"]):
        yield x


def _err(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
    assert body["error"]["param"] == param
    return body["error"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"correct": True}, "id"),
        ({"id": "", "correct": True}, "id"),
        ({"id": 5, "correct": True}, "id"),
        ({"id": "x" * 300, "correct": True}, "id"),
        ({"id": "r"}, "correct"),
        ({"id": "r", "correct": "yes"}, "correct"),
        ({"id": "r", "correct": 1}, "correct"),
        ({"id": "r", "correct": True, "score": "high"}, "score"),
        ({"id": "r", "correct": True, "score": True}, "score"),
        ({"id": "r", "correct": True, "note": 7}, "note"),
        ({"id": "r", "correct": True, "note": "n" * 5000}, "note"),
        ({"id": "r", "correct": True, "reference": 5}, "reference"),
        ({"id": "r", "correct": True, "reference": ["a"]}, "reference"),
        ({"id": "r", "correct": True, "reference": "  \n"}, "reference"),
        ({"id": "r", "correct": True, "reference": "a" * (64 * 1024 + 1)}, "reference"),
        ({"id": "r", "correct": True, "reference": "\u20ac" * 22_000}, "reference"),  # 22,000 chars, 66,000 bytes
    ],
)
async def test_feedback_validation(env: Any, body: dict[str, Any], param: str) -> None:
    client, _, _ = env
    _err(await client.post("/v1/feedback", json=body), 400, param)


async def test_feedback_malformed_json_and_shapes(env: Any) -> None:
    client, _, _ = env
    _err(await client.post("/v1/feedback", content=b"{not json"), 400)
    _err(await client.post("/v1/feedback", json=[1, 2]), 400)
    _err(await client.post("/v1/feedback", content=b'{"id":"r","correct":true,"score":NaN}'), 400)
    e = _err(await client.post("/v1/feedback", content=b"{" + b" " * (MAX_FEEDBACK_BYTES + 1) + b"}"), 413)
    assert e["code"] == "request_too_large"


async def test_feedback_unknown_id_404(env: Any) -> None:
    client, _, _ = env
    e = _err(await client.post("/v1/feedback", json={"id": "chatcmpl-nope", "correct": False}), 404, "id")
    assert e["code"] == "not_found"


async def test_feedback_flow_replace_and_metrics(env: Any) -> None:
    client, app, hub = env
    hub.observe(make_obs("chatcmpl-a", flags=("confident",), confidence=0.95))
    hub.observe(make_obs("chatcmpl-b", flags=("uncertain",), confidence=0.2))
    # Sent right away: the writer may not have written yet; the route waits for it rather than answering 404.
    r = await client.post("/v1/feedback", json={"id": "chatcmpl-a", "correct": False, "score": 0.1, "note": "wrong"})
    assert r.status_code == 200, r.text
    assert r.json() == {"id": "chatcmpl-a", "object": "feedback", "correct": False, "score": 0.1,
                             "note": "wrong", "replaced": False, "choices": 1}
    m: FakeMetrics = app.state.metrics
    assert m.calls[("feedback", ("smol", False))] == 1
    assert m.calls[("confident_wrong", "smol")] == 1
    assert m.calls[("calibration", ("smol", "brier", round(0.95**2, 6)))] == 1
    assert m.calls[("calibration", ("smol", "ece", 0.95))] == 1
    assert not any(k[0] == "calibration" and k[1][1] == "auroc" for k in m.calls)  # one class: no AUROC

    r = await client.post("/v1/feedback", json={"id": "chatcmpl-b", "correct": True})
    assert r.status_code == 200
    assert m.calls[("calibration", ("smol", "auroc", 0.0))] == 1  # the wrong one was the more confident one

    # Replacing with the same label: stored, not counted twice.
    r = await client.post("/v1/feedback", json={"id": "chatcmpl-a", "correct": False, "note": "still wrong"})
    assert r.json()["replaced"] is True
    assert m.calls[("feedback", ("smol", False))] == 1
    # Changing the label is counted under the new label.
    r = await client.post("/v1/feedback", json={"id": "chatcmpl-a", "correct": True})
    assert r.json()["replaced"] is True
    assert m.calls[("feedback", ("smol", True))] == 2
    writer: AuditWriter = app.state.audit_writer
    (row,) = await writer.store.get("chatcmpl-a")
    assert row["correct"] is True and row["note"] is None


async def test_feedback_for_unsampled_response_records_it(env: Any) -> None:
    client, app, hub = env
    hub.observe(make_obs("chatcmpl-quiet", flags=()))  # sample_rate 0: not recorded ...
    writer: AuditWriter = app.state.audit_writer
    assert await writer.flush(5)
    assert not await writer.store.exists("chatcmpl-quiet")
    r = await client.post("/v1/feedback", json={"id": "chatcmpl-quiet", "correct": True})
    assert r.status_code == 200  # ... until feedback arrives for it
    assert await writer.store.exists("chatcmpl-quiet")


async def test_feedback_without_metrics_module(tmp_path: Path) -> None:
    async for client, app, hub in _client(tmp_path):
        del app.state.metrics
        hub.observe(make_obs("chatcmpl-m"))
        r = await client.post("/v1/feedback", json={"id": "chatcmpl-m", "correct": False})
        assert r.status_code == 200


async def test_admin_key_required(admin_env: Any) -> None:
    client, app, hub = admin_env
    hub.observe(make_obs("chatcmpl-k"))
    body = {"id": "chatcmpl-k", "correct": False}
    e = await client.post("/v1/feedback", json=body)
    assert e.status_code == 401 and e.json()["error"]["code"] == "invalid_api_key"
    bad = await client.post("/v1/feedback", json=body, headers={"Authorization": "Bearer wrong"})
    assert bad.status_code == 401
    ok = await client.post("/v1/feedback", json=body, headers={"Authorization": f"Bearer {ADMIN}"})
    assert ok.status_code == 200
    ok2 = await client.post("/v1/feedback", json=body, headers={"Authorization": "Bearer second-key"})
    assert ok2.status_code == 200
    page = await client.get("/audit")
    assert page.status_code == 401 and page.headers["www-authenticate"].startswith("Basic")
    assert (await client.get("/audit", headers={"Authorization": f"Bearer {ADMIN}"})).status_code == 200
    basic = base64.b64encode(f"anyone:{ADMIN}".encode()).decode()
    assert (await client.get("/audit", headers={"Authorization": f"Basic {basic}"})).status_code == 200
    # The admin key and the client's key never reach the store.
    writer: AuditWriter = app.state.audit_writer
    text = "\n".join(str(c) for rows in (await writer.store.dump_tables()).values() for row in rows for c in row)
    assert ADMIN not in text and "second-key" not in text and "Bearer" not in text
    assert "Wombatistan" in text  # store_text is on here: the scan does see stored text


async def test_audit_page_content_and_filters(env: Any) -> None:
    client, app, hub = env
    hub.observe(make_obs("chatcmpl-right", flags=("confident",), confidence=0.97, model="m1"))
    hub.observe(make_obs("chatcmpl-wrong", flags=("confident",), confidence=0.93, model="m1"))
    hub.observe(make_obs("chatcmpl-unsure", flags=("uncertain",), confidence=0.3, model="m2"))
    for rid, ok in (("chatcmpl-right", True), ("chatcmpl-wrong", False), ("chatcmpl-unsure", True)):
        assert (await client.post("/v1/feedback", json={"id": rid, "correct": ok})).status_code == 200
    r = await client.get("/audit")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing loaded from outside
    assert "<script" not in html
    wrong_at = html.index('data-id="chatcmpl-wrong"')
    assert wrong_at < html.index('data-id="chatcmpl-right"') and wrong_at < html.index('data-id="chatcmpl-unsure"')
    assert html.count('class="tok"') == 3 * len(COMPLETION_TOKENS)
    assert "<svg" in html and 'class="bin"' in html
    assert "Wombatistan" not in html  # store_text off: no token text, positions only
    m1 = (await client.get("/audit", params={"model": "m2"})).text
    assert 'data-id="chatcmpl-unsure"' in m1 and 'data-id="chatcmpl-wrong"' not in m1
    lab = (await client.get("/audit", params={"label": "correct"})).text
    assert 'data-id="chatcmpl-wrong"' not in lab and 'data-id="chatcmpl-right"' in lab
    flag = (await client.get("/audit", params={"flag": "uncertain"})).text
    assert 'data-id="chatcmpl-unsure"' in flag and 'data-id="chatcmpl-right"' not in flag
    _err(await client.get("/audit", params={"flag": "bogus"}), 400, "flag")
    _err(await client.get("/audit", params={"label": "maybe"}), 400, "label")
    _err(await client.get("/audit", params={"limit": "many"}), 400, "limit")
