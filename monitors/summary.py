"""The per-response entropy summary (the ``entropy`` object of CONTRACT §3.2), from per-token arrays.

All entropies are in nats. ``confidence`` is ``exp(mean_logprob)``: the geometric mean probability of the sampled
tokens. Flags:

- ``confident``       mean entropy <= ``confident_mean``
- ``uncertain``       mean entropy >= ``uncertain_mean``
- ``forking_heavy``   forking fraction >= ``forking_heavy_fraction`` (forking: entropy > ``forking_threshold``)
- ``truncated_tail``  mean missing top-K mass >= ``tail_mass`` (the estimate leans on the tail model)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

Floats = NDArray[np.float64]
ROUND = 4


@dataclass(frozen=True, slots=True)
class SummaryThresholds:
    confident_mean: float = 0.3
    uncertain_mean: float = 1.5
    low_confidence_prob: float = 0.1
    forking_heavy_fraction: float = 0.35
    tail_mass: float = 0.25


def _r(x: float) -> float:
    return round(float(x), ROUND)


def summarize(
    point: Floats,
    lower: Floats,
    upper: Floats,
    tail_mass: Floats,
    sampled_logprob: Floats,
    *,
    forking_threshold: float,
    thresholds: SummaryThresholds,
    estimator: str,
    top_k: int,
    per_token: bool = False,
) -> dict[str, Any]:
    """Summarise one response's generated tokens.

    Parameters
    ----------
    point, lower, upper : per-token entropy estimate and rigorous bounds, nats, shape (T,)
    tail_mass : per-token probability mass missing from the top-K list, shape (T,)
    sampled_logprob : per-token logprob of the sampled token, shape (T,); values <= -9999 mean probability 0
    """
    t = int(point.shape[0])
    out: dict[str, Any] = {"estimator": estimator, "top_k": top_k, "tokens": t}
    if t == 0:
        out.update(
            mean=None, mean_lower=None, mean_upper=None, max=None, p90=None,
            forking_threshold=_r(forking_threshold), forking_tokens=0, forking_fraction=None,
            mean_logprob=None, confidence=None, min_token_prob=None, low_confidence_tokens=0, flags=[],
        )
        if per_token:
            out.update(per_token=[], per_token_lower=[], per_token_upper=[])
        return out
    mean = float(point.mean())
    probs = np.exp(np.maximum(sampled_logprob, -745.0))
    probs[sampled_logprob <= -9999.0] = 0.0
    mean_logprob = float(np.maximum(sampled_logprob, -9999.0).mean())
    forking = int(np.count_nonzero(point > forking_threshold))
    fraction = forking / t
    flags: list[str] = []
    if mean <= thresholds.confident_mean:
        flags.append("confident")
    if mean >= thresholds.uncertain_mean:
        flags.append("uncertain")
    if fraction >= thresholds.forking_heavy_fraction:
        flags.append("forking_heavy")
    if float(tail_mass.mean()) >= thresholds.tail_mass:
        flags.append("truncated_tail")
    out.update(
        mean=_r(mean),
        mean_lower=_r(lower.mean()),
        mean_upper=_r(upper.mean()),
        max=_r(point.max()),
        p90=_r(np.percentile(point, 90)),
        forking_threshold=_r(forking_threshold),
        forking_tokens=forking,
        forking_fraction=_r(fraction),
        mean_logprob=_r(mean_logprob),
        confidence=_r(math.exp(mean_logprob)),
        min_token_prob=_r(probs.min()),
        low_confidence_tokens=int(np.count_nonzero(probs < thresholds.low_confidence_prob)),
        flags=flags,
    )
    if per_token:
        out["per_token"] = per_token_list(point)
        out["per_token_lower"] = per_token_list(lower)
        out["per_token_upper"] = per_token_list(upper)
    return out


def per_token_list(point: Floats) -> list[float]:
    return [round(x, ROUND) for x in point.tolist()]
