"""Streaming through the proxy against recorded vLLM streams: per-chunk entropy, summary at finish, framing."""

import httpx
import orjson

from proxy.sse import SSEDecoder
from tests.plugins.recorded import Chunks, fixture_bytes, proxy_client, sse_pieces

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def events(raw: bytes) -> list[bytes]:
    d = SSEDecoder()
    out = [e.data for e in d.decode(raw)]
    assert not d.pending
    return out


def chunks_of(raw: bytes) -> list[dict]:
    return [orjson.loads(d) for d in events(raw) if d not in (None, b"[DONE]")]


async def test_chat_stream_per_chunk_entropy_and_summary_at_finish(recorded):
    recorded.serve(CHAT, "chat_stream_k20.sse")
    async with proxy_client(recorded) as c:
        r = await c.post(CHAT, json=MSG)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert events(r.content)[-1] == b"[DONE]"
    upstream_chunks = chunks_of(fixture_bytes("chat_stream_k20.sse"))
    got = chunks_of(r.content)
    assert len(got) == len(upstream_chunks)
    n_tokens = 0
    for up, ch in zip(upstream_chunks, got, strict=True):
        if not up["choices"]:
            assert ch == up  # the usage chunk passes unchanged
            continue
        c0, u0 = ch["choices"][0], up["choices"][0]
        assert c0["delta"] == u0["delta"] and c0["logprobs"] is None
        if u0.get("logprobs"):
            n = len(u0["logprobs"]["content"])
            assert len(c0["entropy"]["per_token"]) == n
            n_tokens += n
        if u0.get("finish_reason"):
            summary = c0["entropy"]
            assert summary["tokens"] == n_tokens
            assert summary["mean_lower"] <= summary["mean"] <= summary["mean_upper"]
    assert r.headers["x-entropy-request-id"] == upstream_chunks[0]["id"]
    assert recorded.last_body["logprobs"] is True and recorded.last_body["top_logprobs"] == 20


async def test_stream_with_detail_and_own_top_logprobs(recorded):
    recorded.serve(CHAT, "chat_stream_k20.sse")
    async with proxy_client(recorded) as c:
        r = await c.post(CHAT, json={**MSG, "logprobs": True, "top_logprobs": 2},
                         headers={"x-entropy-detail": "tokens"})
    got = chunks_of(r.content)
    with_lp = [ch for ch in got if ch["choices"] and ch["choices"][0].get("logprobs")]
    assert with_lp and all(len(p["top_logprobs"]) == 2 for ch in with_lp
                           for p in ch["choices"][0]["logprobs"]["content"])
    final = [ch for ch in got if ch["choices"] and ch["choices"][0].get("finish_reason")][0]
    assert len(final["choices"][0]["entropy"]["per_token"]) == final["choices"][0]["entropy"]["tokens"]


async def test_n2_stream_choices_annotated_separately(recorded):
    recorded.serve(CHAT, "chat_stream_n2_k3.sse")
    async with proxy_client(recorded, top_k=3) as c:
        r = await c.post(CHAT, json={**MSG, "n": 2})
    finals = {}
    counts = {0: 0, 1: 0}
    for ch in chunks_of(r.content):
        for choice in ch["choices"]:
            counts[choice["index"]] += len(choice.get("entropy", {}).get("per_token", [])) if choice.get(
                "entropy") else 0
            if choice.get("finish_reason"):
                finals[choice["index"]] = choice["entropy"]
    assert set(finals) == {0, 1}
    assert all(finals[i]["tokens"] == counts[i] for i in (0, 1))


async def test_completions_stream(recorded):
    recorded.serve(COMP, "comp_stream_k5.sse")
    async with proxy_client(recorded, top_k=5) as c:
        r = await c.post(COMP, json={"model": "smollm2", "prompt": "x", "stream": True})
    got = chunks_of(r.content)
    final = [ch for ch in got if ch["choices"] and ch["choices"][0].get("finish_reason")]
    assert final and final[0]["choices"][0]["entropy"]["tokens"] > 0
    assert all(ch["choices"][0]["logprobs"] is None for ch in got if ch["choices"])


async def test_in_stream_k_error_is_learnt_and_retried_before_the_client_sees_anything(recorded):
    sent = []

    def respond(body):
        sent.append(body["top_logprobs"])
        if body["top_logprobs"] > 20:
            return httpx.Response(200, stream=Chunks(sse_pieces(fixture_bytes("chat_stream_err_k21.sse"))),
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(200, stream=Chunks(sse_pieces(fixture_bytes("chat_stream_k20.sse"))),
                              headers={"content-type": "text/event-stream"})

    recorded.routes[CHAT] = respond
    async with proxy_client(recorded, top_k=21) as c:
        r = await c.post(CHAT, json=MSG)
    assert sent == [21, 20]
    assert b"error" not in r.content.split(b"\n\n")[0]
    assert events(r.content)[-1] == b"[DONE]"


async def test_stream_cut_midway_ends_with_one_error_event_then_done(recorded):
    pieces = sse_pieces(fixture_bytes("chat_stream_k20.sse"))[:4]
    pieces.append(b'data: {"id": "chatcmpl-x", "choi')  # cut mid-event

    recorded.routes[CHAT] = lambda _: httpx.Response(
        200, stream=Chunks(pieces, error=httpx.RemoteProtocolError("peer closed")),
        headers={"content-type": "text/event-stream"})
    async with proxy_client(recorded) as c:
        r = await c.post(CHAT, json=MSG)
    evs = events(r.content)
    assert evs[-1] == b"[DONE]"
    err = orjson.loads(evs[-2])["error"]
    assert err["code"] == "upstream_unavailable"
    assert sum(1 for e in evs if e and e.startswith(b'{"error"')) == 1


async def test_stream_ending_without_done_is_reported(recorded):
    pieces = sse_pieces(fixture_bytes("chat_stream_k20.sse"))[:-1]  # no [DONE], clean EOF
    recorded.routes[CHAT] = lambda _: httpx.Response(200, stream=Chunks(pieces),
                                                     headers={"content-type": "text/event-stream"})
    async with proxy_client(recorded) as c:
        r = await c.post(CHAT, json=MSG)
    evs = events(r.content)
    assert evs[-1] == b"[DONE]" and b"error" in evs[-2]


async def test_keep_alive_comments_and_usage_chunk_pass_unchanged(recorded):
    pieces = sse_pieces(fixture_bytes("chat_stream_k20.sse"))
    usage = b'data: {"id":"x","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":3}}\n\n'
    pieces = [pieces[0], b": keep-alive\n\n", *pieces[1:-1], usage, pieces[-1]]
    recorded.routes[CHAT] = lambda _: httpx.Response(200, stream=Chunks(pieces),
                                                     headers={"content-type": "text/event-stream"})
    async with proxy_client(recorded) as c:
        r = await c.post(CHAT, json={**MSG, "stream_options": {"include_usage": True}})
    assert b": keep-alive\n\n" in r.content
    assert usage in r.content
    assert recorded.last_body["stream_options"] == {"include_usage": True}


async def test_stream_upstream_error_status_passes_through(recorded):
    recorded.serve(CHAT, "chat_err_model.json", status=404)
    async with proxy_client(recorded) as c:
        r = await c.post(CHAT, json=MSG)
    assert r.status_code == 404 and r.content == fixture_bytes("chat_err_model.json")
