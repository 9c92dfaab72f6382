"""Reading the upstream's logprobs into arrays, and cutting them back to what the client asked for.

Two wire shapes (see docs/vllm-shapes.md):
- chat: ``logprobs.content[j] = {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}, ...]}``;
- completions: ``logprobs = {tokens, token_logprobs, text_offset, top_logprobs: [{token: logprob} | null]}``
  (a dict per position, so duplicate token strings collapse into one entry).
In both, vLLM lists the sampled token first and the rest in rank order; when the sampled token is outside the
top K the list holds it plus the top K-1 (chat) or the top K (completions: up to K+1 entries). Completions keys
collapse tokens that decode alike (byte-fallback pieces all decode to "\ufffd"), the later value winning: a dict
of K keys may then hide a merged top token, and the sampled token's own value may be overwritten
(``token_logprobs`` still has it); see ``_may_have_merged``. Chat lists keep such tokens apart (their ``bytes``
are the same too), so the sampled entry is the one matching in token and value.
A position without logprobs (vLLM's fallback entry: ``logprob`` -9999 with no alternatives, or no keys at all in a
stream) is skipped for entropy and counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NAN = math.nan
N_ALTERNATIVES = 5  # alternatives kept per token for observers (audit page hover)
IMPOSSIBLE_MASS_EPS = 1e-3  # float32 rounding of 20 probabilities stays far below this (recorded vLLM: 3e-6)


@dataclass(slots=True)
class Positions:
    """Generated positions of one choice (or one chunk of it), ready for the estimator."""

    logprobs: np.ndarray  # (T, W) float64, NaN padding
    sampled: np.ndarray  # (T,) sampled token's logprob
    sampled_col: np.ndarray  # (T,) int column of the sampled token, -1 unknown
    collapsed: np.ndarray | None  # (T,) bool, completions rows that may have lost entries
    tokens: list[str] = field(default_factory=list)
    alternatives: list[list[tuple[str, float]]] = field(default_factory=list)
    skipped: int = 0  # positions without usable logprobs
    impossible: int = 0  # positions with a positive logprob (logits, not logprobs)
    rows: list[list[float]] | None = None  # ``logprobs`` as Python floats when built from them (typed fast path)

    @property
    def count(self) -> int:
        return len(self.sampled)


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else NAN


def _pack(
    rows: list[list[float]], sampled: list[float], cols: list[int], collapsed: list[bool] | None,
    tokens: list[str], alts: list[list[tuple[str, float]]], skipped: int,
) -> Positions:
    t = len(rows)
    width = max((len(r) for r in rows), default=0)
    arr = np.full((t, max(width, 1)), NAN)
    for i, r in enumerate(rows):
        arr[i, : len(r)] = r
    # Values that cannot be logprobs (a server in logits mode): a positive one, or more than all the mass.
    impossible = 0
    if t and width:
        with np.errstate(over="ignore"):
            bad = (np.nanmax(arr, axis=1) > 1e-6) | (np.nansum(np.exp(arr), axis=1) > 1.0 + IMPOSSIBLE_MASS_EPS)
        impossible = int(np.count_nonzero(bad))
    return Positions(
        logprobs=arr,
        sampled=np.asarray(sampled, dtype=np.float64),
        sampled_col=np.asarray(cols, dtype=np.int64),
        collapsed=None if collapsed is None else np.asarray(collapsed, dtype=bool),
        tokens=tokens,
        alternatives=alts,
        skipped=skipped,
        impossible=impossible,
    )


def _chat_fast(content: list[Any]) -> Positions | None:
    """The common case in one pass of comprehensions: every position well-formed, every row the same width.
    Returns None for anything else (the careful loop below handles it)."""
    try:
        tops = [p["top_logprobs"] for p in content]
        arr = np.array([[e["logprob"] for e in t] for t in tops], dtype=np.float64)
        sampled = np.array([p["logprob"] for p in content], dtype=np.float64)
        tokens = [p["token"] for p in content]
        # The sampled entry matches in value too: a same-string sibling (two byte-fallback tokens) is not it.
        cols = [0 if t and t[0]["token"] == tok and t[0]["logprob"] == p["logprob"] else -1
                for t, tok, p in zip(tops, tokens, content, strict=True)]
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    if arr.ndim != 2 or arr.shape[1] == 0 or np.isnan(arr).any() or np.isnan(sampled).any() or -1 in cols:
        return None
    if not all(isinstance(t, str) for t in tokens):
        return None
    alts = [[(e["token"], e["logprob"]) for e in t[:N_ALTERNATIVES]] for t in tops]
    impossible = int(np.count_nonzero(arr.max(axis=1) > 1e-6))
    return Positions(arr, sampled, np.zeros(len(tokens), dtype=np.int64), None, tokens, alts, 0, impossible)


_ZERO_COL = np.zeros(1, dtype=np.int64)
_ZERO_COL.flags.writeable = False  # shared by every one-token Positions: nobody may write to it


def chat_positions_typed(content: list[Any]) -> Positions | None:
    """``_chat_fast`` over typed entries (attributes ``token``, ``logprob``, ``top_logprobs``) as the fast path's
    decoder (``proxy.hotpath``) builds them; the same criteria, so the same Positions or None. Kept next to
    ``_chat_fast`` so that a change to one is made to both (tests/test_hotpath.py compares them). The decoder
    reads JSON numbers only, so no NaN can arrive here; the checks stay in Python (one or a few rows a call in a
    stream, where numpy's per-call cost would dominate)."""
    if not content:
        return None
    if len(content) == 1:  # a stream chunk: one token, the same checks without a generator each
        p = content[0]
        top = p.top_logprobs
        if not top or top[0].token != p.token or top[0].logprob != p.logprob:
            return None
        row = [e.logprob for e in top]
        return Positions(np.array([row], dtype=np.float64), np.array([p.logprob], dtype=np.float64), _ZERO_COL,
                         None, [p.token], [[(e.token, e.logprob) for e in top[:N_ALTERNATIVES]]], 0,
                         1 if max(row) > 1e-6 else 0, [row])
    tops = [p.top_logprobs for p in content]
    rows = [[e.logprob for e in t] for t in tops]
    width = len(rows[0])
    if not width or any(len(r) != width for r in rows):
        return None
    # The sampled entry matches in value too: a same-string sibling (two byte-fallback tokens) is not it.
    if not all(t[0].token == p.token and t[0].logprob == p.logprob for t, p in zip(tops, content, strict=True)):
        return None
    tokens = [p.token for p in content]
    alts = [[(e.token, e.logprob) for e in t[:N_ALTERNATIVES]] for t in tops]
    impossible = sum(1 for r in rows if max(r) > 1e-6)
    return Positions(np.array(rows, dtype=np.float64), np.array([p.logprob for p in content], dtype=np.float64),
                     np.zeros(len(tokens), dtype=np.int64), None, tokens, alts, 0, impossible, rows)


def chat_positions(content: list[Any] | None) -> Positions:
    if content:
        fast = _chat_fast(content)
        if fast is not None:
            return fast
    return _chat_careful(content)


def _chat_careful(content: list[Any] | None) -> Positions:
    rows: list[list[float]] = []
    sampled: list[float] = []
    cols: list[int] = []
    tokens: list[str] = []
    alts: list[list[tuple[str, float]]] = []
    skipped = 0
    for pos in content or ():
        if not isinstance(pos, dict):
            skipped += 1
            continue
        top = pos.get("top_logprobs")
        lp = _num(pos.get("logprob"))
        if not top or not isinstance(top, list) or math.isnan(lp):
            skipped += 1
            continue
        tok = pos.get("token")
        col = -1
        row: list[float] = []
        for i, e in enumerate(top):
            if isinstance(e, dict):
                row.append(_num(e.get("logprob")))
                if col < 0 and e.get("token") == tok and row[-1] == lp:  # a same-string sibling is not it
                    col = i
            else:
                row.append(NAN)
        rows.append(row)
        sampled.append(lp)
        cols.append(col)
        tokens.append(tok if isinstance(tok, str) else "")
        alts.append([(e.get("token", ""), e.get("logprob")) for e in top[:N_ALTERNATIVES] if isinstance(e, dict)])
    return _pack(rows, sampled, cols, None, tokens, alts, skipped)


def completion_positions(lp: dict[str, Any] | None, start: int, k_requested: int) -> Positions:
    """Positions ``start:`` of a completions ``logprobs`` object (``start`` skips an echoed prompt)."""
    rows: list[list[float]] = []
    sampled: list[float] = []
    cols: list[int] = []
    collapsed: list[bool] = []
    tokens: list[str] = []
    alts: list[list[tuple[str, float]]] = []
    skipped = 0
    if not isinstance(lp, dict):
        return _pack(rows, sampled, cols, collapsed, tokens, alts, skipped)
    toks = lp.get("tokens") or []
    tlps = lp.get("token_logprobs") or []
    tops = lp.get("top_logprobs") or []
    for j in range(start, min(len(toks), len(tlps), len(tops))):
        top = tops[j]
        s = _num(tlps[j])
        if not top or not isinstance(top, dict) or math.isnan(s):
            skipped += 1
            continue
        tok = toks[j]
        row = [_num(v) for v in top.values()]
        col = list(top).index(tok) if isinstance(tok, str) and tok in top else -1
        sampled_lost = col >= 0 and row[col] == row[col] and row[col] != s
        if sampled_lost:  # a later token decoding alike overwrote the sampled one's value: keep both known
            row.append(s)
            col = len(row) - 1
        rows.append(row)
        sampled.append(s)
        cols.append(col)
        collapsed.append(_may_have_merged(row, col, len(top), sampled_lost, k_requested))
        tokens.append(tok if isinstance(tok, str) else "")
        alts.append(list(top.items())[:N_ALTERNATIVES])
    return _pack(rows, sampled, cols, collapsed, tokens, alts, skipped)


def _may_have_merged(row: list[float], col: int, n: int, sampled_lost: bool, k: int) -> bool:
    """Whether a completions dict of ``n`` keys may have lost a token other than the sampled one to a duplicate
    string (such a token may hold any part of the missing mass, so the lower bound must not cap it).

    vLLM fills the dict from the sampled token followed by the top ``k`` (``k + 1`` tokens when the sampled one
    ranks below ``k``, else ``k``), a later token overwriting an earlier one of the same string. Every value but
    the sampled token's belongs to the top ``k``, and a sampled token below rank ``k`` is at most each of them:
    so a sampled value above some other value proves it is in the top ``k``. Tokens lost = tokens sent - ``n``;
    unknown ones remain unless the sampled token accounts for all of them."""
    if col < 0:  # no sampled entry to reason from (not vLLM's shape): only a short dict tells
        return n < k
    s = row[col]
    others = [v for i, v in enumerate(row) if i != col and v == v]
    sent = k if others and s > min(others) else k + 1
    return sent - n - sampled_lost > 0


def echo_prompt_positions(lp: dict[str, Any] | None, prompt: Any, choice: dict[str, Any]) -> int:
    """How many leading positions of an echoed completions choice belong to the prompt."""
    if not isinstance(lp, dict):
        return 0
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, str):
        offsets = lp.get("text_offset") or []
        cut = len(prompt)
        return sum(1 for o in offsets if isinstance(o, int) and o < cut)
    plp = choice.get("prompt_logprobs")
    if isinstance(plp, list):
        return len(plp)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    return 0


def _keep_count(entries: list[float], sampled: float, n: int) -> int:
    """Entries of a completions dict that vLLM would have sent for ``logprobs=n``: top n, plus the sampled token
    (listed first) when it ranks below n.

    Known limit: when two alternatives decode to the same string, vLLM's dict keeps one key with the later value;
    cut from K entries that can differ from what ``logprobs=n`` would have collapsed. Ties in rank are read as
    ranking below the sampled token."""
    rank = 1 + sum(1 for v in entries[1:] if isinstance(v, (int, float)) and v > sampled)
    return n if rank <= n else n + 1


def _nothing_to_cut(choice: dict[str, Any], ask_logprobs: bool, top: int, k_sent: int) -> bool:
    """The cases that need no per-position work: logprobs not asked (removed here) or asked in full."""
    if not ask_logprobs:
        if "logprobs" in choice:
            choice["logprobs"] = None
        return True
    return top == -1 or top >= k_sent


def trim_chat(choice: dict[str, Any], ask_logprobs: bool, top: int, k_sent: int) -> None:
    """Cut a chat choice's logprobs (full body or stream chunk) back to the client's request, in place."""
    if _nothing_to_cut(choice, ask_logprobs, top, k_sent):
        return
    lp = choice.get("logprobs")
    if isinstance(lp, dict):
        for pos in lp.get("content") or ():
            if isinstance(pos, dict) and isinstance(pos.get("top_logprobs"), list):
                pos["top_logprobs"] = pos["top_logprobs"][:top]


def trim_completion(choice: dict[str, Any], ask_logprobs: bool, top: int, k_sent: int, keep_prompt_lp: bool) -> None:
    if not keep_prompt_lp and choice.get("prompt_logprobs") is not None:
        choice["prompt_logprobs"] = None
    if _nothing_to_cut(choice, ask_logprobs, top, k_sent):
        return
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return
    tops = lp.get("top_logprobs")
    tlps = lp.get("token_logprobs") or []
    if not isinstance(tops, list):
        return
    for j, d in enumerate(tops):
        if isinstance(d, dict) and len(d) > top:
            s = tlps[j] if j < len(tlps) and isinstance(tlps[j], (int, float)) else -math.inf
            keep = _keep_count(list(d.values()), s, top)
            if len(d) > keep:
                tops[j] = dict(list(d.items())[:keep])
