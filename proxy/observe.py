"""The hook between the request path and everything that watches traffic (metrics, monitors, audit, probe).

The service builds one :class:`Observation` per finished choice (non-streaming: when the body is annotated;
streaming: when the choice's ``finish_reason`` arrives) and hands it to every registered observer. Observers
must return quickly and never raise into the request path: heavy work (text diversity, database writes) goes
to a queue or a background task of the observer's own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

log = logging.getLogger("entropy_proxy.observe")


@dataclass(slots=True)
class Observation:
    request_id: str  # the upstream's response id (echoed in X-Entropy-Request-Id)
    model: str  # the model name as the client sent it (NOT yet bounded: use the allow-list for labels)
    endpoint: str  # "chat" | "completions"
    choice_index: int
    summary: dict[str, Any]  # the `entropy` object as sent to the client (without per_token)
    entropies: np.ndarray  # per generated token, point estimate, nats (float64)
    lower: np.ndarray
    upper: np.ndarray
    sampled_logprobs: np.ndarray  # per generated token
    tokens: list[str]  # generated token strings
    top_alternatives: list[list[tuple[str, float]]]  # per token: up to 5 (token, logprob) alternatives
    completion_text: str
    prompt: Any  # chat messages list or completions prompt, as the client sent it
    finish_reason: str | None
    streamed: bool
    created: float  # unix time
    extra: dict[str, Any] = field(default_factory=dict)


class Observer(Protocol):
    def observe(self, obs: Observation) -> None: ...


@dataclass(slots=True)
class RequestEvent:
    """One finished client request (every status), for request/overhead/error counters."""

    model: str
    endpoint: str  # "chat" | "completions" | "other"
    status: int
    overhead_s: float  # time spent inside the proxy, not waiting on the upstream
    upstream_error: str | None = None  # kind: "unavailable" | "timeout" | "status_4xx" | "status_5xx" | "stream"
    logprobs_missing: int = 0  # choices that could not be annotated
    impossible_logprobs: int = 0  # positions with positive logprobs or sum(p) > 1 (logits mode)


class RequestObserver(Protocol):
    def request_done(self, ev: RequestEvent) -> None: ...


class ObserverHub:
    """Fans observations out; an observer that raises is logged and skipped, never breaks a response."""

    def __init__(self) -> None:
        self.observers: list[Observer] = []
        self.request_observers: list[RequestObserver] = []

    def add(self, obj: object) -> None:
        if hasattr(obj, "observe"):
            self.observers.append(obj)  # type: ignore[arg-type]
        if hasattr(obj, "request_done"):
            self.request_observers.append(obj)  # type: ignore[arg-type]

    def observe(self, obs: Observation) -> None:
        for o in self.observers:
            try:
                o.observe(obs)
            except Exception:  # noqa: BLE001 - an observer must never break the request path
                log.exception("observer %r failed", o)

    def request_done(self, ev: RequestEvent) -> None:
        for o in self.request_observers:
            try:
                o.request_done(ev)
            except Exception:  # noqa: BLE001
                log.exception("request observer %r failed", o)
