"""Meaning clusters of a response's shadow samples, computed in a worker thread (never on the event loop).

:class:`Clusterer` turns the samples' texts and token logprobs, plus the response the client got, into a
:class:`SemanticResult`: the clusters (in sampling order, the original answer placed last so that it does not
change how the samples group), the likelihood-weighted and discrete semantic entropy over the *samples* (the
client's answer is not a sample at temperature 1, so it only says which meaning it belongs to).

Equivalence: cosine similarity of the answers' all-MiniLM-L6-v2 embeddings at or above ``threshold``, and any
numbers the two answers state must agree (embeddings put "42" and "43" at cosine 0.77, above any threshold that
keeps paraphrases together; a number differs in meaning from its neighbour however alike the sentences read).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitors.semantic import cluster_by_similarity, discrete_semantic_entropy, mean_logprob, semantic_entropy

_NUMBER = re.compile(r"\d+(?:\.\d+)?")

Similarity = Callable[[list[str]], np.ndarray]


def numbers_of(text: str) -> frozenset[str]:
    return frozenset(_NUMBER.findall(text.replace(",", "")))


def number_guard(texts: list[str], sims: np.ndarray) -> np.ndarray:
    """Similarities with pairs that state different numbers set to -1 (never equivalent)."""
    nums = [numbers_of(t) for t in texts]
    out = np.array(sims, dtype=np.float64, copy=True)
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            if nums[i] != nums[j]:
                out[i, j] = out[j, i] = -1.0
    return out


@dataclass(slots=True)
class SemanticResult:
    entropy: float  # nats, likelihood-weighted, over the samples
    discrete: float  # nats, by cluster sizes, over the samples
    samples: int
    clusters: list[dict[str, Any]]  # {size, probability, original (holds the client's answer), answers (samples)}
    original_cluster: int  # index into clusters of the client's answer
    cpu_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def original_share(self) -> float:
        """Probability mass of the samples that mean what the client's answer means (0 when none do)."""
        return float(self.clusters[self.original_cluster]["probability"])


class Clusterer:
    """Loads the embedding model on first use (in the worker thread) and clusters one response at a time."""

    def __init__(self, threshold: float, *, similarity: Similarity | None = None,
                 loader: Callable[[], Similarity] | None = None, guard_numbers: bool = True) -> None:
        self.threshold = threshold
        self.guard_numbers = guard_numbers
        self._similarity = similarity
        self._loader = loader
        self._lock = threading.Lock()

    def similarity(self) -> Similarity:
        with self._lock:
            if self._similarity is None:
                if self._loader is None:
                    raise RuntimeError("no similarity model and no loader")
                self._similarity = self._loader()
            return self._similarity

    def run(self, samples: list[tuple[str, list[float]]], original: str) -> SemanticResult:
        """``samples``: (text, token logprobs) per shadow sample; ``original``: the client's answer."""
        sim = self.similarity()
        c0 = time.process_time()
        texts = [t for t, _ in samples] + [original]
        sims = sim(texts)
        if self.guard_numbers:
            sims = number_guard(texts, sims)
        ids = cluster_by_similarity(sims, self.threshold)
        n = len(samples)
        sample_ids = ids[:n]
        lps = [mean_logprob(lp) for _, lp in samples]
        m = max(ids) + 1
        weights = np.exp(np.asarray(lps) - max(lps)) if lps else np.zeros(0)
        total = float(weights.sum()) or 1.0
        clusters = []
        for c in range(m):
            members = [i for i in range(n) if sample_ids[i] == c]
            clusters.append({
                "size": len(members),
                "probability": round(float(weights[members].sum()) / total, 4) if members else 0.0,
                "original": ids[n] == c,
                "answers": [texts[i] for i in members],
            })
        return SemanticResult(
            entropy=semantic_entropy(sample_ids, lps) if n else 0.0,
            discrete=discrete_semantic_entropy(sample_ids),
            samples=n,
            clusters=clusters,
            original_cluster=ids[n],
            cpu_s=time.process_time() - c0,
        )
