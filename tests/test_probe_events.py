"""The recognition probe never holds a client's response: proved with an event, not a latency."""

from __future__ import annotations

import anyio
import httpx

from proxy.probe import Probe
from tests.plugins.recorded import proxy_client
from tests.test_recognition import CHAT, COMPONENTS, FakeVLLM, _question


class HeldScoring(FakeVLLM):
    """The fake vLLM whose re-scoring routes (the probe's calls) wait until the test lets them go; chat answers."""

    def __init__(self) -> None:
        super().__init__()
        self.release = anyio.Event()
        self.held = anyio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path in ("/tokenize", "/v1/completions"):
            self.held.set()
            await self.release.wait()
        return await super().__call__(request)


async def test_client_responses_complete_while_the_probes_upstream_call_is_held() -> None:
    fake = HeldScoring()
    async with proxy_client(fake, COMPONENTS, **{"probe.sample_rate": 1.0}) as c:
        probe: Probe = c.app.state.probe  # type: ignore[attr-defined]
        with anyio.fail_after(30):  # a response that waited for the held probe would never come
            first = await c.post(CHAT, json=_question(0))
            assert first.status_code == 200
            await fake.held.wait()  # the probe is now inside its upstream call for the first response
            # While that call is held, more clients get their whole answers (annotated); nothing is scored yet.
            for i in (1, 2):
                r = await c.post(CHAT, json=_question(i))
                assert r.status_code == 200 and r.json()["choices"][0]["entropy"]["tokens"] > 0
        assert not fake.release.is_set() and probe.counts["scored"] == 0 and probe.pending == 3
        fake.release.set()
        assert await probe.wait_idle(30)
        assert probe.counts["scored"] == 3
