"""vLLM's routes outside ``/v1`` that clients call through the proxy's URL (CONTRACT §9): ``/tokenize``,
``/detokenize``, ``/version``, ``/health``, ``/ping`` pass through unchanged; ``/metrics`` stays the proxy's own.

A recorded fake upstream checks method, path, query, body, status and headers travel unchanged; the real tier
compares each route through the proxy with the same call straight to the session's vLLM.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import orjson
import pytest

from proxy.app import COMPONENTS
from tests.plugins.recorded import Chunks, RecordedUpstream, proxy_client
from tests.plugins.reliability_support import running_proxy

TOKENIZE = {"count": 2, "max_model_len": 2048, "tokens": [19556, 905], "token_strs": None}


def _upstream() -> RecordedUpstream:
    up = RecordedUpstream()

    def answer(status: int, body: object, **headers: str):  # type: ignore[no-untyped-def]
        def respond(_: object) -> httpx.Response:
            return httpx.Response(status, stream=Chunks([orjson.dumps(body)]),
                                  headers={"content-type": "application/json", "x-upstream-marker": "1", **headers})
        return respond

    up.routes["/tokenize"] = answer(200, TOKENIZE)
    up.routes["/detokenize"] = answer(200, {"prompt": "Hello world"})
    up.routes["/version"] = answer(200, {"version": "0.32.0"})
    up.routes["/health"] = answer(200, {})
    up.routes["/ping"] = answer(200, {})
    return up


async def test_vllm_routes_pass_through_unchanged() -> None:
    up = _upstream()
    async with proxy_client(up, components=COMPONENTS) as c:
        r = await c.post("/tokenize?add_special_tokens=false", json={"model": "smollm2", "prompt": "Hello world"})
        assert r.status_code == 200 and r.json() == TOKENIZE and r.headers["x-upstream-marker"] == "1"
        assert up.requests[-1][0] == "/tokenize" and up.requests[-1][1] == {"model": "smollm2",
                                                                            "prompt": "Hello world"}
        r = await c.post("/detokenize", json={"model": "smollm2", "tokens": [19556, 905]})
        assert r.json() == {"prompt": "Hello world"} and up.requests[-1][1]["tokens"] == [19556, 905]
        for path, body in (("/version", {"version": "0.32.0"}), ("/health", {}), ("/ping", {})):
            r = await c.get(path)
            assert r.status_code == 200 and r.json() == body and r.headers["x-upstream-marker"] == "1", path
            assert up.requests[-1][0] == path
        r = await c.post("/ping")  # SageMaker-style health check: POST as well as GET
        assert r.status_code == 200 and up.requests[-1][0] == "/ping"


async def test_upstream_errors_on_these_routes_pass_through_too() -> None:
    up = RecordedUpstream()  # answers 404 with its own body for everything
    async with proxy_client(up) as c:
        r = await c.post("/tokenize", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["message"] == "not here"
    assert [p for p, _, _ in up.requests] == ["/tokenize"]


async def test_metrics_and_unknown_routes_stay_the_proxys() -> None:
    up = _upstream()
    up.routes["/metrics"] = up.routes["/version"]
    up.routes["/other"] = up.routes["/version"]
    async with proxy_client(up, components=COMPONENTS) as c:
        metrics = await c.get("/metrics")
        other = await c.get("/other")
        healthz = await c.get("/healthz")
    assert metrics.status_code == 200 and "entropy_proxy_" in metrics.text
    assert other.status_code == 404 and healthz.json() == {"status": "ok"}
    assert up.requests == [] or all(p not in ("/metrics", "/other") for p, _, _ in up.requests)


async def test_tokenize_follows_api_keys_health_does_not() -> None:
    up = _upstream()
    async with proxy_client(up, api_keys=["sk-c"], upstream_api_key="sk-up") as c:
        denied = await c.post("/tokenize", json={"model": "smollm2", "prompt": "x"})
        assert denied.status_code == 401 and up.requests == []
        r = await c.post("/tokenize", json={"model": "smollm2", "prompt": "x"},
                         headers={"authorization": "Bearer sk-c"})
        assert r.status_code == 200 and up.requests[-1][2]["authorization"] == "Bearer sk-up"
        for path in ("/health", "/ping", "/version"):  # probes and version checks carry no key
            assert (await c.get(path)).status_code == 200, path


# --- the real tier ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def proxied(vllm_server: str) -> Iterator[str]:
    with running_proxy(vllm_server) as p:
        yield p.url


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/tokenize", {"prompt": "The entropy of a fair coin is one bit."}),
    ("POST", "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/detokenize", {"tokens": [504, 13164, 282]}),
    ("GET", "/version", None),
    ("GET", "/health", None),
    ("GET", "/ping", None),
])
def test_real_vllm_routes_through_the_proxy(vllm_server: str, vllm_model: str, proxied: str, method: str,
                                            path: str, body: dict | None) -> None:
    payload = None if body is None else {"model": vllm_model, **body}
    direct = httpx.request(method, vllm_server + path, json=payload, timeout=60.0)
    through = httpx.request(method, proxied + path, json=payload, timeout=60.0)
    assert direct.status_code == 200, direct.text
    assert through.status_code == direct.status_code and through.content == direct.content
    assert through.headers.get("content-type") == direct.headers.get("content-type")


def test_real_metrics_stay_the_proxys(vllm_server: str, proxied: str) -> None:
    upstream = httpx.get(vllm_server + "/metrics", timeout=30.0).text
    ours = httpx.get(proxied + "/metrics", timeout=30.0).text
    assert "vllm:" in upstream and "vllm:" not in ours and "entropy_proxy_" in ours
