"""OpenTelemetry export (proxy/otel/): GenAI spans and evaluation events as the SDK sends them over OTLP/HTTP to
a fake collector, trace-context continuation, feedback in the response's trace, nothing loaded when off, and
an exporter that is down or slow: requests unaffected, the loss counted. The real receiver (Arize Phoenix) is
tests/test_otel_phoenix.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from proxy.otel import traceparent
from tests.fakes.otlp_collector import run_collector
from tests.plugins.recorded import RecordedUpstream, proxy_client
from tests.plugins.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Name a colour."}], "temperature": 0.7,
        "max_tokens": 16}
SPAN_KIND_INTERNAL, SPAN_KIND_CLIENT = 1, 3


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch):
    with run_collector() as (col, url):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "5")
        for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_TRACES_SAMPLER", "OTEL_SDK_DISABLED"):
            monkeypatch.delenv(name, raising=False)
        yield col


def otel_client(up: RecordedUpstream, *components: str, **settings: Any):
    return proxy_client(up, components=(*components, "proxy.otel"), **{"otel.enabled": True, **settings})


def audited_otel_client(up: RecordedUpstream, tmp_path: Path):
    """With the audit trail on (every response recorded, feedback open to any client), in ``tmp_path``."""
    return otel_client(up, "proxy.audit", **{"audit.enabled": True, "audit.sample_rate": 1.0, "audit.public": True,
                                             "audit.url": f"sqlite:///{tmp_path}/audit.db"})


def evaluations(span: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["attributes"] for e in span["events"] if e["name"] == "gen_ai.evaluation.result"]


# -- traceparent -----------------------------------------------------------------------------------------------------
def test_traceparent_parse_and_format() -> None:
    assert traceparent.parse(f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01") == (int(CLIENT_TRACE, 16), int(CLIENT_SPAN, 16), 1)
    assert traceparent.parse(f" 00-{CLIENT_TRACE.upper()}-{CLIENT_SPAN}-00 ")[2] == 0
    # a later version may append fields; version ff, zero ids, short fields and non-hex are invalid
    assert traceparent.parse(f"01-{CLIENT_TRACE}-{CLIENT_SPAN}-01-extra") is not None
    for bad in (None, "", f"ff-{CLIENT_TRACE}-{CLIENT_SPAN}-01", f"00-{'0' * 32}-{CLIENT_SPAN}-01",
                f"00-{CLIENT_TRACE}-{'0' * 16}-01", f"00-{CLIENT_TRACE[:-1]}-{CLIENT_SPAN}-01",
                f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01-extra", f"00-{CLIENT_TRACE}-{CLIENT_SPAN[:-1]}x-01", "00-1-2-3"):
        assert traceparent.parse(bad) is None, bad
    assert traceparent.format(1, 2, True) == f"00-{1:032x}-{2:016x}-01"
    assert traceparent.format(1, 2, False).endswith("-00")


# -- spans -----------------------------------------------------------------------------------------------------------
async def test_unary_chat_span_continues_the_client_trace(recorded: RecordedUpstream, collector) -> None:
    recorded.serve("/v1/chat/completions", "chat_k20.json")
    async with otel_client(recorded) as c:
        r = await c.post("/v1/chat/completions", json=CHAT,
                         headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "tracestate": "vendor=x"})
        assert r.status_code == 200
        body = r.json()
    [span] = collector.wait_for(1)
    # the client's trace continues; the upstream is told the proxy's span is its parent
    assert span["trace_id"] == CLIENT_TRACE
    assert span["parent_span_id"] == CLIENT_SPAN
    sent = recorded.requests[-1][2]
    assert sent["traceparent"] == f"00-{CLIENT_TRACE}-{span['span_id']}-01"
    assert sent["tracestate"] == "vendor=x"
    assert span["name"] == "chat smollm2"
    assert span["kind"] == SPAN_KIND_CLIENT
    assert span["resource"]["service.name"] == "entropy-proxy"
    a = span["attributes"]
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "smollm2"
    assert a["gen_ai.request.temperature"] == 0.7
    assert a["gen_ai.request.max_tokens"] == 16
    assert a["gen_ai.response.id"] == body["id"] == r.headers["x-entropy-request-id"]
    assert a["gen_ai.response.model"] == body["model"]
    assert a["gen_ai.usage.input_tokens"] == body["usage"]["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == body["usage"]["completion_tokens"]
    assert a["gen_ai.response.finish_reasons"] == [body["choices"][0]["finish_reason"]]
    assert a["server.address"] == "upstream.test"
    assert a["http.response.status_code"] == 200
    assert "gen_ai.request.stream" not in a and "gen_ai.response.time_to_first_chunk" not in a
    assert span["start"] < span["end"]
    summary = body["choices"][0]["entropy"]
    label = ",".join(summary["flags"]) or "none"
    assert a["entropy_proxy.entropy.mean"] == summary["mean"]
    assert a["entropy_proxy.entropy.flags"] == label
    evs = {e["gen_ai.evaluation.name"]: e for e in evaluations(span)}
    assert set(evs) == {"mean_entropy", "confidence", "forking_fraction"}
    for name, key in (("mean_entropy", "mean"), ("confidence", "confidence"), ("forking_fraction", "forking_fraction")):
        assert evs[name]["gen_ai.evaluation.score.value"] == pytest.approx(summary[key])
        assert evs[name]["gen_ai.evaluation.score.label"] == label
        assert evs[name]["entropy_proxy.choice.index"] == 0
        assert "gen_ai.response.id" not in evs[name]  # the event is on the span that carries it


async def test_every_choice_gets_its_evaluations(recorded: RecordedUpstream, collector) -> None:
    recorded.serve("/v1/chat/completions", "chat_n2_k5.json")
    async with otel_client(recorded) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "n": 2, "top_logprobs": 5, "logprobs": True})
        choices = r.json()["choices"]
    [span] = collector.wait_for(1)
    assert span["attributes"]["gen_ai.request.choice.count"] == 2
    evs = evaluations(span)
    assert len(evs) == 6
    for ch in choices:
        mine = [e for e in evs if e["entropy_proxy.choice.index"] == ch["index"]]
        assert {e["gen_ai.evaluation.name"]: e["gen_ai.evaluation.score.value"] for e in mine} == pytest.approx(
            {"mean_entropy": ch["entropy"]["mean"], "confidence": ch["entropy"]["confidence"],
             "forking_fraction": ch["entropy"]["forking_fraction"]})


async def test_stream_span_has_time_to_first_chunk_and_usage(recorded: RecordedUpstream, collector) -> None:
    recorded.serve("/v1/chat/completions", "chat_stream_k20.sse")
    async with otel_client(recorded) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True,
                                                       "stream_options": {"include_usage": True}})
        events = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: {")]
    [span] = collector.wait_for(1)
    a = span["attributes"]
    assert a["gen_ai.request.stream"] is True
    ttfc = a["gen_ai.response.time_to_first_chunk"]
    assert 0 < ttfc * 1e9 <= span["end"] - span["start"]
    usage = next(e["usage"] for e in events if e.get("usage"))
    assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert a["gen_ai.response.id"] == events[0]["id"]
    final = next(ch["entropy"] for e in events for ch in e["choices"] if ch.get("finish_reason"))
    evs = {e["gen_ai.evaluation.name"]: e for e in evaluations(span)}
    assert evs["mean_entropy"]["gen_ai.evaluation.score.value"] == pytest.approx(final["mean"])


async def test_completions_is_text_completion(recorded: RecordedUpstream, collector) -> None:
    recorded.serve("/v1/completions", "comp_k5.json")
    async with otel_client(recorded) as c:
        r = await c.post("/v1/completions", json={"model": "smollm2", "prompt": "The sky is", "max_tokens": 8})
        assert r.status_code == 200
    [span] = collector.wait_for(1)
    assert span["name"] == "text_completion smollm2"
    assert span["attributes"]["gen_ai.operation.name"] == "text_completion"
    assert len(evaluations(span)) == 3


async def test_without_client_context_a_new_trace_is_forwarded(recorded: RecordedUpstream, collector) -> None:
    recorded.serve("/v1/chat/completions", "chat_k20.json")
    async with otel_client(recorded) as c:
        await c.post("/v1/chat/completions", json=CHAT)
        await c.post("/v1/chat/completions", json=CHAT, headers={"traceparent": "00-garbage-01"})
    spans = collector.wait_for(2)
    sent = [h["traceparent"] for _, _, h in recorded.requests]
    assert sorted(sent) == sorted(f"00-{s['trace_id']}-{s['span_id']}-01" for s in spans)
    assert all(s["parent_span_id"] == "" for s in spans)
    assert spans[0]["trace_id"] != spans[1]["trace_id"]


async def test_unsampled_client_trace_exports_nothing_and_says_so_upstream(recorded: RecordedUpstream,
                                                                            collector) -> None:
    recorded.serve("/v1/chat/completions", "chat_k20.json")
    recorded.serve("/v1/completions", "comp_k5.json")
    async with otel_client(recorded) as c:
        r = await c.post("/v1/chat/completions", json=CHAT,
                         headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"})
        assert r.status_code == 200
        await c.post("/v1/completions", json={"model": "smollm2", "prompt": "x"})  # sampled: a marker
    [span] = collector.wait_for(1)
    assert span["name"].startswith("text_completion")
    sent = recorded.requests[0][2]["traceparent"]
    assert sent.startswith(f"00-{CLIENT_TRACE}-") and sent.endswith("-00") and CLIENT_SPAN not in sent


async def test_upstream_error_is_an_error_span_without_evaluations(recorded: RecordedUpstream, collector) -> None:
    recorded.serve("/v1/chat/completions", "chat_err_model.json", status=404)
    recorded.serve("/v1/completions", body=b"not json", status=200)
    async with otel_client(recorded) as c:
        assert (await c.post("/v1/chat/completions", json={**CHAT, "model": "nope"})).status_code == 404
        assert (await c.post("/v1/completions", json={"model": "smollm2", "prompt": "x"})).status_code == 502
    spans = {s["name"].split()[0]: s for s in collector.wait_for(2)}
    a = spans["chat"]["attributes"]
    assert a["http.response.status_code"] == 404 and a["error.type"] == "status_4xx"
    assert a["gen_ai.request.model"] == "nope"
    assert evaluations(spans["chat"]) == []
    b = spans["text_completion"]
    assert b["attributes"]["http.response.status_code"] == 502
    assert b["status"] == 2  # STATUS_CODE_ERROR


async def test_other_routes_are_not_traced(recorded: RecordedUpstream, collector) -> None:
    recorded.serve("/v1/models", "models.json")
    recorded.serve("/v1/chat/completions", "chat_k20.json")
    async with otel_client(recorded) as c:
        r = await c.get("/v1/models", headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
        assert r.status_code == 200
        await c.post("/v1/chat/completions", json=CHAT)
    [span] = collector.wait_for(1)
    assert span["name"] == "chat smollm2"
    # pass-through routes forward the client's context untouched, as without otel
    assert recorded.requests[0][2]["traceparent"] == f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


async def test_the_configured_sampler_decides_on_arrival(recorded: RecordedUpstream, collector,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    recorded.serve("/v1/chat/completions", "chat_k20.json")
    async with otel_client(recorded) as c:
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200 and "traceresponse" not in r.headers
    assert recorded.requests[0][2]["traceparent"].endswith("-00")  # the upstream is told: not sampled
    assert collector.requests == 0


async def test_otel_sdk_disabled_traces_nothing(recorded: RecordedUpstream, collector,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    recorded.serve("/v1/chat/completions", "chat_k20.json")
    async with otel_client(recorded) as c:
        await c.post("/v1/chat/completions", json=CHAT, headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
        assert not hasattr(c.app.state, "otel")
    assert recorded.requests[0][2]["traceparent"] == f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"  # as with otel off
    assert collector.requests == 0


async def test_feedback_and_later_evaluations_join_the_response_trace(recorded: RecordedUpstream, collector,
                                                                       tmp_path: Path) -> None:
    recorded.serve("/v1/chat/completions", "chat_k20.json")
    async with audited_otel_client(recorded, tmp_path) as c:
        r = await c.post("/v1/chat/completions", json=CHAT)
        rid = r.json()["id"]
        fb = await c.post("/v1/feedback", json={"id": rid, "correct": False, "note": "wrong colour"})
        assert fb.status_code == 200, fb.text
        assert (await c.post("/v1/feedback", json={"id": "unknown", "correct": True})).status_code == 404
        c.app.state.otel.evaluation(rid, "semantic_entropy", 1.25, "high", "meaning clusters over 5 samples")
    spans = collector.wait_for(3)
    by_name = {s["name"]: s for s in spans}
    req = by_name["chat smollm2"]
    for name, value, label in (("evaluation feedback", 0.0, "incorrect"),
                               ("evaluation semantic_entropy", 1.25, "high")):
        s = by_name[name]
        assert s["trace_id"] == req["trace_id"] and s["parent_span_id"] == req["span_id"]
        assert s["links"] == [{"trace_id": req["trace_id"], "span_id": req["span_id"]}]
        assert s["kind"] == SPAN_KIND_INTERNAL
        [ev] = evaluations(s)
        assert ev["gen_ai.evaluation.score.value"] == value and ev["gen_ai.evaluation.score.label"] == label
        assert ev["gen_ai.response.id"] == rid
    assert len(spans) == 3  # the 404 feedback made no span


async def test_semantic_entropy_results_become_evaluations_in_the_trace(recorded: RecordedUpstream,
                                                                         collector) -> None:
    recorded.serve("/v1/chat/completions", "chat_k20.json")
    async with otel_client(recorded, "tests.fakes.semantic_component") as c:
        r = await c.post("/v1/chat/completions", json=CHAT)
        rid = r.json()["id"]
        [sink] = c.app.state.semantic.sinks  # otel hooked itself onto the semantic part
        high = c.app.state.settings.semantic.uncertain_nats + 0.3  # above the flag's cut-off, whatever its default
        result = SimpleNamespace(entropy=high, discrete=0.67, samples=5, clusters=[{}, {}])
        sink(SimpleNamespace(request_id=rid, choice_index=0, flags=frozenset({"confident"})), result)
        sink(SimpleNamespace(request_id=rid, choice_index=0, flags=frozenset()),
             SimpleNamespace(entropy=0.1, discrete=0.0, samples=5, clusters=[{}]))
    spans = collector.wait_for(3)
    req = next(s for s in spans if s["name"] == "chat smollm2")
    evs = [evaluations(s)[0] for s in spans if s["name"] == "evaluation semantic_entropy"]
    assert all(s["parent_span_id"] == req["span_id"] for s in spans if s is not req)
    assert [(e["gen_ai.evaluation.score.value"], e["gen_ai.evaluation.score.label"]) for e in evs] == [
        (pytest.approx(high), "confident_inconsistent"), (0.1, "consistent")]
    assert evs[0]["entropy_proxy.semantic.clusters"] == 2 and evs[0]["entropy_proxy.choice.index"] == 0


async def test_traceresponse_lets_feedback_find_the_trace_without_the_index(recorded: RecordedUpstream, collector,
                                                                             tmp_path: Path) -> None:
    recorded.serve("/v1/chat/completions", "chat_k20.json")
    async with audited_otel_client(recorded, tmp_path) as c:
        r = await c.post("/v1/chat/completions", json=CHAT)
        own = r.headers["traceresponse"]
        c.app.state.otel._known.clear()  # as after a restart, or on another worker
        fb = await c.post("/v1/feedback", json={"id": r.json()["id"], "correct": True}, headers={"traceparent": own})
        assert fb.status_code == 200
    spans = {s["name"]: s for s in collector.wait_for(2)}
    req, fb_span = spans["chat smollm2"], spans["evaluation feedback"]
    assert own == f"00-{req['trace_id']}-{req['span_id']}-01"
    assert fb_span["trace_id"] == req["trace_id"] and fb_span["parent_span_id"] == req["span_id"]


def test_off_loads_no_opentelemetry(tmp_path: Path) -> None:
    """With otel off the proxy adds no OpenTelemetry module to what FastAPI itself imports (FastAPI >= 0.16x
    imports opentelemetry-api for its own, unconfigured, telemetry), and none of the SDK or exporter."""
    script = r"""
import asyncio, json, sys
import fastapi  # noqa: F401
baseline = {m for m in sys.modules if m.startswith("opentelemetry")}
import httpx
from proxy.app import COMPONENTS, create_app
from proxy.settings import load_settings
from tests.plugins.recorded import RecordedUpstream, UPSTREAM

async def main():
    up = RecordedUpstream()
    up.serve("/v1/chat/completions", "chat_k20.json")
    s = load_settings({"upstream": UPSTREAM, "models": ["smollm2"], "audit.url": sys.argv[1]}, environ={})
    assert "proxy.otel" in COMPONENTS and not s.otel.enabled
    app = create_app(s, transport=httpx.MockTransport(up))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://p") as c:
            r = await c.post("/v1/chat/completions", json={"model": "smollm2", "messages": []})
            assert r.status_code == 200, r.text
    assert not hasattr(app.state, "otel")
asyncio.run(main())
added = sorted(m for m in sys.modules if m.startswith(("opentelemetry", "proxy.otel")) and m not in baseline)
print(json.dumps({"added": added, "sdk": sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk"))}))
"""
    out = subprocess.run([sys.executable, "-c", script, f"sqlite:///{tmp_path}/a.db"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # proxy.otel itself is imported (the component list names it); its install() returns before anything else
    assert result == {"added": ["proxy.otel"], "sdk": []}


# -- an exporter that is down or slow ---------------------------------------------------------------------------------
def _dropped(app: Any) -> dict[str, float]:
    reg = app.state.registry
    return {r: reg.get_sample_value("entropy_proxy_otel_dropped_total", {"reason": r}) or 0.0
            for r in ("queue_full", "export_failed", "shutdown")}


def _serve_both(up: RecordedUpstream) -> None:
    """chat_k20 for plain requests, chat_stream_k20 for streams."""
    plain, stream = RecordedUpstream(), RecordedUpstream()
    plain.serve("/v1/chat/completions", "chat_k20.json")
    stream.serve("/v1/chat/completions", "chat_stream_k20.sse")
    up.routes["/v1/chat/completions"] = lambda body: (
        (stream if body and body.get("stream") else plain).routes["/v1/chat/completions"](body))


async def _bodies(up: RecordedUpstream, n: int, **settings: Any) -> tuple[list[tuple[int, bytes]], Any]:
    out = []
    async with proxy_client(up, components=("proxy.otel",), **settings) as c:
        for i in range(n):
            r = await c.post("/v1/chat/completions", json={**CHAT, "stream": i % 2 == 1})
            out.append((r.status_code, r.content))
        app = c.app
    return out, app


async def test_exporter_down_requests_unaffected_loss_counted(recorded: RecordedUpstream,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _serve_both(recorded)
    baseline, _ = await _bodies(recorded, 6)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nobody listens
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "4")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2")
    got, app = await _bodies(recorded, 6, **{"otel.enabled": True})
    # the same answers, byte for byte, as with otel off (the fixtures replay the same upstream bytes)
    assert [s for s, _ in baseline] == [200] * 6
    assert got == baseline
    # after the stop (lifespan exit) every one of the 6 spans is accounted for as lost
    dropped = _dropped(app)
    assert sum(dropped.values()) == 6, dropped
    assert dropped["export_failed"] >= 1
    assert app.state.registry.get_sample_value("entropy_proxy_otel_exported_spans_total") == 0


async def test_exporter_slow_requests_unaffected_queue_bounded(recorded: RecordedUpstream,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    recorded.serve("/v1/chat/completions", "chat_k20.json")
    with run_collector() as (col, url):
        col.hold = True  # every export waits until the test releases it
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "30")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "10")
        monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "3")
        monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1")
        async with proxy_client(recorded, components=("proxy.otel",), **{"otel.enabled": True}) as c:
            assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
            assert col.arrived.wait(30), "the first export never reached the collector"
            # the exporter thread is now stuck inside an export that the collector holds
            statuses = [(await c.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(10)]
            assert statuses == [200] * 10
            assert not col.release.is_set() and col.requests == 1  # all 10 answered while the export hung
            dropped = _dropped(c.app)
            assert dropped["queue_full"] == 10 - 3, dropped  # the queue holds 3; the rest are counted, not kept
            col.release.set()
            app = c.app
        col.wait_for(1 + 3)
        assert app.state.registry.get_sample_value("entropy_proxy_otel_exported_spans_total") == 4
