"""Response-format classifier and the Shannon entropy of the format mix (Zhao et al., "Echo Chamber", 2504.07912).

RL amplifies one output format within the first epoch; a sudden concentration of the mix after a model change is
the signal. Each response gets exactly one label, the first that matches in this order:

1. ``tool_call`` - ``finish_reason == "tool_calls"``, a ``<tool_call>`` tag, or a JSON object with ``name`` and
   ``arguments``/``parameters``;
2. ``json``      - the whole text (optionally inside one fenced block) parses as a JSON object or array;
3. ``code``      - a fenced code block (```` ``` ````);
4. ``table``     - a markdown table (a ``|---|`` separator row under a ``| ... |`` row);
5. ``latex``     - ``\\boxed{``, ``\\begin{``, ``$$`` or ``\\[`` ... ``\\]``;
6. ``list``      - at least two lines that are markdown list items (``-``, ``*``, ``+``, ``1.``, ``1)``);
7. ``prose``     - anything else.

The mix is tracked over the last ``window`` responses (a ring of labels plus counts: O(window) memory).
``entropy`` is in nats, 0 (one format) .. ln 7.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, deque

FORMATS: tuple[str, ...] = ("tool_call", "json", "code", "table", "latex", "list", "prose")

_FENCE_ONLY = re.compile(r"^```[\w+-]*\s*\n(.*)\n```\s*$", re.S)
_TABLE_SEP = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)+\|?\s*$", re.M)
_LATEX = re.compile(r"\\boxed\{|\\begin\{|\$\$|\\\[[\s\S]*?\\\]")
_LIST_ITEM = re.compile(r"^\s{0,3}(?:[-*+]|\d{1,3}[.)])\s+\S", re.M)
_MAX_CHARS = 20_000  # classify on the first 20k characters: bounded cost


def _json_value(text: str) -> object | None:
    s = text.strip()
    m = _FENCE_ONLY.match(s)
    if m:
        s = m.group(1).strip()
    if not s or s[0] not in "[{":
        return None
    try:
        v = json.loads(s)
    except ValueError:
        return None
    return v if isinstance(v, (dict, list)) else None


def classify_format(text: str, finish_reason: str | None = None) -> str:
    """One of :data:`FORMATS` for a response text."""
    if finish_reason == "tool_calls":
        return "tool_call"
    t = text[:_MAX_CHARS]
    if "<tool_call>" in t:
        return "tool_call"
    v = _json_value(t)
    if v is not None:
        if isinstance(v, dict) and "name" in v and ("arguments" in v or "parameters" in v):
            return "tool_call"
        return "json"
    if "```" in t:
        return "code"
    if _TABLE_SEP.search(t) and re.search(r"^\s*\|.*\|\s*$", t, re.M):
        return "table"
    if _LATEX.search(t):
        return "latex"
    if len(_LIST_ITEM.findall(t)) >= 2:
        return "list"
    return "prose"


def shannon_entropy(counts: Counter[str] | dict[str, int]) -> float:
    """Shannon entropy (nats) of the distribution given by ``counts``; 0 for an empty one."""
    n = sum(counts.values())
    if n <= 0:
        return 0.0
    return float(-sum((c / n) * math.log(c / n) for c in counts.values() if c > 0))


class FormatMix:
    """The format mix over the last ``window`` responses."""

    def __init__(self, window: int = 2_000) -> None:
        self._labels: deque[str] = deque()
        self.window = window
        self.counts: Counter[str] = Counter()

    def update(self, label: str) -> None:
        self._labels.append(label)
        self.counts[label] += 1
        if len(self._labels) > self.window:
            old = self._labels.popleft()
            self.counts[old] -= 1
            if self.counts[old] == 0:
                del self.counts[old]

    def __len__(self) -> int:
        return len(self._labels)

    def entropy(self) -> float | None:
        return shannon_entropy(self.counts) if self._labels else None

    def shares(self) -> dict[str, float]:
        n = len(self._labels)
        return {k: round(v / n, 4) for k, v in sorted(self.counts.items())} if n else {}
