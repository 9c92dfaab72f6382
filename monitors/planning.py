"""Planning vs execution tokens and the semantic entropy of strategic grams (HICRA, arXiv 2509.03646).

A *strategic gram* is a 3-5 word phrase that recurs across solutions but rarely within one ("let's try a different
approach", "we can use the fact that"). A generated token is a **planning** token when its characters overlap a
match of a strategic gram in the response text; every other token is an **execution** token. Matching is
case-insensitive, on word boundaries, with runs of whitespace folded and curly apostrophes read as straight ones.

The **semantic-gram entropy** of a window is the Shannon entropy (nats) of the frequencies of the strategic grams
matched in the window's responses. HICRA's second phase shows it *rising* while execution-token entropy falls;
collapse of planning shows it falling.

The shipped lexicon is ``monitors/data/strategic_grams.txt``; ``monitors.strategic_grams_file`` replaces it.
Memory: the compiled lexicon plus one small counter per response in the window.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from importlib import resources
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from .formats import shannon_entropy

_APOS = str.maketrans({"\u2019": "'", "\u2018": "'"})


def load_lexicon(path: str | None = None) -> list[str]:
    """Phrases from a lexicon file (one a line, '#' comments); the shipped default when ``path`` is None."""
    if path is None:
        text = resources.files("monitors").joinpath("data/strategic_grams.txt").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    out: list[str] = []
    for line in text.splitlines():
        s = " ".join(line.strip().lower().translate(_APOS).split())
        if s and not s.startswith("#"):
            out.append(s)
    if not out:
        raise ValueError(f"strategic-gram lexicon {path or 'default'} has no phrases")
    return out


class PlanningClassifier:
    def __init__(self, phrases: list[str]) -> None:
        self.phrases = sorted(set(phrases), key=len, reverse=True)  # longest first: alternation prefers them
        alts = "|".join(r"\s+".join(re.escape(w) for w in p.split(" ")) for p in self.phrases)
        self._re = re.compile(rf"(?<!\w)(?:{alts})(?!\w)")

    def matches(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, normalised phrase) of each non-overlapping lexicon match in ``text``."""
        t = text.lower().translate(_APOS)
        return [(m.start(), m.end(), " ".join(m.group(0).split())) for m in self._re.finditer(t)]

    def classify(self, tokens: list[str]) -> tuple[NDArray[np.bool_], Counter[str]]:
        """Per-token planning mask (True = planning) and the counts of the grams matched.

        Tokens are lower-cased one by one so that character offsets stay aligned with the token list.
        """
        low = [tok.lower().translate(_APOS) for tok in tokens]
        lengths = np.fromiter((len(t) for t in low), dtype=np.int64, count=len(low))
        ends = np.cumsum(lengths)
        starts = ends - lengths
        mask = np.zeros(len(low), dtype=np.bool_)
        grams: Counter[str] = Counter()
        for s, e, phrase in self.matches("".join(low)):
            mask |= (starts < e) & (ends > s)
            grams[phrase] += 1
        return mask, grams


class SemanticGramWindow:
    """Frequencies of matched strategic grams over the last ``window`` responses, and their entropy."""

    def __init__(self, window: int = 2_000) -> None:
        self.window = window
        self._ring: deque[Counter[str]] = deque()
        self.counts: Counter[str] = Counter()

    def update(self, grams: Counter[str]) -> None:
        self._ring.append(grams)
        self.counts.update(grams)
        if len(self._ring) > self.window:
            old = self._ring.popleft()
            self.counts.subtract(old)
            for g in old:
                if self.counts[g] <= 0:
                    del self.counts[g]

    def entropy(self) -> float | None:
        """Shannon entropy (nats) of strategic-gram frequencies in the window; None before any match."""
        return shannon_entropy(self.counts) if self.counts else None

    def planning_responses(self) -> int:
        return sum(1 for c in self._ring if c)
