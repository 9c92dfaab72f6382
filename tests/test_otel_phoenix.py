"""The ``phoenix`` tier: requests through the proxy (a recorded vLLM upstream; the tier under test is the receiver)
arrive in a real Arize Phoenix as GenAI spans with their entropy evaluations, read back through Phoenix's REST
API. The exporter is configured only by the standard OTEL_* variables, as a user would."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.app import create_app
from proxy.settings import load_settings
from tests.plugins.phoenix import PhoenixAPI, start_phoenix
from tests.plugins.recorded import UPSTREAM, RecordedUpstream
from tests.plugins.servers import serve_in_thread

pytestmark = [pytest.mark.phoenix, pytest.mark.slow]

PROJECT = "entropy-proxy-test"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Name a colour."}], "temperature": 0.7,
        "max_tokens": 16}


@pytest.fixture(scope="module")
def phoenix() -> Iterator[str]:
    with start_phoenix() as url:
        yield url


@pytest.fixture
def otel_env(phoenix: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", phoenix)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "entropy-proxy")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", f"openinference.project.name={PROJECT}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    return phoenix


def _upstream() -> RecordedUpstream:
    up, plain, stream = RecordedUpstream(), RecordedUpstream(), RecordedUpstream()
    plain.serve("/v1/chat/completions", "chat_k20.json")
    stream.serve("/v1/chat/completions", "chat_stream_k20.sse")
    up.routes["/v1/chat/completions"] = lambda body: (
        (stream if body and body.get("stream") else plain).routes["/v1/chat/completions"](body))
    up.serve("/v1/completions", "comp_k5.json")
    return up


def _evaluations(span: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["attributes"]["gen_ai.evaluation.name"]: e["attributes"] for e in span.get("events", [])
            if e["name"] == "gen_ai.evaluation.result"}


def test_requests_show_up_in_phoenix_with_genai_attributes_and_evaluations(otel_env: str, tmp_path: Path) -> None:
    up = _upstream()
    settings = load_settings({"upstream": UPSTREAM, "models": ["smollm2"], "otel.enabled": True, "audit.public": True,
                              "audit.sample_rate": 1.0, "audit.url": f"sqlite:///{tmp_path}/audit.db"}, environ={})
    app = create_app(settings, transport=httpx.MockTransport(up))
    with serve_in_thread(app) as proxy, httpx.Client(base_url=proxy, timeout=30) as client:
        r = client.post("/v1/chat/completions", json=CHAT,
                        headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
        assert r.status_code == 200
        unary = r.json()
        fb = client.post("/v1/feedback", json={"id": unary["id"], "correct": False})
        assert fb.status_code == 200, fb.text
        s = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert s.status_code == 200
        c = client.post("/v1/completions", json={"model": "smollm2", "prompt": "The sky is", "max_tokens": 8})
        assert c.status_code == 200
    # the server has stopped: its lifespan flushed the batch queue to Phoenix
    sent = [h["traceparent"] for path, _, h in up.requests if path.endswith("completions")]
    trace_ids = [tp.split("-")[1] for tp in sent]
    assert trace_ids[0] == CLIENT_TRACE
    with PhoenixAPI(otel_env, PROJECT) as api:
        check(api, unary, sent, trace_ids)


def check(api: PhoenixAPI, unary: dict[str, Any], sent: list[str], trace_ids: list[str]) -> None:
    spans = api.wait_spans(CLIENT_TRACE, 2)
    by_name = {sp["name"]: sp for sp in spans}
    chat = by_name["chat smollm2"]
    assert chat["context"]["trace_id"] == CLIENT_TRACE
    assert chat["parent_id"] == CLIENT_SPAN
    assert sent[0] == f"00-{CLIENT_TRACE}-{chat['context']['span_id']}-01"  # the upstream's parent is this span
    assert chat["span_kind"] == "LLM"  # Phoenix reads the GenAI attributes (docs/otel.md says so)
    a = chat["attributes"]
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "smollm2"
    assert a["gen_ai.request.temperature"] == 0.7
    assert a["gen_ai.request.max_tokens"] == 16
    assert a["gen_ai.response.id"] == unary["id"]
    assert a["gen_ai.response.model"] == "smollm2"
    assert a["gen_ai.usage.input_tokens"] == unary["usage"]["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == unary["usage"]["completion_tokens"]
    summary = unary["choices"][0]["entropy"]
    label = ",".join(summary["flags"]) or "none"
    evs = _evaluations(chat)
    assert evs["mean_entropy"]["gen_ai.evaluation.score.value"] == pytest.approx(summary["mean"])
    assert evs["confidence"]["gen_ai.evaluation.score.value"] == pytest.approx(summary["confidence"])
    assert evs["forking_fraction"]["gen_ai.evaluation.score.value"] == pytest.approx(summary["forking_fraction"])
    assert {e["gen_ai.evaluation.score.label"] for e in evs.values()} == {label}

    feedback = by_name["evaluation feedback"]
    assert feedback["parent_id"] == chat["context"]["span_id"]
    assert _evaluations(feedback)["feedback"]["gen_ai.evaluation.score.label"] == "incorrect"

    [stream] = api.wait_spans(trace_ids[1], 1)
    assert stream["parent_id"] in (None, "")
    sa = stream["attributes"]
    assert sa["gen_ai.request.stream"] is True
    assert sa["gen_ai.response.time_to_first_chunk"] > 0
    assert set(_evaluations(stream)) == {"mean_entropy", "confidence", "forking_fraction"}

    [comp] = api.wait_spans(trace_ids[2], 1)
    assert comp["name"] == "text_completion smollm2"
    assert comp["attributes"]["gen_ai.operation.name"] == "text_completion"
    assert len(_evaluations(comp)) == 3

