"""Attaching the ``entropy`` annotation to choices, for whole bodies and for streams chunk by chunk.

The estimator runs once per choice (non-streaming) or once per chunk (streaming, on that chunk's tokens);
per-token results are kept per choice until its ``finish_reason`` arrives, when the summary is built and an
:class:`~proxy.observe.Observation` is handed to the observers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitors.entropy import ESTIMATOR_NAME, estimate_positions, estimate_rows
from monitors.summary import ROUND, SummaryThresholds, per_token_list, summarize

from .logprobs import (
    Positions,
    chat_positions,
    completion_positions,
    echo_prompt_positions,
    trim_chat,
    trim_completion,
)
from .observe import Observation
from .rewrite import ClientAsk

ForkingThreshold = Callable[[str], float]


@dataclass(slots=True)
class Annotator:
    thresholds: SummaryThresholds
    vocab_size: int  # when the model's own is unknown
    forking_threshold: ForkingThreshold
    vocab_for: Callable[[str], int] | None = None  # the model's own V (settings.vocab_size_for)

    def vocab_size_for(self, model: str) -> int:
        return self.vocab_for(model) if self.vocab_for is not None else self.vocab_size

    def estimate(self, pos: Positions, vocab_size: int | None = None) -> tuple[np.ndarray, ...]:
        est = estimate_positions(
            pos.logprobs, self.vocab_size if vocab_size is None else vocab_size,
            sampled_col=pos.sampled_col, collapsed=pos.collapsed,
        )
        return est.point, est.lower, est.upper, est.tail_mass


@dataclass(slots=True)
class ChoiceState:
    """Per-token results of one choice, accumulated over a stream."""

    parts: list[tuple[Any, ...]] = field(default_factory=list)  # arrays, or lists from the typed chunk path
    sampled: list[np.ndarray] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    alternatives: list[list[tuple[str, float]]] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    skipped: int = 0
    impossible: int = 0
    seen_logprobs: bool = False
    prompt_chars_left: int = 0  # streaming completions with echo: prompt characters still to skip

    def add(self, pos: Positions, est: tuple[Any, ...]) -> None:
        self.parts.append(est)
        self.sampled.append(pos.sampled)
        self.tokens.extend(pos.tokens)
        self.alternatives.extend(pos.alternatives)
        self.skipped += pos.skipped
        self.impossible += pos.impossible

    def arrays(self) -> tuple[np.ndarray, ...]:
        if not self.parts:
            empty = np.zeros(0)
            return empty, empty, empty, empty, empty
        cols = list(zip(*self.parts, strict=True))
        return (*(np.concatenate(c) for c in cols), np.concatenate(self.sampled))


def _positions(ask: ClientAsk, choice: dict[str, Any], k_sent: int, echo_skip: int | None = None) -> Positions:
    lp = choice.get("logprobs")
    if ask.endpoint == "chat":
        return chat_positions(lp.get("content") if isinstance(lp, dict) else None)
    start = echo_skip if echo_skip is not None else (
        echo_prompt_positions(lp, ask.prompt, choice) if ask.echo else 0
    )
    return completion_positions(lp if isinstance(lp, dict) else None, start, k_sent)


def _has_logprobs(ask: ClientAsk, choice: dict[str, Any]) -> bool:
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return False
    return "content" in lp if ask.endpoint == "chat" else "token_logprobs" in lp


def _trim(ask: ClientAsk, choice: dict[str, Any], k_sent: int) -> None:
    if ask.endpoint == "chat":
        trim_chat(choice, ask.logprobs, ask.top, k_sent)
    else:
        trim_completion(choice, ask.logprobs, ask.top, k_sent, ask.prompt_logprobs)


def _text(ask: ClientAsk, choice: dict[str, Any], delta: bool) -> str:
    if ask.endpoint == "completions":
        t = choice.get("text")
    else:
        msg = choice.get("delta" if delta else "message")
        t = msg.get("content") if isinstance(msg, dict) else None
    return t if isinstance(t, str) else ""


class ResponseAnnotator:
    """Annotates one response (all its choices); ``finished`` collects the observations to hand out."""

    def __init__(self, annotator: Annotator, ask: ClientAsk, k_sent: int, model: str) -> None:
        self.a = annotator
        self.ask = ask
        self.k_sent = k_sent
        self.model = model
        self.vocab_size = annotator.vocab_size_for(model)
        self.request_id = ""
        self.states: dict[int, ChoiceState] = {}
        self.finished: list[Observation] = []
        self.missing = 0
        self.first_summary: dict[str, Any] | None = None

    # -- non-streaming ------------------------------------------------------------------------------------------
    def annotate_body(self, body: dict[str, Any]) -> None:
        self.request_id = str(body.get("id") or "")
        for choice in body.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            idx = choice.get("index", 0)
            idx = idx if isinstance(idx, int) else 0
            if not _has_logprobs(self.ask, choice):
                self.missing += 1
                choice["entropy"] = None
                _trim(self.ask, choice, self.k_sent)
                continue
            pos = _positions(self.ask, choice, self.k_sent)
            text = _text(self.ask, choice, delta=False)
            _trim(self.ask, choice, self.k_sent)
            choice["entropy"] = self.body_choice(idx, pos, text, choice.get("finish_reason"))

    def body_choice(self, idx: int, pos: Positions, text: str, finish: Any) -> dict[str, Any] | None:
        """One choice of a whole body whose logprobs were read into ``pos``: its ``entropy`` value (None when
        the values are logits, not logprobs). Shared by the careful path above and the fast path
        (``proxy.hotpath``), so both give the same annotation."""
        st = self.states.setdefault(idx, ChoiceState())
        if pos.impossible:  # logits, not logprobs: no entropy can be read from them
            st.impossible += pos.impossible
            self.missing += 1
            return None
        st.add(pos, self.a.estimate(pos, self.vocab_size))
        st.text.append(text)
        return self._finish(idx, st, finish, self.ask.detail_tokens, False)

    # -- streaming ----------------------------------------------------------------------------------------------
    def annotate_chunk(self, chunk: dict[str, Any]) -> None:
        if not self.request_id:
            self.request_id = str(chunk.get("id") or "")
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            idx = choice.get("index", 0)
            idx = idx if isinstance(idx, int) else 0
            st = self.chunk_state(idx)
            st.text.append(_text(self.ask, choice, delta=True))
            if _has_logprobs(self.ask, choice):
                pos = _positions(self.ask, choice, self.k_sent, echo_skip=self._echo_skip(st, choice))
                ent = self.chunk_logprobs(st, pos)
                if ent is not None:
                    choice["entropy"] = ent
            _trim(self.ask, choice, self.k_sent)
            finish = choice.get("finish_reason")
            if finish is not None:
                choice["entropy"] = self.chunk_finish(idx, st, finish, choice.get("entropy"))

    # The steps of one streamed choice, shared by the careful path above and the fast path (``proxy.hotpath``).
    def chunk_state(self, idx: int) -> ChoiceState:
        st = self.states.get(idx)
        if st is None:
            st = self.states[idx] = ChoiceState()
            if self.ask.echo and self.ask.endpoint == "completions" and isinstance(self.ask.prompt, str):
                st.prompt_chars_left = len(self.ask.prompt)
        return st

    def chunk_logprobs(self, st: ChoiceState, pos: Positions) -> dict[str, Any] | None:
        """The chunk's own ``{"per_token": [...]}``, or None when it has nothing to annotate."""
        st.seen_logprobs = True
        if pos.impossible:
            st.impossible += pos.impossible
        elif pos.count or pos.skipped:
            # Typed rows (every entry known, the sampled token first): the estimator's scalar path on the
            # floats as they are, the same numbers without a round trip through arrays (one call a token).
            fast = estimate_rows(pos.rows, self.vocab_size, [0] * len(pos.rows)) if pos.rows is not None else None
            if fast is not None:
                st.add(pos, fast)
                return {"per_token": [round(x, ROUND) for x in fast[0]]}
            est = self.a.estimate(pos, self.vocab_size)
            st.add(pos, est)
            return {"per_token": per_token_list(est[0])}
        return None

    def chunk_finish(self, idx: int, st: ChoiceState, finish: Any, chunk_ent: Any) -> dict[str, Any] | None:
        # In a stream `per_token` is the chunk's own tokens; the finishing chunk also gets the summary
        # (whose `per_token`, when the client asked for detail, is the whole choice's list).
        summary = self._finish(idx, st, finish, self.ask.detail_tokens, True)
        if summary is not None and not self.ask.detail_tokens and isinstance(chunk_ent, dict):
            summary = {**summary, "per_token": chunk_ent["per_token"]}
        return summary

    def _echo_skip(self, st: ChoiceState, choice: dict[str, Any]) -> int:
        if st.prompt_chars_left <= 0:
            return 0
        lp = choice["logprobs"]
        n = 0
        for tok in lp.get("tokens") or ():
            if st.prompt_chars_left <= 0:
                break
            st.prompt_chars_left -= len(tok) if isinstance(tok, str) else 0
            n += 1
        return n

    # -- both ---------------------------------------------------------------------------------------------------
    def _finish(
        self, idx: int, st: ChoiceState, finish: Any, per_token: bool, streamed: bool
    ) -> dict[str, Any] | None:
        if (streamed and not st.seen_logprobs) or st.impossible:
            self.missing += 1  # counted in entropy_proxy_logprobs_missing_total; the choice gets "entropy": null
            return None
        point, lower, upper, tail, sampled = st.arrays()
        summary = summarize(
            point, lower, upper, tail, sampled,
            forking_threshold=self.a.forking_threshold(self.model),
            thresholds=self.a.thresholds, estimator=ESTIMATOR_NAME, top_k=self.k_sent, per_token=per_token,
        )
        if self.first_summary is None or idx == 0:
            self.first_summary = summary
        obs_summary = {k: v for k, v in summary.items() if not k.startswith("per_token")}
        self.finished.append(
            Observation(
                request_id=self.request_id, model=self.model, endpoint=self.ask.endpoint, choice_index=idx,
                summary=obs_summary, entropies=point, lower=lower, upper=upper, sampled_logprobs=sampled,
                tokens=st.tokens, top_alternatives=st.alternatives, completion_text="".join(st.text),
                prompt=self.ask.prompt, finish_reason=finish if isinstance(finish, str) else None,
                streamed=streamed, created=time.time(),
                extra={"skipped_positions": st.skipped, "impossible_positions": st.impossible},
            )
        )
        return summary

    @property
    def impossible(self) -> int:
        return sum(st.impossible for st in self.states.values())
