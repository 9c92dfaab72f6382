"""Behavioural diversity over a window of responses (Matsutani et al., "RL Squeezes, SFT Expands", 2509.21128).

- **distinct-2**: distinct word bigrams / all word bigrams over the last ``distinct_window`` responses (a fixed
  number, so the value is comparable over time: distinct-n falls as a window grows). Each response contributes
  at most ``max_words`` words. Memory: one bigram counter per response in the window.
- **chrF** (Popovic 2015, sacrebleu defaults): character n-grams n = 1..6 with whitespace removed; per order
  precision P and recall R, F_beta = (1 + beta^2) P R / (beta^2 P + R) with beta = 2, averaged over the orders
  that both texts have, times 100. chrF is asymmetric (beta weights recall).
- **pairwise chrF distance** d(i, j) = 1 - (chrF(i, j) + chrF(j, i)) / 200, in [0, 1].
- **UPGMA clusters**: average-linkage agglomeration on the similarity s = (chrF(i, j) + chrF(j, i)) / 2,
  merging while the best pair's average similarity is >= 60; the count of clusters left.

Distance and clusters need the same prompt answered more than once: responses are grouped by a hash of the
normalised prompt (lower case, whitespace collapsed, chat roles and contents). Bounds: at most ``max_groups``
groups (least recently used evicted first, and groups untouched for ``window`` responses), ``group_size``
responses per group (oldest dropped), each truncated to ``max_chars`` characters. The cost of an insertion is
``group_size - 1`` chrF pairs, so this runs off the request path.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from operator import add
from typing import Any

CHRF_ORDER = 6
CHRF_BETA = 2.0
DISTINCT_WINDOW = 200  # responses behind distinct-2 (a fixed count: the value depends on it)
CLUSTER_SIMILARITY = 60.0
_WORD = re.compile(r"\w+|[^\w\s]")
_WS = re.compile(r"\s+")

NGrams = list[Counter[str]]


class _Grams(list):  # type: ignore[type-arg]
    """``char_ngrams``' result: the per-order counters, and how many n-grams each order holds (their counts' sum,
    which chrF needs for every pair)."""

    __slots__ = ("totals",)
    totals: list[int]


def char_ngrams(text: str, order: int = CHRF_ORDER) -> NGrams:
    s = _WS.sub("", text)
    grams: list[str] = list(s)
    out = _Grams()
    out.totals = []
    for n in range(1, order + 1):
        if n > 1:  # the n-grams are the (n-1)-grams, each extended by the next character: joined in C
            grams = list(map(add, grams, s[n - 1 :]))
        out.append(Counter(grams))
        out.totals.append(len(grams))
    return out


def _totals(g: NGrams) -> list[int]:
    t: list[int] | None = getattr(g, "totals", None)
    return t if t is not None else [sum(c.values()) for c in g]


def chrf_pair(a: NGrams, b: NGrams, beta: float = CHRF_BETA) -> tuple[float, float]:
    """(chrF(a as hypothesis, b as reference), chrF(b, a)), each 0..100, sharing the n-gram matches."""
    b2 = beta * beta
    fab = fba = 0.0
    orders = 0
    for ca, cb, na, nb in zip(a, b, _totals(a), _totals(b), strict=True):
        if na == 0 or nb == 0:
            continue
        orders += 1
        common = ca.keys() & cb.keys()  # the loops below run in C: 1.5x faster than a generator
        m = sum(map(min, map(ca.__getitem__, common), map(cb.__getitem__, common)))
        if m == 0:
            continue
        pa, ra = m / na, m / nb  # a as hypothesis: precision over a's n-grams, recall over b's
        fab += (1 + b2) * pa * ra / (b2 * pa + ra)
        fba += (1 + b2) * ra * pa / (b2 * ra + pa)
    if orders == 0:
        return (100.0, 100.0) if a == b else (0.0, 0.0)
    return 100.0 * fab / orders, 100.0 * fba / orders


def chrf(hypothesis: str, reference: str) -> float:
    """chrF of one hypothesis against one reference, 0..100."""
    return chrf_pair(char_ngrams(hypothesis), char_ngrams(reference))[0]


def chrf_distance(x: str, y: str) -> float:
    """Symmetric pairwise distance d = 1 - (chrF(x, y) + chrF(y, x)) / 200, in [0, 1]."""
    f1, f2 = chrf_pair(char_ngrams(x), char_ngrams(y))
    return 1.0 - (f1 + f2) / 200.0


def upgma_clusters(sim: list[list[float]], threshold: float = CLUSTER_SIMILARITY) -> int:
    """Number of UPGMA (average-linkage) clusters left when no pair has average similarity >= threshold."""
    clusters: list[list[int]] = [[i] for i in range(len(sim))]
    while len(clusters) > 1:
        best, bi, bj = -1.0, -1, -1
        for i in range(len(clusters)):
            for j in range(i + 1, len(clusters)):
                s = sum(sim[p][q] for p in clusters[i] for q in clusters[j]) / (len(clusters[i]) * len(clusters[j]))
                if s > best:
                    best, bi, bj = s, i, j
        if best < threshold:
            break
        clusters[bi] += clusters.pop(bj)
    return len(clusters)


def prompt_key(prompt: Any) -> str:
    """A hash of the normalised prompt: chat messages' roles and text contents, or the completion prompt."""
    if isinstance(prompt, list):
        parts = []
        for m in prompt:
            if isinstance(m, dict):
                c = m.get("content")
                c = c if isinstance(c, str) else json.dumps(c, sort_keys=True, default=str)
                parts.append(f"{m.get('role', '')}:{c}")
            else:
                parts.append(str(m))
        text = "\n".join(parts)
    else:
        text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, default=str)
    norm = _WS.sub(" ", text.lower()).strip()
    return hashlib.sha1(norm.encode("utf-8", "replace")).hexdigest()[:16]


def word_bigrams(text: str, max_words: int = 256) -> Counter[tuple[str, str]]:
    w = _WORD.findall(text.lower())[:max_words]
    return Counter(zip(w, w[1:], strict=False))


@dataclass
class _Group:
    seqs: deque[int] = field(default_factory=deque)
    grams: dict[int, NGrams] = field(default_factory=dict)
    sims: dict[tuple[int, int], float] = field(default_factory=dict)
    dist_sum: float = 0.0
    pairs: int = 0
    clusters: int = 1


class Diversity:
    def __init__(
        self,
        window: int = 2_000,
        distinct_window: int = DISTINCT_WINDOW,
        max_groups: int = 256,
        group_size: int = 6,
        max_chars: int = 1_000,
        max_words: int = 256,
    ) -> None:
        self.window, self.distinct_window = window, distinct_window
        self.max_groups, self.group_size, self.max_chars, self.max_words = max_groups, group_size, max_chars, max_words
        self._bigram_ring: deque[Counter[tuple[str, str]]] = deque()
        self._bigrams: Counter[tuple[str, str]] = Counter()
        self._bigram_total = 0
        self._groups: OrderedDict[str, _Group] = OrderedDict()
        self.seq = 0

    # -- distinct-2 -----------------------------------------------------------------------------------------------
    def _add_bigrams(self, text: str) -> None:
        c = word_bigrams(text, self.max_words)
        self._bigram_ring.append(c)
        self._bigrams.update(c)
        self._bigram_total += sum(c.values())
        self._trim_bigrams()

    def _trim_bigrams(self) -> None:
        while len(self._bigram_ring) > self.distinct_window:
            old = self._bigram_ring.popleft()
            self._bigrams.subtract(old)
            self._bigram_total -= sum(old.values())
            for g in old:
                if self._bigrams[g] <= 0:
                    del self._bigrams[g]

    def set_distinct_window(self, n: int) -> None:
        """Measure distinct-2 over ``n`` responses from now on (to match a baseline measured over ``n``)."""
        self.distinct_window = max(1, int(n))
        self._trim_bigrams()

    def distinct_2(self) -> float | None:
        return len(self._bigrams) / self._bigram_total if self._bigram_total else None

    @property
    def distinct_ready(self) -> bool:
        return len(self._bigram_ring) >= self.distinct_window

    # -- chrF groups ----------------------------------------------------------------------------------------------
    def _add_to_group(self, key: str, text: str) -> None:
        g = self._groups.pop(key, None) or _Group()
        self._groups[key] = g  # most recently used last
        while g.seqs and (len(g.seqs) >= self.group_size or g.seqs[0] <= self.seq - self.window):
            old = g.seqs.popleft()
            del g.grams[old]
            g.sims = {p: s for p, s in g.sims.items() if old not in p}
        grams = char_ngrams(text[: self.max_chars])
        for other in g.seqs:
            f1, f2 = chrf_pair(grams, g.grams[other])
            g.sims[(other, self.seq)] = (f1 + f2) / 2.0
        g.seqs.append(self.seq)
        g.grams[self.seq] = grams
        members = list(g.seqs)
        idx = {s: i for i, s in enumerate(members)}
        sim = [[100.0] * len(members) for _ in members]
        for (a, b), s in g.sims.items():
            sim[idx[a]][idx[b]] = sim[idx[b]][idx[a]] = s
        g.pairs = len(g.sims)
        g.dist_sum = sum(1.0 - s / 100.0 for s in g.sims.values())
        g.clusters = upgma_clusters(sim)
        while self._groups:
            first_key, first = next(iter(self._groups.items()))
            stale = not first.seqs or first.seqs[-1] <= self.seq - self.window
            if len(self._groups) > self.max_groups or stale:
                del self._groups[first_key]
            else:
                break

    def add(self, text: str, prompt_hash: str | None) -> None:
        """Add one response (its text and its normalised-prompt hash, or None to skip the chrF groups)."""
        self.seq += 1
        self._add_bigrams(text)
        if prompt_hash is not None:
            self._add_to_group(prompt_hash, text)

    def chrf_stats(self) -> dict[str, float | int | None]:
        """Mean pairwise chrF distance over all repeated-prompt pairs, and mean UPGMA cluster count per group."""
        pairs = sum(g.pairs for g in self._groups.values())
        multi = [g for g in self._groups.values() if len(g.seqs) >= 2]
        return {
            "chrf_distance": sum(g.dist_sum for g in self._groups.values()) / pairs if pairs else None,
            "pairs": pairs,
            "groups": len(multi),
            "clusters_mean": sum(g.clusters for g in multi) / len(multi) if multi else None,
            "cluster_share": sum(g.clusters for g in multi) / sum(len(g.seqs) for g in multi) if multi else None,
        }
