"""Synthetic traffic for the monitor tests: token entropies, texts and Observations built by hand."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from proxy.observe import Observation

WORDS = (
    "the model answer value point sum total first second next find check result because since so then "
    "number square root prime even odd divide factor angle side area length triangle circle radius"
).split()
PLANNING = ("let's try a different approach", "we can use the fact that", "let me double check", "the key idea is")


def token_entropies(rng: np.random.Generator, t: int = 128, scale: float = 1.0, fork_scale: float = 1.0) -> np.ndarray:
    """A response's per-token entropies: 55 % near zero, 25 % moderate, 20 % forking (nats)."""
    kind = rng.random(t)
    h = np.where(
        kind < 0.55, rng.exponential(0.003, t),
        np.where(kind < 0.80, rng.gamma(2.0, 0.15, t), fork_scale * rng.gamma(4.0, 0.4, t)),
    )
    return h * scale


def prose(rng: np.random.Generator, words: int = 40, planning: bool = True) -> str:
    w = [WORDS[i] for i in rng.integers(0, len(WORDS), words)]
    if planning and rng.random() < 0.5:
        w.insert(int(rng.integers(0, words)), PLANNING[int(rng.integers(0, len(PLANNING)))])
    return " ".join(w) + "."


def formatted(rng: np.random.Generator, fmt: str) -> str:
    body = prose(rng, 12)
    if fmt == "code":
        return f"Here:\n```python\nprint({body.split()[0]!r})\n```\n{body}"
    if fmt == "json":
        return json.dumps({"answer": body})
    if fmt == "list":
        return f"- {body}\n- {prose(rng, 6)}\n- {prose(rng, 6)}"
    if fmt == "latex":
        return f"{body} so the answer is $\\boxed{{{int(rng.integers(0, 99))}}}$"
    return body


def tokenize(text: str, t: int) -> list[str]:
    """Split ``text`` into ``t`` consecutive pieces (a stand-in for a tokenizer); concatenation gives the text."""
    cuts = np.linspace(0, len(text), t + 1).astype(int)
    return [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def observation(
    h: np.ndarray, text: str = "", model: str = "m", prompt: Any = "p", flags: list[str] | None = None,
    threshold: float = 0.672, request_id: str = "r",
) -> Observation:
    mean = float(h.mean()) if h.size else None
    summary = {
        "tokens": int(h.size), "mean": mean, "confidence": 0.7, "forking_threshold": threshold,
        "forking_fraction": float(np.mean(h > threshold)) if h.size else None, "flags": flags or [],
    }
    return Observation(
        request_id=request_id, model=model, endpoint="chat", choice_index=0, summary=summary, entropies=h,
        lower=h * 0.9, upper=h * 1.1, sampled_logprobs=-h, tokens=tokenize(text, h.size) if text else [""] * h.size,
        top_alternatives=[], completion_text=text, prompt=[{"role": "user", "content": prompt}],
        finish_reason="stop", streamed=False, created=0.0,
    )
