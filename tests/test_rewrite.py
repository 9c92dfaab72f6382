"""Request parsing and rewriting: logprobs forced to K, the client's own ask remembered, bad input refused."""

import pytest

from proxy.errors import BadRequest
from proxy.rewrite import force_logprobs, parse_request, upstream_k

CHAT = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'


def parse(raw, endpoint="chat", headers=None):
    return parse_request(raw, endpoint, headers or {})


def test_chat_without_logprobs_gets_k_upstream_and_none_back():
    body, ask = parse(CHAT)
    assert (ask.logprobs, ask.top, ask.forced) == (False, 0, True)
    up = force_logprobs(body, ask, 20)
    assert up["logprobs"] is True and up["top_logprobs"] == 20
    assert "logprobs" not in body  # the client's body is not changed in place


def test_chat_asking_fewer_keeps_its_count_and_sends_k():
    body, ask = parse(b'{"model": "m", "messages": [], "logprobs": true, "top_logprobs": 3}')
    assert (ask.logprobs, ask.top) == (True, 3)
    assert force_logprobs(body, ask, 20)["top_logprobs"] == 20


def test_client_asking_more_than_k_gets_its_own_count_upstream():
    body, ask = parse(b'{"messages": [], "logprobs": true, "top_logprobs": 30}')
    assert upstream_k(ask, 20) == 30
    body, ask = parse(b'{"messages": [], "logprobs": true, "top_logprobs": -1}')
    assert upstream_k(ask, 20) == -1


def test_top_logprobs_without_logprobs_is_forwarded_unforced():
    body, ask = parse(b'{"messages": [], "top_logprobs": 3}')
    assert ask.forced is False
    assert force_logprobs(body, ask, 20) == body


def test_completions_logprobs_int():
    body, ask = parse(b'{"model": "m", "prompt": "x", "logprobs": 2, "echo": true}', "completions")
    assert (ask.logprobs, ask.top, ask.echo) == (True, 2, True)
    assert force_logprobs(body, ask, 20)["logprobs"] == 20
    body, ask = parse(b'{"prompt": "x"}', "completions")
    assert ask.logprobs is False and force_logprobs(body, ask, 5)["logprobs"] == 5


def test_unknown_fields_pass_untouched_and_entropy_detail_is_removed():
    raw = b'{"messages": [], "guided_json": {"a": [1, 2]}, "repetition_penalty": 1.1, "entropy_detail": "tokens"}'
    body, ask = parse(raw)
    assert ask.detail_tokens
    up = force_logprobs(body, ask, 20)
    assert up["guided_json"] == {"a": [1, 2]} and up["repetition_penalty"] == 1.1
    assert "entropy_detail" not in up


def test_detail_header():
    _, ask = parse(CHAT, headers={"x-entropy-detail": "tokens"})
    assert ask.detail_tokens


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"messages": [], "stream": "yes"}', "stream"),
        (b'{"messages": [], "n": true}', "n"),
        (b'{"messages": [], "n": 0}', "n"),
        (b'{"messages": [], "logprobs": 1}', "logprobs"),
        (b'{"messages": [], "top_logprobs": 2.5, "logprobs": true}', "top_logprobs"),
        (b'{"messages": "hi"}', "messages"),
        (b'{"model": 7, "messages": []}', "model"),
        (b'{"messages": [], "entropy_detail": "all"}', "entropy_detail"),
    ],
)
def test_wrong_types_are_400_naming_the_param(raw, param):
    with pytest.raises(BadRequest) as e:
        parse(raw)
    assert e.value.param == param and e.value.status == 400


@pytest.mark.parametrize(
    "raw",
    [b"{", b"", b"[1, 2]", b"null", b'"text"', b"\xff\xfe{}", b"[" * 5000 + b"]" * 5000],
)
def test_malformed_or_non_object_json_is_400(raw):
    with pytest.raises(BadRequest):
        parse(raw)


def test_completions_needs_prompt():
    with pytest.raises(BadRequest) as e:
        parse(b'{"model": "m"}', "completions")
    assert e.value.param == "prompt"


def test_integers_over_64_bits_are_read_not_refused():
    body, ask = parse(b'{"messages": [], "seed": 123456789012345678901234567890}')
    assert body["seed"] == 123456789012345678901234567890
