"""Security: API keys, where the client's Authorization goes (and where it must never go), a fixed upstream,
bounded metric labels, admin keys for the audit routes."""

from __future__ import annotations

import hmac
import logging
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.app import COMPONENTS
from tests.fakes.fault_upstream import FaultUpstream
from tests.plugins.recorded import RecordedUpstream, proxy_client
from tests.plugins.reliability_support import CHAT, COMPLETIONS, chat_body, running_proxy, series_count

ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def fake() -> Iterator[FaultUpstream]:
    with FaultUpstream(tokens=6, stall_s=5) as f:
        yield f


async def test_api_keys_401_in_openai_shape_and_every_key_compared(recorded: RecordedUpstream,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    recorded.serve(CHAT, "chat_k20.json")
    recorded.serve(COMPLETIONS, "comp_k5.json")
    recorded.serve("/v1/models", "models.json")
    calls: list[int] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    keys = ["sk-one", "sk-two", "sk-three"]
    async with proxy_client(recorded, api_keys=keys) as c:
        for auth in (None, "Bearer wrong", "Basic c2stb25l", "Bearer ", "sk-one"):
            headers = {"authorization": auth} if auth is not None else {}
            for method, path, body in (("POST", CHAT, chat_body()), ("POST", COMPLETIONS,
                                        {"model": "smollm2", "prompt": "x"}), ("GET", "/v1/models", None)):
                r = await c.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (auth, path)
                err = r.json()["error"]
                assert set(err) == ERROR_KEYS and err["code"] == "invalid_api_key"
                assert "sk-one" not in r.text and "wrong" not in r.text
        assert recorded.requests == []
        calls.clear()
        for key in keys:  # the right key, whichever position it has: the same work each time
            r = await c.post(CHAT, json=chat_body(), headers={"authorization": f"Bearer {key}"})
            assert r.status_code == 200
        assert len(calls) == len(keys) ** 2
    # the client's key was for the proxy: it does not travel upstream
    assert all("authorization" not in h for _, _, h in recorded.requests)


async def test_upstream_key_replaces_the_clients(recorded: RecordedUpstream) -> None:
    recorded.serve(CHAT, "chat_k20.json")
    async with proxy_client(recorded, api_keys=["sk-proxy"], upstream_api_key="sk-upstream") as c:
        r = await c.post(CHAT, json=chat_body(), headers={"authorization": "Bearer sk-proxy"})
    assert r.status_code == 200
    assert recorded.requests[0][2]["authorization"] == "Bearer sk-upstream"
    assert "sk-upstream" not in str(r.headers) and "sk-upstream" not in r.text


def test_client_authorization_goes_to_the_upstream_and_nowhere_else(
        fake: FaultUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    marker = "sk-MARKER-" + secrets.token_hex(12)
    auth = {"authorization": f"Bearer {marker}"}
    db = tmp_path / "audit.db"
    caplog.set_level(logging.DEBUG)
    seen_headers: list[str] = []
    bodies: list[bytes] = []
    with running_proxy(fake.url, timeout_s=1.0, **{"audit.enabled": True, "audit.url": f"sqlite:///{db}",
                                                   "audit.sample_rate": 1.0, "audit.store_text": True}) as p:
        n0 = len(fake.requests)
        calls = [("POST", CHAT, chat_body(), {}), ("POST", CHAT, chat_body(stream=True), {}),
                 ("POST", COMPLETIONS, {"model": "smollm2", "prompt": "x", "max_tokens": 4}, {}),
                 ("GET", "/v1/models", None, {})]
        calls += [("POST", CHAT, chat_body(stream=s), {"X-Fault": f}) for s in (False, True)
                  for f in ("status-500", "reset", "malformed-json", "cut-mid-chunk", "drop-logprobs", "hang")]
        for method, path, body, extra in calls:
            r = p.client.request(method, path, json=body, headers={**auth, **extra})
            seen_headers.append(str(r.headers.multi_items()))
            bodies.append(r.content)
        rid = r.headers.get("x-entropy-request-id") or "chatcmpl-unknown"
        r = p.client.post("/v1/feedback", json={"id": rid, "correct": False}, headers=auth)
        seen_headers.append(str(r.headers.multi_items()))
        metrics = p.metrics()
        audit_page = p.client.get("/audit").text
        status = p.client.get("/v1/entropy/status").text
    # forwarded to the configured upstream, on every call that reached it
    reached = fake.requests[n0:]
    assert len(reached) == len(calls) and all(rec.headers.get("authorization") == f"Bearer {marker}"
                                              for rec in reached)
    # ... and nowhere else
    assert marker not in caplog.text and "MARKER" not in caplog.text
    stored = b"".join(f.read_bytes() for f in tmp_path.iterdir() if f.name.startswith("audit.db"))
    with sqlite3.connect(db) as con:
        assert con.execute("select count(*) from audit_responses").fetchone()[0] >= 3  # the store was used
    assert marker.encode() not in stored
    assert marker not in metrics and marker not in audit_page and marker not in status
    assert not any(marker in h for h in seen_headers)
    assert not any(marker.encode() in b for b in bodies)


def test_no_request_field_or_header_can_choose_another_upstream(fake: FaultUpstream) -> None:
    with FaultUpstream(tokens=4) as evil, running_proxy(fake.url) as p:
        host = evil.url.removeprefix("http://")
        n0 = len(fake.requests)
        headers = [{"host": host}, {"x-forwarded-host": host}, {"forwarded": f"host={host}"},
                   {"x-forwarded-proto": "http", "x-original-url": evil.url}, {"x-upstream": evil.url},
                   {"x-entropy-upstream": evil.url}]
        fields = [{"base_url": evil.url}, {"api_base": evil.url + "/v1"}, {"upstream": evil.url}, {"url": evil.url},
                  {"model": evil.url + "/v1"}, {"extra_body": {"base_url": evil.url}}]
        for h in headers:
            p.client.post(CHAT, json=chat_body(), headers=h)
        for f in fields:
            p.client.post(CHAT, json={**chat_body(), **f})
        for path in (f"/v1//{host}/v1/models", f"/v1/http://{host}/v1/models", "/v1/%2F%2F" + host + "/v1/models",
                     f"/v1/../{host}/v1/models", f"/v1/models?url={evil.url}", f"/v1/@{host}/v1/models"):
            with httpx.Client(base_url=p.url) as raw:
                raw.get(path)
        assert evil.requests == []
        assert len(fake.requests) - n0 >= len(headers) + len(fields)


async def test_a_thousand_random_model_names_add_no_series(recorded: RecordedUpstream) -> None:
    recorded.serve(CHAT, "chat_k20.json")
    # small monitor windows and baselines, filled first: their gauges (drift, diversity, baseline) exist before the
    # count is taken
    async with proxy_client(recorded, components=COMPONENTS, **{"monitors.window": 10, "monitors.baseline": 100,
                                                                "monitors.baseline_responses": 10}) as c:
        for i in range(100):
            await c.post(CHAT, json=chat_body(model="first-unknown" if i % 2 else "smollm2"))
        before = (await c.get("/metrics")).text
        for _ in range(1000):
            r = await c.post(CHAT, json=chat_body(model=secrets.token_urlsafe(12)))
            assert r.status_code == 200
        after = (await c.get("/metrics")).text
    assert series_count(after) == series_count(before)
    assert 'model="other"' in after and "first-unknown" not in after


def test_admin_key_guards_audit_and_feedback(fake: FaultUpstream, tmp_path: Path) -> None:
    settings = {"audit.enabled": True, "audit.url": f"sqlite:///{tmp_path / 'a.db'}", "audit.sample_rate": 1.0,
                "api_keys": ["sk-client"], "admin_keys": ["sk-admin"]}
    with running_proxy(fake.url, **settings) as p:
        r = p.client.post(CHAT, json=chat_body(), headers={"authorization": "Bearer sk-client"})
        assert r.status_code == 200
        rid = r.headers["x-entropy-request-id"]
        for auth in ({}, {"authorization": "Bearer sk-client"}, {"authorization": "Bearer sk-admin-not"}):
            page = p.client.get("/audit", headers=auth)
            fb = p.client.post("/v1/feedback", json={"id": rid, "correct": True}, headers=auth)
            # a client key may label (the application learns what was right) but never read the page
            for resp in (page, fb) if auth != {"authorization": "Bearer sk-client"} else (page,):
                assert resp.status_code == 401 and set(resp.json()["error"]) == ERROR_KEYS
                assert "sk-admin" not in resp.text and "sk-admin" not in str(resp.headers)
        fb = p.client.post("/v1/feedback", json={"id": rid, "correct": False},
                           headers={"authorization": "Bearer sk-client"})
        assert fb.status_code == 200, fb.text
        admin = {"authorization": "Bearer sk-admin"}
        assert p.client.get("/audit", headers=admin).status_code == 200
        fb = p.client.post("/v1/feedback", json={"id": rid, "correct": True}, headers=admin)
        assert fb.status_code == 200, fb.text
        assert p.client.post("/v1/feedback", json={"id": "nope", "correct": True}, headers=admin).status_code == 404
