"""The fake upstreams behave as documented: the replaying upstream like vLLM, each fault as described."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from bench.replay_upstream import start_replay_upstream
from tests.fakes.fault_upstream import FaultUpstream, closed_port_url

FIX = Path(__file__).parent / "fixtures" / "vllm"
CHAT = "/v1/chat/completions"


def chat(k: int | None = 20, **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], **kw}
    if k is not None:
        body.update(logprobs=True, top_logprobs=k)
    return body


def events(text: str) -> list[Any]:
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n")[:-1]:  # complete events only
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def entries(evs: list[Any]) -> list[dict[str, Any]]:
    return [e for ev in evs if isinstance(ev, dict) for c in ev.get("choices", []) if c.get("logprobs")
            for e in c["logprobs"]["content"]]


@pytest.fixture(scope="module")
def replay() -> Iterator[httpx.Client]:
    url, stop = start_replay_upstream(tokens=32)
    with httpx.Client(base_url=url, timeout=10) as client:
        yield client
    stop()


@pytest.fixture()
def fake() -> Iterator[FaultUpstream]:
    with FaultUpstream(stall_s=5) as f:
        yield f


# ---------------------------------------------------------------- replaying upstream


def test_replay_chat_trims_to_k_sampled_first_then_rank_order(replay: httpx.Client) -> None:
    recorded = orjson.loads((FIX / "chat_k20_long.json").read_bytes())["choices"][0]["logprobs"]["content"]
    for k in (0, 1, 5, 20):
        body = replay.post(CHAT, json=chat(k)).json()
        content = body["choices"][0]["logprobs"]["content"]
        assert len(content) == 32 and body["usage"]["completion_tokens"] == 32
        assert body["choices"][0]["message"]["content"] == "".join(e["token"] for e in content)
        for got, rec in zip(content, recorded, strict=False):
            assert got["top_logprobs"] == rec["top_logprobs"][:k]
            if k:
                assert got["top_logprobs"][0]["token"] == got["token"]
                rest = [t["logprob"] for t in got["top_logprobs"][1:]]
                assert rest == sorted(rest, reverse=True)


def test_replay_tokens_cycle_past_the_recording_and_max_tokens_shortens() -> None:
    url, stop = start_replay_upstream(tokens=400)
    try:
        body = httpx.post(url + CHAT, json=chat(3)).json()
        assert len(body["choices"][0]["logprobs"]["content"]) == 400
        short = httpx.post(url + CHAT, json=chat(3, max_tokens=7)).json()
        assert len(short["choices"][0]["logprobs"]["content"]) == 7
    finally:
        stop()


def test_replay_legacy_completions_dict_holds_sampled_plus_top_k(replay: httpx.Client) -> None:
    body = replay.post("/v1/completions", json={"model": "smollm2", "prompt": "x", "logprobs": 5}).json()
    lp = body["choices"][0]["logprobs"]
    assert body["object"] == "text_completion" and len(lp["tokens"]) == 32
    assert body["choices"][0]["text"] == "".join(lp["tokens"])
    for tok, val, top, off, nxt in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], lp["text_offset"],
                                       lp["text_offset"][1:], strict=False):
        assert top[tok] == val and 5 <= len(top) <= 6 and nxt - off == len(tok)
        # 6 entries exactly when the sampled token ranks below the top 5
        assert (len(top) == 6) == (sum(v > val for v in top.values()) >= 5)


def test_replay_chat_stream_one_token_per_chunk_with_usage(replay: httpx.Client) -> None:
    r = replay.post(CHAT, json=chat(4, stream=True, stream_options={"include_usage": True}))
    assert r.headers["content-type"].startswith("text/event-stream")
    evs = events(r.text)
    assert evs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert evs[0]["choices"][0]["logprobs"] is None
    tok = evs[1:-2]
    assert len(tok) == 32 and all(len(e["choices"][0]["logprobs"]["content"]) == 1 for e in tok)
    assert tok[-1]["choices"][0]["finish_reason"] == "length"
    assert evs[-2]["choices"] == [] and evs[-2]["usage"]["completion_tokens"] == 32 and evs[-1] == "[DONE]"
    assert len({e["id"] for e in evs[:-1]}) == 1
    full = replay.post(CHAT, json=chat(4)).json()
    assert full["id"] != evs[0]["id"]
    assert full["choices"][0]["logprobs"]["content"] == entries(evs)


def test_replay_n2_streams_interleave_distinct_choices(replay: httpx.Client) -> None:
    evs = events(replay.post(CHAT, json=chat(2, n=2, stream=True, max_tokens=4)).text)
    idx = [e["choices"][0]["index"] for e in evs[:-1]]
    assert idx == [0, 1] * 5
    text = {i: "".join(e["choices"][0]["delta"].get("content", "") for e in evs[:-1]
                       if e["choices"][0]["index"] == i) for i in (0, 1)}
    assert text[0] != text[1]


def test_replay_k_over_max_answers_vllms_exact_forms(replay: httpx.Client) -> None:
    r = replay.post(CHAT, json=chat(21))
    assert r.status_code == 400 and r.content == (FIX / "chat_err_k21.json").read_bytes()
    r = replay.post(CHAT, json=chat(21, stream=True))
    assert r.status_code == 200 and r.content == (FIX / "chat_stream_err_k21.sse").read_bytes()


def test_replay_request_errors(replay: httpx.Client) -> None:
    r = replay.post(CHAT, json={"model": "smollm2", "messages": [], "top_logprobs": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = replay.post(CHAT, json=chat(None, model="nope"))
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
    r = replay.post(CHAT, content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == 400
    assert replay.post(CHAT, json=chat(None)).json()["choices"][0]["logprobs"] is None


def test_replay_models_metrics_and_low_entropy_switch() -> None:
    url, stop = start_replay_upstream(tokens=16)
    try:
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "smollm2"
        assert httpx.post(url + "/_replay/config", json={"entropy": "low"}).json()["entropy"] == "low"
        content = httpx.post(url + CHAT, json=chat(20)).json()["choices"][0]["logprobs"]["content"]
        for e in content:
            probs = [math.exp(t["logprob"]) for t in e["top_logprobs"]]
            assert max(probs) >= 0.99 and sum(probs) <= 1.0
        assert httpx.post(url + "/_replay/config", json={"entropy": "bogus"}).status_code == 400
        metrics = httpx.get(url + "/metrics").text
        assert 'vllm:generation_tokens_total{model_name="smollm2"} 16' in metrics
    finally:
        stop()


def test_replay_token_delay_paces_the_stream() -> None:
    url, stop = start_replay_upstream(tokens=6, token_delay_ms=40)
    try:
        arrivals = []
        t0 = time.perf_counter()
        with httpx.stream("POST", url + CHAT, json=chat(1, stream=True)) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.perf_counter() - t0)
        assert len(arrivals) == 7  # role + 6 tokens
        assert arrivals[-1] >= 5 * 0.04 * 0.9  # a lower bound: a loaded machine only adds to it
    finally:
        stop()


def test_replay_first_token_comes_with_the_role_chunk_not_after_a_delay() -> None:
    """With a 60 s delay between tokens, the role chunk and the first token still arrive: a read timeout far
    below the delay would fire if the first token waited for it."""
    url, stop = start_replay_upstream(tokens=2, token_delay_ms=60_000)
    try:
        got = []
        with httpx.Client(timeout=20.0) as c, c.stream("POST", url + CHAT, json=chat(1, stream=True)) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    got.append(json.loads(line[6:]))
                if len(got) == 2:
                    break
        assert got[0]["choices"][0]["delta"].get("role") == "assistant"
        assert got[1]["choices"][0]["logprobs"]["content"]
    finally:
        stop()


# ---------------------------------------------------------------- fault upstream


def test_fault_ok_records_bodies_and_keeps_alive(fake: FaultUpstream) -> None:
    with httpx.Client(base_url=fake.url) as c:
        assert len(c.post(CHAT, json=chat(20)).json()["choices"][0]["logprobs"]["content"]) == 8
        assert len(entries(events(c.post(CHAT, json=chat(5, stream=True)).text))) == 8
    assert [b["top_logprobs"] for b in fake.bodies()] == [20, 5]
    deadline = time.monotonic() + 2
    while not all(r.finished for r in fake.requests) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(r.finished and not r.closed_by_client for r in fake.requests)


def test_fault_mode_by_header_or_model_name(fake: FaultUpstream) -> None:
    assert httpx.post(fake.url + CHAT, json=chat(), headers={"X-Fault": "status-503"}).status_code == 503
    r = httpx.post(fake.url + CHAT, json=chat(model="fault-5xx"))
    assert r.status_code == 500 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert [r.mode for r in fake.requests] == ["status-503", "5xx"]


def test_fault_connection_level_failures(fake: FaultUpstream) -> None:
    with pytest.raises(httpx.ConnectError):
        httpx.post(closed_port_url() + CHAT, json=chat())
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        httpx.post(fake.url + CHAT, json=chat(), headers={"X-Fault": "reset"})
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(fake.url + CHAT, json=chat(), headers={"X-Fault": "truncated"})
    r = httpx.post(fake.url + CHAT, json=chat(), headers={"X-Fault": "malformed-json"})
    with pytest.raises(json.JSONDecodeError):
        r.json()


def test_fault_hang_and_stall_record_the_client_going_away(fake: FaultUpstream) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(fake.url + CHAT, json=chat(), headers={"X-Fault": "hang"}, timeout=0.3)
    assert fake.wait_closed(-1, 15.0) and fake.requests[-1].closed_by_client
    # The read timeout also covers the status line: generous enough for a loaded CI machine, far below stall_s.
    with httpx.Client(timeout=3.0) as c, c.stream("POST", fake.url + CHAT, json=chat(stream=True),
                                                  headers={"X-Fault": "stall-mid"}) as r:
        assert r.status_code == 200
        got: list[str] = []
        with pytest.raises(httpx.ReadTimeout):
            for line in r.iter_lines():
                got.append(line)
    assert sum(line.startswith("data: ") for line in got) == 3
    assert fake.wait_closed(-1, 2.0)


def test_fault_slow_stream_sees_the_client_disconnect(fake: FaultUpstream) -> None:
    # 3 s a chunk: the fake still has most of its stream to send when the client goes
    with httpx.stream("POST", fake.url + CHAT, json=chat(stream=True), headers={"X-Fault": "slow-3000"}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    assert fake.wait_closed(-1, 15.0)
    rec = fake.requests[-1]
    assert rec.closed_by_client  # seen closing before the fake had finished answering


def test_fault_cut_streams(fake: FaultUpstream) -> None:
    got: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream(
            "POST", fake.url + CHAT, json=chat(stream=True), headers={"X-Fault": "cut-mid-chunk"}) as r:
        for text in r.iter_text():
            got.append(text)
    assert len(events("".join(got))) == 3
    text = httpx.post(fake.url + CHAT, json=chat(stream=True), headers={"X-Fault": "cut-mid-event"}).text
    assert len(events(text)) == 3 and not text.endswith("\n\n") and "[DONE]" not in text


def test_fault_stream_error_event(fake: FaultUpstream) -> None:
    evs = events(httpx.post(fake.url + CHAT, json=chat(stream=True), headers={"X-Fault": "stream-error"}).text)
    assert len(evs) == 5 and evs[3]["error"]["code"] == 500 and evs[4] == "[DONE]"


@pytest.mark.parametrize("stream", [False, True])
def test_fault_logprob_value_faults(fake: FaultUpstream, stream: bool) -> None:
    def get(mode: str) -> list[dict[str, Any]]:
        r = httpx.post(fake.url + CHAT, json=chat(stream=stream), headers={"X-Fault": mode})
        if stream:
            return entries(events(r.text))
        return r.json()["choices"][0]["logprobs"]["content"]

    null = get("null-logprobs")
    assert [e["logprob"] is None for e in null[:4]] == [False, True, True, False]
    nan = get("nan-logprobs")
    assert math.isnan(nan[1]["logprob"]) and math.isnan(nan[2]["top_logprobs"][0]["logprob"])
    assert all(e["logprob"] > 0 for e in get("positive-logprobs"))
    fb = get("fallback")
    if stream:
        assert "logprob" not in fb[1] and "top_logprobs" not in fb[2] and "logprob" in fb[3]
    else:
        assert fb[1]["logprob"] == -9999.0 and fb[2]["top_logprobs"] == [] and fb[3]["top_logprobs"]
    r = httpx.post(fake.url + CHAT, json=chat(stream=stream), headers={"X-Fault": "drop-logprobs"})
    assert '"top_logprobs"' not in r.text and '"logprobs":{' not in r.text
    assert fake.requests[-1].json["logprobs"] is True


def test_fault_nan_is_not_json(fake: FaultUpstream) -> None:
    r = httpx.post(fake.url + CHAT, json=chat(), headers={"X-Fault": "nan-logprobs"})
    assert b"NaN" in r.content
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(r.content)


def test_fault_stream_framing_variants(fake: FaultUpstream) -> None:
    def post(mode: str) -> str:
        return httpx.post(fake.url + CHAT, json=chat(stream=True), headers={"X-Fault": mode}).text

    plain = entries(events(post("ok")))
    multi = events(post("multi-token"))
    assert entries(multi) == plain and max(len(e["choices"][0]["logprobs"]["content"]) for e in multi
                                           if isinstance(e, dict) and e["choices"] and e["choices"][0]["logprobs"]) == 3
    empty = [e for e in events(post("empty-delta")) if isinstance(e, dict) and e["choices"]
             and e["choices"][0]["delta"] == {}]
    assert empty and all(e["choices"][0]["logprobs"]["content"] for e in empty)
    ka = post("keep-alive")
    assert ka.count(": keep-alive\n\n") == len(events(ka)) and entries(events(ka)) == plain
    crlf = post("crlf")
    assert "\r\n\r\n" in crlf and entries(events(crlf)) == plain


def test_fault_lower_max_logprobs_both_forms(fake: FaultUpstream) -> None:
    hdr = {"X-Fault": "max-logprobs-5"}
    r = httpx.post(fake.url + CHAT, json=chat(20), headers=hdr)
    assert r.status_code == 400 and "greater than max allowed: 5" in r.json()["error"]["message"]
    r = httpx.post(fake.url + CHAT, json=chat(20, stream=True), headers=hdr)
    assert r.status_code == 200 and events(r.text)[0]["error"]["param"] == "logprobs"
    r = httpx.post(fake.url + CHAT, json=chat(5), headers=hdr)
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 5


def test_fault_completions_null_logprobs(fake: FaultUpstream) -> None:
    body = {"model": "smollm2", "prompt": "x", "logprobs": 5}
    r = httpx.post(fake.url + "/v1/completions", json=body, headers={"X-Fault": "null-logprobs"})
    assert r.json()["choices"][0]["logprobs"]["token_logprobs"][1:3] == [None, None]


def test_overhead_harness_quick_run_direct_only(capsys: pytest.CaptureFixture[str]) -> None:
    """The benchmark harness keeps working (a CI smoke run: seconds, no thresholds)."""
    from bench import overhead

    assert overhead.main(["--quick", "--targets", "direct", "--long-seconds", "0", "--levels", "1,4"]) == 0
    out = capsys.readouterr().out
    assert "non-streaming 128-token K=20 latency" in out and "direct: stream True, non-stream True" in out
