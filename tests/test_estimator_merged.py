"""Rigorous bounds when token strings collide, on the wire forms vLLM builds.

vLLM keeps, per generated position, a dict keyed by token id: the sampled token first, then the top K in rank
order (the sampled token's id is not repeated when it is among them). The chat API sends the first K items of it
as a list; the completions API sends the first K+1 as a dict keyed by the *decoded string*, so tokens that
decode alike (byte-fallback pieces all decode to "\ufffd", or to "" after vLLM's context correction) collapse
into one key holding the later value (`vllm/entrypoints/openai/{chat_completion,completion}/serving.py`,
`vllm/logprobs.py: append_logprobs_for_next_position`). The simulator below builds both forms that way, and
the bounds read from them through the proxy's readers must hold the exact entropy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitors.entropy import estimate_positions
from proxy.logprobs import _chat_careful, _chat_fast, chat_positions, completion_positions

TOL = 1e-9
FFFD = "\ufffd"


def exact_entropy(p: np.ndarray) -> float:
    q = p[p > 0]
    return float(-(q * np.log(q)).sum())


def vllm_items(p: np.ndarray, k: int, sampled: int) -> list[tuple[int, float]]:
    """The per-position id -> logprob dict of vLLM, in insertion order."""
    with np.errstate(divide="ignore"):
        lp = np.maximum(np.log(p), -9999.0)
    d = {sampled: float(lp[sampled])}
    for i in np.argsort(-p, kind="stable")[:k]:
        d[int(i)] = float(lp[i])
    return list(d.items())


def completions_logprobs(p, names, k, sampled) -> dict:
    items = vllm_items(p, k, sampled)
    top = {names[i]: v for j, (i, v) in enumerate(items) if k >= j}
    return {"tokens": [names[sampled]], "token_logprobs": [items[0][1]], "text_offset": [0], "top_logprobs": [top]}


def chat_content(p, names, k, sampled) -> list[dict]:
    items = vllm_items(p, k, sampled)
    top = [{"token": names[i], "logprob": v, "bytes": list(names[i].encode("utf-8", errors="replace"))}
           for j, (i, v) in enumerate(items) if j < k]
    return [{"token": names[sampled], "logprob": items[0][1], "bytes": top[0]["bytes"] if top else [],
             "top_logprobs": top}]


def bounds(pos, vocab):
    est = estimate_positions(pos.logprobs, vocab, sampled_col=pos.sampled_col, collapsed=pos.collapsed)
    return float(est.lower[0]), float(est.point[0]), float(est.upper[0])


# -- the example ----------------------------------------------------------------------------------------
# K=2; A=0.6 and B=0.2 both decode to "\ufffd"; the sampled C=0.01 is outside the top 2; D=0.19.
P_EXAMPLE = np.array([0.6, 0.2, 0.01, 0.19])
NAMES_EXAMPLE = [FFFD, FFFD, "c", "d"]


def test_completions_merged_duplicate_with_the_sampled_token_outside_the_top_k():
    lp = completions_logprobs(P_EXAMPLE, NAMES_EXAMPLE, 2, sampled=2)
    assert lp["top_logprobs"][0] == {"c": math.log(0.01), FFFD: math.log(0.2)}  # what vLLM sends: K entries
    true = exact_entropy(P_EXAMPLE)
    assert abs(true - 0.990) < 1e-3
    for vocab in (4, 262_144):  # the issue saw lower 1.649 with the default vocabulary
        lower, point, upper = bounds(completion_positions(lp, 0, 2), vocab)
        assert lower <= true + TOL <= upper + 2 * TOL
        assert lower <= point <= upper


def test_completions_sampled_token_overwritten_by_a_same_string_token():
    # The sampled token (0.05, "\ufffd") sits outside the top 2; the rank-2 token decodes alike and overwrites
    # its value: the dict says {"\ufffd": log 0.3, "a": log 0.4} while token_logprobs says log 0.05.
    p = np.array([0.4, 0.3, 0.05, 0.25])
    lp = completions_logprobs(p, ["a", FFFD, FFFD, "d"], 2, sampled=2)
    assert len(lp["top_logprobs"][0]) == 2 and lp["token_logprobs"][0] == math.log(0.05)
    pos = completion_positions(lp, 0, 2)
    lower, point, upper = bounds(pos, 4)
    true = exact_entropy(p)
    assert lower <= true + TOL <= upper + 2 * TOL
    # the sampled token's own probability is known and counted: only 0.25 is missing
    est = estimate_positions(pos.logprobs, 4, sampled_col=pos.sampled_col, collapsed=pos.collapsed)
    assert abs(est.tail_mass[0] - 0.25) < 1e-12


def test_chat_same_string_sibling_listed_before_the_sampled_token():
    # vLLM lists the sampled token first; a list in another order (another engine, or a list rebuilt by a client)
    # must not let a same-string sibling stand in for the sampled token: its 0.6 would become the sampled value
    # and the 0.01 the cap of every unseen token.
    content = [{"token": FFFD, "logprob": math.log(0.01), "top_logprobs": [
        {"token": FFFD, "logprob": math.log(0.6)}, {"token": FFFD, "logprob": math.log(0.01)}]}]
    true = exact_entropy(np.array([0.6, 0.2, 0.01, 0.19]))
    for pos in (chat_positions(content), _chat_careful(content)):
        lower, point, upper = bounds(pos, 4)
        assert lower <= true + TOL <= upper + 2 * TOL
    fast = _chat_fast(content)
    assert fast is None or int(fast.sampled_col[0]) == 1


def test_chat_merged_duplicate_example_in_vllm_order():
    content = chat_content(P_EXAMPLE, NAMES_EXAMPLE, 2, sampled=2)
    assert [e["token"] for e in content[0]["top_logprobs"]] == ["c", FFFD]
    lower, point, upper = bounds(chat_positions(content), 4)
    true = exact_entropy(P_EXAMPLE)
    assert lower <= true + TOL <= upper + 2 * TOL


# -- every case the two forms can represent ---------------------------------------------------------------------
@st.composite
def positions(draw: st.DrawFn):
    v = draw(st.integers(2, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["gauss", "zipf", "flat-ish"]))
    if kind == "gauss":
        w = np.exp(rng.normal(0.0, draw(st.floats(0.1, 6.0)), v))
    elif kind == "zipf":
        w = np.arange(1, v + 1, dtype=np.float64) ** -draw(st.floats(0.3, 3.0))
        rng.shuffle(w)
    else:
        w = rng.uniform(0.5, 1.0, v)
    p = w / w.sum()
    k = draw(st.integers(1, min(v, 8)))
    # Few distinct strings make collisions common; "" and "\ufffd" are the ones seen from byte fallback.
    alphabet = draw(st.sampled_from([[FFFD, ""], [FFFD, "", "a"], [FFFD, "", "a", "b", "c"]]))
    names = [alphabet[int(x)] if rng.random() < 0.7 else f"t{i}" for i, x in
             enumerate(rng.integers(0, len(alphabet), v))]
    where = draw(st.sampled_from(["top", "below", "any"]))
    order = np.argsort(-p, kind="stable")
    pool = order[:k] if where == "top" else (order[k:] if where == "below" and v > k else order)
    sampled = int(draw(st.sampled_from([int(i) for i in pool])))
    return p, names, k, sampled


@settings(max_examples=400, deadline=None)
@given(positions())
def test_completions_bounds_hold_under_any_string_collisions(case):
    p, names, k, sampled = case
    pos = completion_positions(completions_logprobs(p, names, k, sampled), 0, k)
    assert pos.count == 1
    lower, point, upper = bounds(pos, p.size)
    true = exact_entropy(p)
    assert lower <= true + TOL and true <= upper + TOL
    assert lower <= point <= upper


@settings(max_examples=400, deadline=None)
@given(positions())
def test_chat_bounds_hold_under_any_string_collisions(case):
    p, names, k, sampled = case
    content = chat_content(p, names, k, sampled)
    true = exact_entropy(p)
    for pos in (chat_positions(content), _chat_careful(content)):
        lower, point, upper = bounds(pos, p.size)
        assert lower <= true + TOL and true <= upper + TOL
        assert lower <= point <= upper


@settings(max_examples=200, deadline=None)
@given(positions())
def test_completions_without_collisions_lose_nothing(case):
    """Distinct strings: the dict is exactly the id dict, and the bound is the one the estimator gives a chat
    list with the same entries (merge detection costs nothing when no merge is possible)."""
    p, _, k, sampled = case
    names = [f"t{i}" for i in range(p.size)]
    pos = completion_positions(completions_logprobs(p, names, k, sampled), 0, k)
    true = exact_entropy(p)
    lower, _, upper = bounds(pos, p.size)
    assert lower <= true + TOL <= upper + 2 * TOL
    in_top = sampled in set(np.argsort(-p, kind="stable")[:k].tolist())
    if in_top and pos.logprobs.shape[1] == k and p[sampled] > np.min(p[np.argsort(-p, kind="stable")[:k]]):
        assert not pos.collapsed[0]  # the sampled token is above another entry: it is in the top K, no merge


# -- real vLLM responses with merged positions (bench/exact_merged.py), against exact full-vocabulary entropy ------
EXACT_MERGED = sorted((Path(__file__).parent / "fixtures" / "exact-merged").glob("*.json"))
FLOAT32 = 2e-3  # vLLM's float32 logprobs against transformers' float32 teacher forcing


@pytest.mark.parametrize("path", EXACT_MERGED, ids=[p.stem for p in EXACT_MERGED])
def test_recorded_vllm_completions_with_merged_tokens_keep_the_bounds(path):
    rec = json.loads(path.read_text())
    lp = rec["response"]["choices"][0]["logprobs"]
    k = rec["request"]["logprobs"]
    exact = np.array(rec["exact"]["exact_entropy_nats"])
    pos = completion_positions(lp, 0, k)
    est = estimate_positions(pos.logprobs, rec["exact"]["vocab_size"], sampled_col=pos.sampled_col,
                             collapsed=pos.collapsed)
    assert pos.count == exact.size
    assert (est.lower <= exact + FLOAT32).all(), np.nonzero(est.lower > exact + FLOAT32)[0]
    assert (exact <= est.upper + FLOAT32).all(), np.nonzero(exact > est.upper + FLOAT32)[0]
    for j in rec["exact"]["merged_positions"]:  # a merge is always seen: flagged, or the sampled value kept
        assert pos.collapsed[j] or pos.logprobs.shape[1] > len(lp["top_logprobs"][j]) and not np.isnan(
            pos.logprobs[j, len(lp["top_logprobs"][j])]), j


def test_the_recorded_merges_exist():
    assert EXACT_MERGED, "tests/fixtures/exact-merged is empty: run bench/exact_merged.py"


def test_the_short_dict_rule_alone_breaks_on_a_recorded_vllm_position():
    """The issue's failure on real vLLM output: position 0 of ``merged_k5_7_201`` (K=5, the sampled " Im" far below
    the top 5, tokens decoding to "" merged into one key, so the dict still has 5 keys). Flagging only dicts shorter
    than K puts the lower bound above the exact entropy there; the reader's rule does not."""
    rec = json.loads((Path(__file__).parent / "fixtures" / "exact-merged" / "merged_k5_7_201.json").read_text())
    lp = rec["response"]["choices"][0]["logprobs"]
    top, exact, v = lp["top_logprobs"][0], rec["exact"]["exact_entropy_nats"][0], rec["exact"]["vocab_size"]
    assert len(top) == 5 and 0 in rec["exact"]["merged_positions"]
    row = np.array([list(top.values())])
    col = np.array([list(top).index(lp["tokens"][0])])
    short_only = estimate_positions(row, v, sampled_col=col, collapsed=np.array([len(top) < 5]))
    assert short_only.lower[0] > exact + 0.5  # the old rule: a "rigorous" bound well above the truth
    pos = completion_positions(lp, 0, 5)
    est = estimate_positions(pos.logprobs, v, sampled_col=pos.sampled_col, collapsed=pos.collapsed)
    assert pos.collapsed[0] and est.lower[0] <= exact <= est.upper[0]
