"""Who may read the audit trail (``GET /audit``) and label responses (``POST /v1/feedback``), for every
combination of ``api_keys``, ``admin_keys`` and ``audit.public``, from a loopback and from a remote client.

The remote client is the ASGI scope's client address (what uvicorn puts there from the socket), so no test needs a
second machine. Every case records one response whose prompt carries a marker and checks the marker is on the page
only when the page may be read.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.access import is_loopback_host
from proxy.app import COMPONENTS, create_app
from proxy.settings import SettingsError, load_settings
from tests.plugins.recorded import UPSTREAM, RecordedUpstream
from tests.plugins.reliability_support import CHAT

MARKER = "PROMPT-MARKER-7f3a"
REMOTE = ("203.0.113.7", 40000)
LOCAL = ("127.0.0.1", 40000)
CLIENT_KEY, ADMIN_KEY = "sk-client-key", "sk-admin-key"


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _basic(key: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"reviewer:{key}".encode()).decode()}


class Env:
    def __init__(self, app: Any, rid: str) -> None:
        self.app = app
        self.rid = rid

    @asynccontextmanager
    async def client(self, addr: tuple[str, int]) -> AsyncIterator[httpx.AsyncClient]:
        transport = httpx.ASGITransport(app=self.app, client=addr)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy.test") as c:
            yield c

    async def page(self, addr: tuple[str, int], headers: dict[str, str] | None = None) -> httpx.Response:
        async with self.client(addr) as c:
            return await c.get("/audit", headers=headers or {})

    async def feedback(self, addr: tuple[str, int], headers: dict[str, str] | None = None) -> httpx.Response:
        async with self.client(addr) as c:
            return await c.post("/v1/feedback", json={"id": self.rid, "correct": False}, headers=headers or {})


@asynccontextmanager
async def _env(tmp_path: Path, **settings: Any) -> AsyncIterator[Env]:
    recorded = RecordedUpstream()
    recorded.serve(CHAT, "chat_k20.json")
    recorded.serve("/v1/models", "models.json")
    s = load_settings({"upstream": UPSTREAM, "models": ["smollm2"], "audit.url": f"sqlite:///{tmp_path}/a.db",
                       "audit.sample_rate": 1.0, "audit.store_text": True, **settings}, environ={})
    app = create_app(s, transport=httpx.MockTransport(recorded), components=COMPONENTS)
    async with app.router.lifespan_context(app):
        env = Env(app, "")
        auth = _bearer(CLIENT_KEY) if s.api_keys else {}
        async with env.client(LOCAL) as c:
            r = await c.post(CHAT, json={"model": "smollm2", "messages": [{"role": "user", "content": MARKER}]},
                             headers=auth)
        assert r.status_code == 200, r.text
        env.rid = r.headers["x-entropy-request-id"]
        assert await app.state.audit_writer.flush(10.0)
        yield env


def _denied(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert MARKER not in r.text


def _page_ok(r: httpx.Response) -> None:
    assert r.status_code == 200, r.text
    assert MARKER in r.text  # the page shows the stored prompt: this is what the guard protects


def _feedback_ok(r: httpx.Response) -> None:
    assert r.status_code == 200, r.text
    assert r.json()["correct"] is False


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize("host", ["203.0.113.7", "10.0.0.1", "0.0.0.0", "2001:db8::1", "::ffff:10.0.0.1",
                                  "localhost.evil.example", "", None])
def test_remote_hosts(host: str | None) -> None:
    assert not is_loopback_host(host)


async def test_no_keys_the_audit_trail_answers_loopback_only(tmp_path: Path) -> None:
    async with _env(tmp_path) as env:
        for remote in (REMOTE, ("2001:db8::5", 1), ("10.1.2.3", 1)):
            r = await env.page(remote)
            _denied(r, 403)
            assert "audit.public" in r.json()["error"]["message"]  # says how to open it on purpose
            _denied(await env.feedback(remote), 403)
            _denied(await env.page(remote, _bearer("anything")), 403)
        _page_ok(await env.page(LOCAL))
        _page_ok(await env.page(("::1", 1)))
        _feedback_ok(await env.feedback(LOCAL))


async def test_no_keys_and_public_answers_everyone(tmp_path: Path) -> None:
    async with _env(tmp_path, **{"audit.public": True}) as env:
        _page_ok(await env.page(REMOTE))
        _feedback_ok(await env.feedback(REMOTE))
        _page_ok(await env.page(LOCAL))


async def test_api_keys_only_guard_the_audit_trail_from_everyone(tmp_path: Path) -> None:
    async with _env(tmp_path, api_keys=[CLIENT_KEY, "sk-second"]) as env:
        for addr in (REMOTE, LOCAL):  # once keys are set, a loopback address is no pass
            for bad in ({}, _bearer("sk-wrong"), _bearer(CLIENT_KEY + "x"), _basic("sk-wrong")):
                page = await env.page(addr, bad)
                _denied(page, 401)
                assert page.headers["www-authenticate"].startswith("Basic")
                _denied(await env.feedback(addr, bad), 401)
            _page_ok(await env.page(addr, _bearer(CLIENT_KEY)))
            _page_ok(await env.page(addr, _basic("sk-second")))  # a browser logs in with the key as password
            _feedback_ok(await env.feedback(addr, _bearer("sk-second")))


async def test_admin_keys_guard_the_page_and_clients_may_still_label(tmp_path: Path) -> None:
    async with _env(tmp_path, api_keys=[CLIENT_KEY], admin_keys=[ADMIN_KEY]) as env:
        for addr in (REMOTE, LOCAL):
            for bad in ({}, _bearer(CLIENT_KEY), _basic(CLIENT_KEY), _bearer(ADMIN_KEY + "x")):
                _denied(await env.page(addr, bad), 401)
            for bad in ({}, _bearer("sk-wrong"), _bearer(ADMIN_KEY + "x")):
                _denied(await env.feedback(addr, bad), 401)
            _page_ok(await env.page(addr, _bearer(ADMIN_KEY)))
            _page_ok(await env.page(addr, _basic(ADMIN_KEY)))
            # feedback comes from the application that received the response: its client key is enough
            _feedback_ok(await env.feedback(addr, _bearer(CLIENT_KEY)))
            _feedback_ok(await env.feedback(addr, _bearer(ADMIN_KEY)))


async def test_admin_keys_without_api_keys_guard_feedback_too(tmp_path: Path) -> None:
    async with _env(tmp_path, admin_keys=[ADMIN_KEY]) as env:
        for addr in (REMOTE, LOCAL):
            _denied(await env.page(addr), 401)
            _denied(await env.feedback(addr), 401)
            _denied(await env.feedback(addr, _bearer("sk-anything")), 401)
            _page_ok(await env.page(addr, _bearer(ADMIN_KEY)))
            _feedback_ok(await env.feedback(addr, _bearer(ADMIN_KEY)))


@pytest.mark.parametrize("keys", [{"api_keys": ["k"]}, {"admin_keys": ["k"]}])
def test_public_with_keys_is_a_configuration_error(keys: dict[str, Any]) -> None:
    with pytest.raises(SettingsError, match=r"audit\.public.*api_keys"):
        load_settings({"upstream": UPSTREAM, "audit.public": True, **keys}, environ={})


async def test_entropy_status_and_baseline_carry_no_text_and_follow_api_keys(tmp_path: Path) -> None:
    routes = ("/v1/entropy/status", "/v1/entropy/baseline")
    async with _env(tmp_path) as env, env.client(REMOTE) as c:
        for path in routes:  # no text in them: without keys they stay readable from anywhere (dashboards, scripts)
            r = await c.get(path)
            assert r.status_code == 200 and MARKER not in r.text, path
            assert "smollm2" in r.text, path  # they did see the recorded traffic
    async with _env(tmp_path / "k", api_keys=[CLIENT_KEY], admin_keys=[ADMIN_KEY]) as env, \
            env.client(REMOTE) as c:
        for path in routes:
            assert (await c.get(path)).status_code == 401, path
            assert (await c.get(path, headers=_bearer("sk-wrong"))).status_code == 401, path
            assert (await c.get(path, headers=_bearer(CLIENT_KEY))).status_code == 200, path
            assert (await c.get(path, headers=_bearer(ADMIN_KEY))).status_code == 200, path
