"""Semantic entropy: uncertainty over meanings rather than over wordings (Kuhn et al. 2023; Farquhar et al. 2024).

Several answers s_1..s_N are sampled for one prompt. They are grouped into meaning clusters C_1..C_M by an
equivalence test (bidirectional entailment, or embedding similarity above a threshold: the caller chooses and
passes it in), and the entropy is taken over the clusters:

- likelihood-weighted   p(C) = Σ_{s in C} p̃(s) / Σ_s p̃(s),   SE = -Σ_C p(C) log p(C)
  where p̃(s) = exp(mean token logprob of s), the length-normalised sequence probability (the form of Farquhar
  et al.'s code: raw sequence probabilities make long answers vanish next to short ones of the same meaning);
- discrete              p(C) = |C| / N,                          DSE = -Σ_C p(C) log p(C)
  the count-based form, for when token probabilities are not available.

Both are in nats, 0 when every answer means the same and log N when no two do.

Clustering is greedy, as in Kuhn et al.'s algorithm 1: each answer joins the first existing cluster whose
representative (its first member) it is equivalent to, else starts a new cluster. With a transitive equivalence
this is the exact partition; with a similarity threshold it depends on the order, which is the sampling order.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

Floats = NDArray[np.float64]

_PUNCT = re.compile(r"[^\w\s]")
_SPACE = re.compile(r"\s+")
_ARTICLES = frozenset({"a", "an", "the"})


def normalise(text: str) -> str:
    """Lower case, accents and punctuation dropped, articles dropped, whitespace collapsed (SQuAD-style)."""
    t = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).lower()
    t = _PUNCT.sub(" ", t)
    return " ".join(w for w in _SPACE.split(t) if w and w not in _ARTICLES)


def cluster(items: Sequence[str], equivalent: Callable[[str, str], bool]) -> list[int]:
    """Greedy meaning clusters: the cluster id (0, 1, ... in order of first appearance) of each item.

    ``equivalent(a, b)`` is asked only against each cluster's first member. Items whose normalised text is
    identical are put together without asking (any sensible equivalence holds for them).
    """
    ids: list[int] = []
    reps: list[str] = []
    seen: dict[str, int] = {}
    for item in items:
        key = normalise(item)
        cid = seen.get(key)
        if cid is None:
            for j, rep in enumerate(reps):
                if equivalent(rep, item):
                    cid = j
                    break
        if cid is None:
            cid = len(reps)
            reps.append(item)
        seen.setdefault(key, cid)
        ids.append(cid)
    return ids


def cluster_by_similarity(similarity: ArrayLike, threshold: float) -> list[int]:
    """Greedy clusters from a precomputed (N, N) similarity matrix: i joins j's cluster when sim >= threshold."""
    s = np.asarray(similarity, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"similarity must be square, got shape {s.shape}")
    ids: list[int] = []
    reps: list[int] = []
    for i in range(s.shape[0]):
        for j, r in enumerate(reps):
            if s[r, i] >= threshold:
                ids.append(j)
                break
        else:
            ids.append(len(reps))
            reps.append(i)
    return ids


def _entropy(p: Floats) -> float:
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)))


def cluster_probabilities(cluster_ids: Sequence[int], logprobs: ArrayLike | None = None) -> Floats:
    """p(C) per cluster id 0..M-1: by summed ``exp(logprobs)`` (log p̃ per answer), or by count when None.

    ``logprobs`` are per answer (nats, normally the mean token logprob); they are shifted by their maximum
    before exponentiating, which changes nothing after normalising and keeps very negative values finite.
    """
    ids = np.asarray(cluster_ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        return np.zeros(0, dtype=np.float64)
    if np.any(ids < 0):
        raise ValueError("cluster ids must be >= 0")
    m = int(ids.max()) + 1
    if logprobs is None:
        w = np.ones(ids.size, dtype=np.float64)
    else:
        lp = np.asarray(logprobs, dtype=np.float64).reshape(-1)
        if lp.shape != ids.shape:
            raise ValueError(f"{lp.size} logprobs for {ids.size} answers")
        if not np.all(np.isfinite(lp)):
            raise ValueError("logprobs must be finite")
        w = np.exp(lp - lp.max())
    mass = np.bincount(ids, weights=w, minlength=m)
    out: Floats = mass / mass.sum()
    return out


def semantic_entropy(cluster_ids: Sequence[int], logprobs: ArrayLike) -> float:
    """Likelihood-weighted semantic entropy (nats) of answers with these clusters and per-answer logprobs."""
    return _entropy(cluster_probabilities(cluster_ids, logprobs))


def discrete_semantic_entropy(cluster_ids: Sequence[int]) -> float:
    """Count-based semantic entropy (nats): the entropy of the cluster sizes; in [0, log N]."""
    return _entropy(cluster_probabilities(cluster_ids))


def mean_logprob(token_logprobs: ArrayLike) -> float:
    """Length-normalised sequence log probability (nats per token); 0.0 for an answer without tokens."""
    lp = np.asarray(token_logprobs, dtype=np.float64).reshape(-1)
    lp = lp[np.isfinite(lp)]
    if lp.size == 0:
        return 0.0
    return float(np.mean(np.maximum(lp, -9999.0)))


def max_entropy(n: int) -> float:
    """log N: the semantic entropy of N answers that all differ in meaning."""
    return math.log(n) if n > 0 else 0.0


def auroc_wrong(score: ArrayLike, wrong: ArrayLike) -> float | None:
    """AUROC of ``score`` for telling wrong answers (``wrong`` true) from right ones, ties counted one half.

    The Mann-Whitney U of the wrong answers' scores over n_wrong * n_right: 0.5 is chance, 1 ranks every wrong
    answer above every right one. ``None`` without both classes.
    """
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    w = np.asarray(wrong, dtype=bool).reshape(-1)
    if s.shape != w.shape:
        raise ValueError(f"{s.size} scores for {w.size} labels")
    n_pos = int(w.sum())
    n_neg = int(s.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    xs = s[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    lengths = np.diff(np.r_[starts, xs.size])
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(starts + (lengths + 1) / 2.0, lengths)
    return float((ranks[w].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def rank_scores(
    scores: dict[str, Sequence[float | None]], correct: Sequence[bool]
) -> list[tuple[str, float | None, int]]:
    """(name, AUROC for wrong answers, responses used) per score, best first; each score over the responses where
    it exists (semantic entropy only where a response was shadow-sampled). Higher score = more likely wrong."""
    wrong = np.asarray([not c for c in correct], dtype=bool)
    out: list[tuple[str, float | None, int]] = []
    for name, values in scores.items():
        have = np.asarray([v is not None and math.isfinite(v) for v in values], dtype=bool)
        vals = np.asarray([v if v is not None else np.nan for v in values], dtype=np.float64)
        out.append((name, auroc_wrong(vals[have], wrong[have]), int(have.sum())))
    return sorted(out, key=lambda t: -1.0 if t[1] is None else t[1], reverse=True)
