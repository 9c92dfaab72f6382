"""Reading logprobs into arrays and cutting them back, on every recorded vLLM shape."""

import copy
import re
from pathlib import Path

import numpy as np
import orjson
import pytest

from proxy.logprobs import (
    _chat_careful,
    _chat_fast,
    chat_positions,
    completion_positions,
    echo_prompt_positions,
    trim_chat,
    trim_completion,
)

FIX = Path(__file__).parent / "fixtures" / "vllm"


def load(name):
    return orjson.loads((FIX / name).read_bytes())


def stream_chunks(name):
    out = []
    for block in (FIX / name).read_bytes().split(b"\n\n"):
        if block.startswith(b"data: {"):
            out.append(orjson.loads(block[6:]))
    return out


def test_chat_positions_from_recorded_k20():
    body = load("chat_k20.json")
    content = body["choices"][0]["logprobs"]["content"]
    pos = chat_positions(content)
    assert pos.count == len(content) and pos.skipped == 0 and pos.impossible == 0
    assert pos.logprobs.shape == (len(content), 20)
    np.testing.assert_array_equal(pos.sampled, [c["logprob"] for c in content])
    assert (pos.sampled_col == 0).all()  # vLLM lists the sampled token first
    assert pos.tokens == [c["token"] for c in content]


def test_fallback_and_null_positions_are_skipped_and_counted():
    content = [
        {"token": "a", "logprob": -0.1,
         "top_logprobs": [{"token": "a", "logprob": -0.1}, {"token": "b", "logprob": -3}]},
        {"token": "x", "logprob": -9999.0, "top_logprobs": []},  # vLLM's fallback entry
        {"token": "y"},  # streaming fallback: no keys
        {"token": "z", "logprob": None, "top_logprobs": [{"token": "z", "logprob": None}]},  # NaN as null
        {"token": "p", "logprob": 1.5, "top_logprobs": [{"token": "p", "logprob": 1.5}]},  # logits, not logprobs
    ]
    pos = chat_positions(content)
    assert pos.count == 2 and pos.skipped == 3 and pos.impossible == 1


def test_completion_positions_mark_short_dicts_as_possibly_collapsed():
    body = load("comp_k5.json")
    lp = body["choices"][0]["logprobs"]
    pos = completion_positions(lp, 0, 5)
    assert pos.count == len(lp["tokens"])
    sizes = [len(d) for d in lp["top_logprobs"]]
    np.testing.assert_array_equal(pos.collapsed, [s < 5 for s in sizes])
    assert (pos.sampled_col == 0).all()


def test_echo_prompt_positions_found_from_text_offsets():
    body = load("comp_echo_prompt_logprobs.json")
    ch = body["choices"][0]
    lp = ch["logprobs"]
    n = echo_prompt_positions(lp, "The capital of France is", ch)
    assert n == 5 and lp["tokens"][n] == " Paris"
    # token-id prompts fall back to the prompt_logprobs length
    assert echo_prompt_positions(lp, [1, 2, 3, 4, 5], ch) == len(ch["prompt_logprobs"])


@pytest.mark.parametrize("top", [0, 1, 3, 19])
def test_trim_chat_keeps_a_prefix_of_exactly_top(top):
    body = load("chat_k20.json")
    ch = copy.deepcopy(body["choices"][0])
    trim_chat(ch, True, top, 20)
    for before, after in zip(body["choices"][0]["logprobs"]["content"], ch["logprobs"]["content"], strict=True):
        assert after["top_logprobs"] == before["top_logprobs"][:top]
        assert after["logprob"] == before["logprob"] and after["token"] == before["token"]


def test_trim_chat_without_ask_removes_logprobs_and_with_full_k_keeps_all():
    body = load("chat_k20.json")
    ch = copy.deepcopy(body["choices"][0])
    trim_chat(ch, False, 0, 20)
    assert ch["logprobs"] is None
    ch = copy.deepcopy(body["choices"][0])
    trim_chat(ch, True, 20, 20)
    assert ch == body["choices"][0]


def test_trim_chat_stream_chunks():
    for chunk in stream_chunks("chat_stream_n2_k3.sse"):
        for ch in chunk.get("choices", []):
            c = copy.deepcopy(ch)
            trim_chat(c, True, 1, 3)
            if ch.get("logprobs"):
                assert all(len(p["top_logprobs"]) == 1 for p in c["logprobs"]["content"])


def test_trim_completion_keeps_sampled_plus_top_n_like_vllm():
    body = load("comp_k5.json")
    ch = copy.deepcopy(body["choices"][0])
    trim_completion(ch, True, 2, 5, keep_prompt_lp=False)
    tops = ch["logprobs"]["top_logprobs"]
    # position 4 ("P") was sampled at rank 6: vLLM lists it plus the top 2 -> 3 entries
    assert list(tops[4]) == ["P", "The", "In"]
    # position 0 (" Paris") is rank 1: exactly 2 entries
    assert list(tops[0]) == [" Paris", " the"]
    assert ch["logprobs"]["tokens"] == body["choices"][0]["logprobs"]["tokens"]


def test_trim_completion_strips_unasked_prompt_logprobs():
    body = load("comp_echo_prompt_logprobs.json")
    ch = copy.deepcopy(body["choices"][0])
    trim_completion(ch, False, 0, 3, keep_prompt_lp=False)
    assert ch["logprobs"] is None and ch["prompt_logprobs"] is None
    ch = copy.deepcopy(body["choices"][0])
    trim_completion(ch, True, 3, 3, keep_prompt_lp=True)
    assert ch == body["choices"][0]


@pytest.mark.parametrize("name", ["chat_k20.json", "chat_k20_long.json", "comp_k5.json", "chat_n2_k5.json"])
def test_logprob_values_round_trip_byte_identical(name):
    """Every logprob as vLLM wrote it is written back by the proxy's serialiser with the same bytes."""
    raw = (FIX / name).read_bytes()
    numbers = re.findall(rb'(?:"logprob":|": ?)\s*(-?\d+\.\d+(?:e-?\d+)?)', raw)
    assert len(numbers) > 20
    for s in numbers:
        assert orjson.dumps(float(s)) == s
    assert orjson.loads(orjson.dumps(orjson.loads(raw))) == orjson.loads(raw)


@pytest.mark.parametrize("name", ["chat_k20.json", "chat_k20_long.json", "chat_n2_k5.json"])
def test_fast_and_careful_chat_readers_agree(name):
    for choice in load(name)["choices"]:
        content = choice["logprobs"]["content"]
        fast, careful = _chat_fast(content), _chat_careful(content)
        assert fast is not None
        np.testing.assert_array_equal(fast.logprobs, careful.logprobs)
        np.testing.assert_array_equal(fast.sampled, careful.sampled)
        np.testing.assert_array_equal(fast.sampled_col, careful.sampled_col)
        assert (fast.tokens, fast.alternatives, fast.skipped, fast.impossible) == (
            careful.tokens, careful.alternatives, careful.skipped, careful.impossible)
