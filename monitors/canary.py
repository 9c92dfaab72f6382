r"""Canary rounds: what fixed prompts sampled at a fixed temperature say about a model, measure by measure.

Live traffic moves every monitor when users ask different things; a canary asks the *same* prompts at the *same*
temperature every round (RESEARCH sections 2-5, 7), so a change it shows is a change of the model. One round: each
prompt sampled ``n`` times; per prompt (:class:`PromptRound`, :func:`measure_prompt`):

* ``mean_entropy``: mean over the samples of the per-sample mean token entropy (nats; the model's distribution
  before temperature, as vLLM returns raw logprobs, along paths sampled at the canary's temperature);
* ``forking_entropy``: mean over the samples of the mean entropy of each sample's top-20 % tokens (threshold-free,
  where collapse shows first); ``forking_fraction``: share of tokens above a *fixed* threshold;
* ``distinct_2``: distinct word bigrams / all word bigrams over the prompt's samples; ``chrf_distance``: mean
  pairwise chrF distance between them (:mod:`monitors.diversity`);
* ``formats``: counts of :func:`monitors.formats.classify_format` labels;
* ``correct``: samples whose answer checks (prompts with a known answer or a required format), for pass@k;
* ``h_off``: mean entropy of a fixed *reference* text (written by someone else: genuinely foreign) re-scored under
  the model after the same prompt. The prompt's on-policy side is its ``mean_entropy``.

Per round (:func:`round_measures`): the means over prompts; ``format_entropy`` = Shannon entropy of the round's
pooled format counts; ``pass_1`` and ``pass_k`` over checkable prompts with the unbiased estimator
(:func:`pass_at_k`); ``ratio`` = sum(H_off) / sum(H_on) over prompts with a reference (a ratio of means), and
*no* ratio when no prompt has one. A rising ratio means the model grew more certain on its own samples relative to
foreign text: the sharpening that post-training and collapse produce, not a change of traffic (both sides share the
prompt, so a traffic change moves both).

Comparing with a baseline and the verdict: :mod:`monitors.canary_diagnosis`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .diversity import chrf_distance, word_bigrams
from .forking import forking_stats
from .formats import classify_format, shannon_entropy

__all__ = [
    "MEASURES",
    "PromptRound",
    "measure_prompt",
    "pass_at_k",
    "pass_k_for",
    "round_measures",
]

#: every per-round measure, in report order
MEASURES = ("mean_entropy", "forking_entropy", "forking_fraction", "distinct_2", "chrf_distance", "format_entropy",
            "pass_1", "pass_k", "ratio")
SCALAR_MEASURES = ("mean_entropy", "forking_entropy", "forking_fraction", "distinct_2", "chrf_distance")


def pass_at_k(n: int, c: int, k: int) -> float:
    r"""Unbiased estimator of pass@k from ``n`` samples of which ``c`` are correct (Chen et al. 2021).

    .. math:: \widehat{\text{pass@}k} = 1 - \binom{n-c}{k} \big/ \binom{n}{k}

    computed as the product :math:`1 - \prod_{i=n-c+1}^{n} (1 - k/i)`, which never forms large binomials. Its
    expectation over draws of ``n`` samples is exactly the probability that ``k`` samples hold a correct one.
    ``pass_at_k(n, c, 1) == c / n``.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_k_for(n: int) -> int:
    """The k of a round's pass@k: half the samples, rounded up (k = n would read only "any correct")."""
    return max(1, math.ceil(n / 2))


@dataclass(frozen=True, slots=True)
class PromptRound:
    """One prompt's samples in one round, reduced to numbers (see the module docstring)."""

    prompt_id: str
    kind: str  # "open" | "check" | "format"
    n: int
    tokens: int
    mean_entropy: float | None
    forking_entropy: float | None
    forking_fraction: float | None
    distinct_2: float | None
    chrf_distance: float | None
    formats: dict[str, int] = field(default_factory=dict)
    correct: int | None = None  # None: not checkable
    h_off: float | None = None  # None: no reference text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PromptRound:
        names = cls.__dataclass_fields__  # tolerate fields added later
        return cls(**{k: v for k, v in d.items() if k in names})


def _mean(xs: Sequence[float]) -> float | None:
    ys = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(ys) / len(ys) if ys else None


def measure_prompt(
    prompt_id: str, kind: str, texts: Sequence[str], entropies: Sequence[NDArray[np.float64]],
    *, threshold: float, correct: Sequence[bool] | None = None, h_off: float | None = None,
    finish_reasons: Sequence[str | None] | None = None,
) -> PromptRound:
    """Reduce one prompt's samples (texts and per-token entropies in nats) to a :class:`PromptRound`.

    ``threshold``: the fixed forking cut-off (nats). ``correct``: one verdict per sample for checkable prompts.
    """
    if len(texts) != len(entropies):
        raise ValueError(f"{len(texts)} texts for {len(entropies)} entropy arrays")
    hs = [np.asarray(h, dtype=np.float64) for h in entropies]
    hs = [h[np.isfinite(h)] for h in hs]
    stats = [forking_stats(h, threshold) for h in hs if h.size]
    tokens = sum(int(h.size) for h in hs)
    above = sum(int(np.count_nonzero(h > threshold)) for h in hs)
    grams: Counter[tuple[str, str]] = Counter()
    for t in texts:
        grams.update(word_bigrams(t))
    total = sum(grams.values())
    dists = [chrf_distance(a, b) for a, b in combinations(texts, 2)]
    fins = list(finish_reasons) if finish_reasons is not None else [None] * len(texts)
    return PromptRound(
        prompt_id=prompt_id, kind=kind, n=len(texts), tokens=tokens,
        mean_entropy=_mean([float(h.mean()) for h in hs if h.size]),
        forking_entropy=_mean([s.top20_mean for s in stats if s.top20_mean is not None]),
        forking_fraction=above / tokens if tokens else None,
        distinct_2=len(grams) / total if total else None,
        chrf_distance=_mean(dists),
        formats=dict(Counter(classify_format(t, f) for t, f in zip(texts, fins, strict=True))),
        correct=None if correct is None else int(sum(bool(c) for c in correct)),
        h_off=h_off if h_off is not None and math.isfinite(h_off) else None,
    )


def round_measures(prompts: Sequence[PromptRound], k: int | None = None) -> dict[str, float | None]:
    """The round's value of every measure in :data:`MEASURES` (None where nothing measured it).

    ``k``: the k of pass@k (default :func:`pass_k_for` of the prompts' sample count).
    """
    out: dict[str, float | None] = {m: _mean([getattr(p, m) for p in prompts]) for m in SCALAR_MEASURES}
    counts: Counter[str] = Counter()
    for p in prompts:
        counts.update(p.formats)
    out["format_entropy"] = shannon_entropy(counts) if counts else None
    checked = [p for p in prompts if p.correct is not None and p.n > 0]
    out["pass_1"] = _mean([p.correct / p.n for p in checked]) if checked else None  # type: ignore[operator]
    out["pass_k"] = _mean([pass_at_k(p.n, p.correct, min(p.n, k or pass_k_for(p.n)))  # type: ignore[arg-type]
                           for p in checked]) if checked else None
    out["ratio"] = ratio_of_means([p.h_off for p in prompts], [p.mean_entropy for p in prompts])
    return out


def ratio_of_means(h_off: Sequence[float | None], h_on: Sequence[float | None]) -> float | None:
    """sum(H_off) / sum(H_on) over the prompts that have both; None without a foreign reference (never ~1 by
    construction) or when the on-policy side is near deterministic (below 1e-3 nats on average)."""
    pairs = [(a, b) for a, b in zip(h_off, h_on, strict=True) if a is not None and b is not None]
    if not pairs:
        return None
    off = sum(a for a, _ in pairs)
    on = sum(b for _, b in pairs)
    return off / on if on >= 1e-3 * len(pairs) else None
