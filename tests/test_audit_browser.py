"""A real headless Chromium opens ``/audit`` served by uvicorn: confident-wrong first, tokens shaded, a screenshot."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from proxy.audit import install
from proxy.observe import ObserverHub
from proxy.settings import load_settings
from tests.test_audit_store import COMPLETION_TOKENS, make_obs

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
ARTIFACT = Path(__file__).resolve().parent.parent / "test-artifacts" / "audit.png"

pytestmark = pytest.mark.browser


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, ObserverHub]]:
    settings = load_settings(
        {"upstream": "http://127.0.0.1:9", "audit.url": f"sqlite:///{tmp_path}/audit.db", "audit.store_text": True,
         "audit.sample_rate": 0.0},
        environ={},
    )
    hub = ObserverHub()
    holder: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with holder["cm"]:
            yield

    app = FastAPI(lifespan=lifespan)
    holder["cm"] = install(app, settings, hub, None)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", hub
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


async def test_audit_page_in_chromium(served: tuple[str, ObserverHub], record_property: Any) -> None:
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        pytest.fail("Chromium is missing: apt-get install -y chromium", pytrace=False)
    from playwright.async_api import async_playwright

    base, hub = served
    # Observations arrive from this thread, as they would from any caller: the writer hands them to its loop.
    hub.observe(make_obs("chatcmpl-right", flags=("confident",), confidence=0.97, created=time.time() - 3))
    hub.observe(make_obs("chatcmpl-unsure", flags=("uncertain",), confidence=0.31, mean=1.8, created=time.time() - 2,
                         tokens=["Maybe", " forty", "-", "two", "?"]))
    hub.observe(make_obs("chatcmpl-wrong", flags=("confident",), confidence=0.93, created=time.time() - 4))
    async with httpx.AsyncClient(base_url=base) as client:
        for rid, ok in (("chatcmpl-right", True), ("chatcmpl-unsure", True), ("chatcmpl-wrong", False)):
            r = await client.post("/v1/feedback", json={"id": rid, "correct": ok, "note": "browser test"})
            assert r.status_code == 200, r.text

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            requests: list[str] = []
            page.on("request", lambda req: requests.append(req.url))
            resp = await page.goto(base + "/audit")
            assert resp is not None and resp.status == 200
            # Everything the page needs comes from the page itself: no request leaves for another origin.
            assert all(u.startswith(base) for u in requests), requests

            ids = await page.locator(".resp").evaluate_all("els => els.map(e => e.dataset.id)")
            assert ids[0] == "chatcmpl-wrong", ids
            assert await page.locator("#confident-wrong .resp").count() == 1
            assert set(ids) == {"chatcmpl-wrong", "chatcmpl-right", "chatcmpl-unsure"}

            toks = page.locator("#confident-wrong .tok")
            assert await toks.count() == len(COMPLETION_TOKENS)
            assert "".join(await toks.all_inner_texts()) == "".join(COMPLETION_TOKENS)
            colors = await toks.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)")
            alphas = [float(c.rstrip(")").split(",")[-1]) for c in colors]
            entropies = [float(x) for x in await toks.evaluate_all("els => els.map(e => e.dataset.entropy)")]
            # Shaded, and more shading where the entropy is higher.
            assert all(a > 0 for a in alphas) and len(set(colors)) == len(colors)
            assert sorted(range(len(alphas)), key=alphas.__getitem__) == sorted(
                range(len(entropies)), key=entropies.__getitem__
            )

            last = toks.last
            await last.hover()
            tip = await last.evaluate("e => getComputedStyle(e, '::after').content")
            assert "entropy 2.500 nats" in tip and "probability" in tip and "top alternatives" in tip
            assert await page.locator("svg.reliability rect.bin").count() >= 2

            # The filters are plain query parameters.
            await page.goto(base + "/audit?label=correct")
            ids = await page.locator(".resp").evaluate_all("els => els.map(e => e.dataset.id)")
            assert "chatcmpl-wrong" not in ids and "chatcmpl-right" in ids

            await page.goto(base + "/audit")
            ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(ARTIFACT), full_page=True)
        finally:
            await browser.close()
    assert ARTIFACT.stat().st_size > 10_000
    record_property("screenshot", str(ARTIFACT))
    print(f"\naudit page screenshot: {ARTIFACT}")
