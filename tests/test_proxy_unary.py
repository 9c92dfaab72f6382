"""Non-streaming chat and completions through the proxy against recorded vLLM bodies."""

import httpx
import orjson
import pytest

from tests.plugins.recorded import fixture_bytes, proxy_client

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}


async def test_chat_without_logprobs_gets_none_back_and_an_annotation(recorded):
    recorded.serve(CHAT, "chat_k20.json")
    async with proxy_client(recorded) as c:
        r = await c.post(CHAT, json=MSG)
    assert r.status_code == 200
    sent = recorded.last_body
    assert sent["logprobs"] is True and sent["top_logprobs"] == 20
    choice = r.json()["choices"][0]
    original = orjson.loads(fixture_bytes("chat_k20.json"))["choices"][0]
    assert choice["logprobs"] is None
    assert choice["message"] == original["message"]
    ent = choice["entropy"]
    assert ent["tokens"] == len(original["logprobs"]["content"])
    assert ent["estimator"] == "topk-tail-v1" and ent["top_k"] == 20
    assert ent["mean_lower"] <= ent["mean"] <= ent["mean_upper"]
    assert 0 < ent["confidence"] <= 1 and "per_token" not in ent
    assert set(ent["flags"]) <= {"confident", "uncertain", "forking_heavy", "truncated_tail"}
    assert r.headers["x-entropy-mean"] == str(ent["mean"])
    assert r.headers["x-entropy-request-id"] == orjson.loads(fixture_bytes("chat_k20.json"))["id"]
    assert r.headers["x-entropy-flags"] == ",".join(ent["flags"])


async def test_chat_top_logprobs_3_gets_exactly_3_with_identical_values(recorded):
    recorded.serve(CHAT, "chat_k20.json")
    async with proxy_client(recorded) as c:
        r = await c.post(CHAT, json={**MSG, "logprobs": True, "top_logprobs": 3, "entropy_detail": "tokens"})
    original = orjson.loads(fixture_bytes("chat_k20.json"))["choices"][0]["logprobs"]["content"]
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [len(p["top_logprobs"]) for p in content] == [3] * len(original)
    assert [p["top_logprobs"] for p in content] == [p["top_logprobs"][:3] for p in original]
    assert "entropy_detail" not in recorded.last_body
    per_token = r.json()["choices"][0]["entropy"]["per_token"]
    assert len(per_token) == len(original)


async def test_n2_every_choice_annotated(recorded):
    recorded.serve(CHAT, "chat_n2_k5.json")
    async with proxy_client(recorded, top_k=5) as c:
        r = await c.post(CHAT, json={**MSG, "n": 2})
    choices = r.json()["choices"]
    assert len(choices) == 2
    assert all(ch["entropy"]["tokens"] > 0 and ch["logprobs"] is None for ch in choices)


async def test_completions_annotated_and_trimmed(recorded):
    recorded.serve(COMP, "comp_k5.json")
    async with proxy_client(recorded, top_k=5) as c:
        r = await c.post(COMP, json={"model": "smollm2", "prompt": "The capital of France is", "logprobs": 1})
    assert recorded.last_body["logprobs"] == 5
    ch = r.json()["choices"][0]
    assert ch["entropy"]["tokens"] == 8
    assert all(1 <= len(d) <= 2 for d in ch["logprobs"]["top_logprobs"])


async def test_completions_echo_counts_only_generated_tokens(recorded):
    recorded.serve(COMP, "comp_echo_prompt_logprobs.json")
    async with proxy_client(recorded, top_k=3) as c:
        r = await c.post(COMP, json={"model": "smollm2", "prompt": "The capital of France is", "echo": True,
                                     "max_tokens": 4})
    ch = r.json()["choices"][0]
    assert ch["entropy"]["tokens"] == 4
    assert ch["logprobs"] is None and ch["prompt_logprobs"] is None
    assert ch["text"].startswith("The capital of France is")


async def test_upstream_without_logprobs_gives_entropy_null(recorded):
    recorded.serve(CHAT, "chat_nolp.json")
    async with proxy_client(recorded) as c:
        r = await c.post(CHAT, json=MSG)
    assert r.status_code == 200
    assert r.json()["choices"][0]["entropy"] is None
    assert "x-entropy-mean" not in r.headers


async def test_k_over_the_limit_is_learnt_and_retried_once(recorded):
    calls = []

    def respond(body):
        calls.append(body["top_logprobs"])
        if body["top_logprobs"] > 5:
            return httpx.Response(400, content=fixture_bytes("chat_err_k21.json").replace(b"20", b"5"))
        return httpx.Response(200, content=fixture_bytes("chat_n2_k5.json"))

    recorded.routes[CHAT] = respond
    async with proxy_client(recorded, top_k=20) as c:
        r1 = await c.post(CHAT, json=MSG)
        r2 = await c.post(CHAT, json=MSG)
    assert r1.status_code == r2.status_code == 200
    assert calls == [20, 5, 5]  # learnt once, then used directly
    assert r1.json()["choices"][0]["entropy"]["top_k"] == 5


async def test_client_asking_over_the_limit_sees_the_upstream_error(recorded):
    recorded.serve(CHAT, "chat_err_k21.json", status=400)
    async with proxy_client(recorded) as c:
        r = await c.post(CHAT, json={**MSG, "logprobs": True, "top_logprobs": 21})
    assert r.status_code == 400
    assert r.content == fixture_bytes("chat_err_k21.json")
    assert len(recorded.requests) == 1


async def test_upstream_errors_pass_through_with_their_body(recorded):
    recorded.serve(CHAT, "chat_err_model.json", status=404)
    async with proxy_client(recorded) as c:
        r = await c.post(CHAT, json={**MSG, "model": "nope"})
    assert r.status_code == 404 and r.content == fixture_bytes("chat_err_model.json")


async def test_upstream_200_with_broken_json_is_502(recorded):
    recorded.serve(CHAT, body=b'{"id": "x", "choices": [', stream=False)
    async with proxy_client(recorded) as c:
        r = await c.post(CHAT, json=MSG)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_bad_response"


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (httpx.ConnectError("refused"), 502, "upstream_unavailable"),
        (httpx.ReadTimeout("slow"), 504, "upstream_timeout"),
        (httpx.RemoteProtocolError("cut"), 502, "upstream_unavailable"),
    ],
)
async def test_transport_failures_map_to_openai_errors(recorded, exc, status, code):
    def boom(_):
        raise exc

    recorded.routes[CHAT] = boom
    async with proxy_client(recorded) as c:
        r = await c.post(CHAT, json=MSG)
        r_stream = await c.post(CHAT, json={**MSG, "stream": True})
    for resp in (r, r_stream):
        assert resp.status_code == status
        err = resp.json()["error"]
        assert err["code"] == code and set(err) == {"message", "type", "param", "code"}


async def test_bad_client_input(recorded):
    recorded.serve(CHAT, "chat_k20.json")
    async with proxy_client(recorded, max_body_bytes=2048) as c:
        bad_json = await c.post(CHAT, content=b'{"messages": [', headers={"content-type": "application/json"})
        wrong_type = await c.post(CHAT, json={**MSG, "n": "two"})
        too_big = await c.post(CHAT, json={**MSG, "pad": "x" * 5000})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"
    assert wrong_type.status_code == 400 and wrong_type.json()["error"]["param"] == "n"
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    assert recorded.requests == []


async def test_other_v1_routes_pass_through_unchanged(recorded):
    recorded.serve("/v1/models", "models.json")
    async with proxy_client(recorded) as c:
        r = await c.get("/v1/models", headers={"authorization": "Bearer user-key"})
        missing = await c.get("/v1/nothing")
    assert r.status_code == 200 and r.content == fixture_bytes("models.json")
    assert recorded.requests[0][2]["authorization"] == "Bearer user-key"
    assert missing.status_code == 404


async def test_authorization_is_forwarded_on_annotated_routes(recorded):
    recorded.serve(CHAT, "chat_k20.json")
    async with proxy_client(recorded) as c:
        await c.post(CHAT, json=MSG, headers={"authorization": "Bearer sk-client"})
    assert recorded.requests[0][2]["authorization"] == "Bearer sk-client"


async def test_health(recorded):
    recorded.serve("/v1/models", "models.json")
    async with proxy_client(recorded) as c:
        assert (await c.get("/healthz")).status_code == 200
        assert (await c.get("/readyz")).status_code == 200
        recorded.routes.clear()
        recorded.routes["/v1/models"] = lambda _: (_ for _ in ()).throw(httpx.ConnectError("down"))
        assert (await c.get("/readyz")).status_code == 503


async def test_annotated_routes_answer_errors_in_the_openai_shape(recorded):
    """The annotated routes are matched by plain Starlette routes ahead of FastAPI's: a ProxyError still gets the
    app's handler (401 here), and an unexpected failure the app's catch-all 500, both OpenAI-shaped; the OpenAPI
    document still lists both routes."""
    from proxy.app import create_app
    from proxy.settings import load_settings
    from tests.plugins.recorded import UPSTREAM

    s = load_settings({"upstream": UPSTREAM, "audit.enabled": False, "models": ["smollm2"], "api_keys": ["k1"]},
                      environ={})
    app = create_app(s, transport=httpx.MockTransport(recorded))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy.test") as c:
            r = await c.post(CHAT, json=MSG)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"

            async def boom(request, endpoint):
                raise RuntimeError("a bug")

            app.state.service.handle = boom
            r = await c.post(COMP, json={"model": "smollm2", "prompt": "x"}, headers={"Authorization": "Bearer k1"})
            assert r.status_code == 500
            assert r.json()["error"]["code"] == "internal_error" and r.json()["error"]["type"] == "api_error"
            paths = (await c.get("/openapi.json")).json()["paths"]
            assert "post" in paths[CHAT] and "post" in paths[COMP]
