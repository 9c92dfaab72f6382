"""Bad input at scale: the OpenAPI schema covers the proxy's own routes; schemathesis generates well over 1,000
requests from it against the running proxy (uvicorn, a fake upstream that never fails by itself) and no answer
is a 5xx; hand-written bad inputs each get a clear 4xx in the OpenAI shape. (Hypothesis covers the SSE decoder
in tests/test_sse.py and the estimator in tests/test_entropy_properties.py.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from bench.replay_upstream import Replayer, RequestError
from proxy.app import create_app
from proxy.settings import load_settings
from tests.plugins.recorded import Chunks
from tests.plugins.reliability_support import CHAT, COMPLETIONS, chat_body
from tests.plugins.servers import serve_in_thread

OWN_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/feedback", "/healthz", "/readyz", "/metrics",
              "/audit", "/v1/entropy/status"}
ERROR_KEYS = {"message", "type", "param", "code"}
# examples per operation and generation mode; the annotated routes get most
EXAMPLES = {"/v1/chat/completions": 320, "/v1/completions": 260, "/v1/feedback": 80}
OTHER_EXAMPLES = 15


class SturdyUpstream:
    """The replaying upstream behind MockTransport, answering 400 to whatever it cannot serve: any 5xx the
    fuzz run sees is then the proxy's own."""

    def __init__(self) -> None:
        self.replayer = Replayer(tokens=4, max_logprobs=-1)
        self.seen: list[Any] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = request.content
        try:
            self.seen.append(orjson.loads(body) if body else None)
        except orjson.JSONDecodeError:
            self.seen.append(body)
        try:
            parsed = self.seen[-1]
            if isinstance(parsed, dict) and not 1 <= (parsed.get("n") or 1) <= 8:  # vLLM caps n too
                raise ValueError("n")
            reply = self.replayer.handle(request.method, request.url.path, body)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RequestError) as e:
            err = {"error": {"message": f"upstream refused: {type(e).__name__}", "type": "BadRequestError",
                             "param": None, "code": 400}}
            return httpx.Response(400, stream=Chunks([orjson.dumps(err)]), headers={"content-type": "application/json"})
        return httpx.Response(reply.status, stream=Chunks(list(reply.parts)),
                              headers={"content-type": reply.content_type.decode()})


@pytest.fixture(scope="module")
def upstream() -> SturdyUpstream:
    return SturdyUpstream()


@pytest.fixture(scope="module")
def proxy(upstream: SturdyUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    db = tmp_path_factory.mktemp("fuzz") / "audit.db"
    s = load_settings({"upstream": "http://upstream.test", "models": ["smollm2"], "audit.url": f"sqlite:///{db}",
                       "max_body_bytes": 65536}, environ={})
    app = create_app(s, transport=httpx.MockTransport(upstream))
    with serve_in_thread(app) as url:
        yield url, app


def test_openapi_covers_the_proxys_own_routes(proxy: tuple[str, Any]) -> None:
    url, _ = proxy
    spec = httpx.get(url + "/openapi.json").json()
    assert OWN_ROUTES <= set(spec["paths"])
    assert "/v1/{path}" not in spec["paths"]  # the pass-through is not ours to describe
    chat = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"messages", "entropy_detail", "top_logprobs"} <= set(chat["properties"])


def _encode(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    try:
        return orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:  # integers over 64 bits
        return json.dumps(body).encode()


def test_schemathesis_generated_requests_never_get_a_5xx(proxy: tuple[str, Any]) -> None:
    url, app = proxy
    schema = schemathesis.openapi.from_dict(app.openapi())
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in operations} >= OWN_ROUTES
    sent = 0
    failures: list[str] = []
    with httpx.Client(base_url=url, timeout=20) as client:
        for op in operations:
            n = EXAMPLES.get(op.path, OTHER_EXAMPLES)
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @given(case=op.as_strategy(generation_mode=mode))
                @settings(max_examples=n, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
                def run(case: Any) -> None:
                    nonlocal sent
                    headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "content-length"}
                    kwargs: dict[str, Any] = {"headers": headers, "params": case.query or None}
                    if case.body is not None and not isinstance(case.body, type(schemathesis.core.NOT_SET)):
                        kwargs["content"] = _encode(case.body)
                        headers.setdefault("content-type", case.media_type or "application/json")
                    r = client.request(case.method, case.formatted_path, **kwargs)
                    sent += 1
                    if r.status_code >= 500:
                        failures.append(f"{case.method} {case.formatted_path} {kwargs.get('content')!r:.300} "
                                        f"-> {r.status_code} {r.text[:200]}")
                    elif r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
                        err = r.json().get("error")
                        assert isinstance(err, dict) and set(err) >= ERROR_KEYS, r.text[:300]

                try:
                    run()
                except Unsatisfiable:  # nothing to make invalid (a GET without parameters)
                    assert mode is GenerationMode.NEGATIVE
    print(f"\nschemathesis: {sent} requests over {len(operations)} operations, {len(failures)} 5xx")
    assert not failures, failures[:5]
    assert sent >= 1000
    assert httpx.get(url + "/healthz").status_code == 200


BAD: list[tuple[str, bytes, int, str | None]] = [
    ("malformed JSON", b'{"model": "smollm2", "messages": [', 400, None),
    ("empty body", b"", 400, None),
    ("JSON null", b"null", 400, None),
    ("array body", b"[]", 400, None),
    ("messages a string", orjson.dumps(chat_body(messages="hi")), 400, "messages"),
    ("stream a string", orjson.dumps(chat_body(stream="yes")), 400, "stream"),
    ("n a boolean", orjson.dumps(chat_body(n=True)), 400, "n"),
    ("n zero", orjson.dumps(chat_body(n=0)), 400, "n"),
    ("top_logprobs a string", orjson.dumps(chat_body(logprobs=True, top_logprobs="5")), 400, "top_logprobs"),
    ("top_logprobs 1e400", b'{"model":"smollm2","messages":[],"logprobs":true,"top_logprobs":1e400}', 400,
     "top_logprobs"),
    ("n 10**30", b'{"model":"smollm2","messages":[],"n":1000000000000000000000000000000}', None, None),
    ("model a number", orjson.dumps(chat_body(model=7)), 400, "model"),
    ("entropy_detail unknown", orjson.dumps(chat_body(entropy_detail="all")), 400, "entropy_detail"),
    ("non-UTF-8 bytes", b'{"model": "smollm2\xff\xfe", "messages": []}', 400, None),
    ("lone surrogate escape", b'{"model": "\\ud800", "messages": []}', None, None),
    ("NUL bytes", b'{"model": "smol\x00lm2", "messages": []}', 400, None),
    ("deeply nested", b'{"model": "smollm2", "messages": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", 400, None),
    ("body over the limit", orjson.dumps(chat_body(pad="x" * 70_000)), 413, None),
]


@pytest.mark.parametrize(("what", "raw", "status", "param"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_answer(proxy: tuple[str, Any], what: str, raw: bytes, status: int | None,
                                       param: str | None) -> None:
    url, _ = proxy
    r = httpx.post(url + CHAT, content=raw, headers={"content-type": "application/json"}, timeout=20)
    if status is None:  # valid JSON the proxy forwards: the upstream's 4xx (or 200) comes back, never a 5xx
        assert r.status_code < 500, r.text[:300]
    else:
        assert r.status_code == status, r.text[:300]
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == ERROR_KEYS and err["message"]
        if param is not None:
            assert err["param"] == param and param in err["message"]
    assert httpx.get(url + "/healthz").status_code == 200


def test_unknown_fields_are_forwarded_untouched(proxy: tuple[str, Any], upstream: SturdyUpstream) -> None:
    url, _ = proxy
    extra = {"x_vendor": {"nested": [1, 2.5, None, "é"]}, "repetition_penalty": 1.1, "guided_json": {"type": "x"}}
    for path, body in ((CHAT, chat_body(**extra)), (COMPLETIONS, {"model": "smollm2", "prompt": "a", **extra})):
        r = httpx.post(url + path, json=body, timeout=20)
        assert r.status_code == 200
        sent = upstream.seen[-1]
        assert {k: sent[k] for k in extra} == extra
