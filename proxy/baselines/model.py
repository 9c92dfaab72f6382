"""A baseline of one (model, revision): what the live monitors and the alert rules compare with.

Measures (the names of ``entropy_proxy_baseline{measure}``):

- ``token_entropy_mean`` and ``token_entropy_p80`` over every generated token of the warm-up (nats);
- ``forking_threshold``: the p80 when the baseline was made, **fixed** from then on. A rolling 80th percentile
  follows whatever the model does now, so the share of tokens above it stays near 20 % even through a collapse;
  a fixed cut-off lets that share fall when forking tokens disappear. ``forking_fraction`` is the share of the
  warm-up's tokens above it (~0.2 by construction, less when many tokens tie at zero);
- ``response_entropy_mean`` (and its standard deviation, the collapse detector's reference) and the
  distribution of per-response mean entropy, with the token-entropy distribution, as histogram counts over the
  drift monitor's fixed edges (PSI / JS need nothing more);
- the mean and standard deviation of each response's top-20 % token entropy (the forking-entropy detector's
  reference);
- the diversity measures as they stood at the end of the warm-up (``distinct_2``, ``chrf_distance``,
  ``format_entropy``; absent when too few responses stood behind them), with those sample counts.

:class:`BaselineBuilder` collects one from live traffic: tokens until ``target_tokens``, responses until
``min_responses``. It keeps the raw token entropies (at most ``RAW_CAP`` x the target, 8 bytes each) so p80 and
the fraction above it are exact, not read off a sketch.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from monitors.drift import ENTROPY_EDGES
from monitors.forking import TOP_SHARE

MEASURES = (
    "token_entropy_mean", "token_entropy_p80", "forking_fraction", "response_entropy_mean",
    "distinct_2", "chrf_distance", "format_entropy",
)
DIVERSITY = ("distinct_2", "chrf_distance", "format_entropy")
SOURCES = ("pinned", "file", "auto")  # priority order: the first present wins
RAW_CAP = 4
FORMAT = "entropy-proxy-model-baseline"


def _edges_json() -> list[float | str]:
    return [e if math.isfinite(e) else "inf" for e in ENTROPY_EDGES]


@dataclass
class Baseline:
    model: str
    revision: str
    source: str
    created: float
    tokens: int
    responses: int
    token_entropy_mean: float | None = None
    token_entropy_p80: float | None = None
    forking_threshold: float | None = None
    forking_fraction: float | None = None
    response_entropy_mean: float | None = None
    response_entropy_sd: float | None = None
    top20_mean: float | None = None
    top20_sd: float | None = None
    token_counts: list[int] = field(default_factory=list)
    response_counts: list[int] = field(default_factory=list)
    diversity: dict[str, float | None] = field(default_factory=dict)
    diversity_samples: dict[str, int] = field(default_factory=dict)
    note: str | None = None

    def measures(self) -> dict[str, float]:
        out: dict[str, float | None] = {
            "token_entropy_mean": self.token_entropy_mean, "token_entropy_p80": self.token_entropy_p80,
            "forking_fraction": self.forking_fraction, "response_entropy_mean": self.response_entropy_mean,
            **{m: self.diversity.get(m) for m in DIVERSITY},
        }
        return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}

    def drift_dict(self) -> dict[str, Any] | None:
        """The drift monitor's snapshot form (``monitors.drift.DriftMonitor.load_dict``); None without counts."""
        n = len(ENTROPY_EDGES) - 1
        if len(self.token_counts) != n or len(self.response_counts) != n or sum(self.token_counts) == 0:
            return None
        return {"edges": _edges_json(), "token_counts": list(self.token_counts),
                "response_counts": list(self.response_counts), "complete": True}

    def collapse_dict(self) -> dict[str, Any]:
        """The collapse monitor's snapshot form (``monitors.collapse.CollapseMonitor.load_dict``)."""
        return {
            "entropy": {"mu0": self.response_entropy_mean, "sigma0": self.response_entropy_sd},
            "forking": {"mu0": self.top20_mean, "sigma0": self.top20_sd},
            "diversity": {m: self.diversity.get(m) for m in DIVERSITY},
        }

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": 1, "edges": _edges_json(), **asdict(self)}

    def summary(self) -> dict[str, Any]:
        """The short form for status pages and the CLI (no histograms)."""
        return {
            "model": self.model, "revision": self.revision, "source": self.source, "created": self.created,
            "tokens": self.tokens, "responses": self.responses, "forking_threshold": self.forking_threshold,
            "measures": {k: round(v, 5) for k, v in self.measures().items()},
            "diversity_samples": dict(self.diversity_samples), "note": self.note,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Baseline:
        """Parse :meth:`to_dict` output; raises ValueError naming the bad field."""
        if not isinstance(data, dict):
            raise ValueError("baseline: must be an object")
        kw: dict[str, Any] = {}
        for name in ("model", "revision", "source"):
            v = data.get(name)
            if not isinstance(v, str) or not v:
                raise ValueError(f"baseline.{name}: must be a non-empty string")
            kw[name] = v
        for name in ("created",):
            kw[name] = float(data.get(name) or 0.0)
        for name in ("tokens", "responses"):
            v = data.get(name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"baseline.{name}: must be a non-negative integer")
            kw[name] = v
        for name in ("token_entropy_mean", "token_entropy_p80", "forking_threshold", "forking_fraction",
                     "response_entropy_mean", "response_entropy_sd", "top20_mean", "top20_sd"):
            v = data.get(name)
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                raise ValueError(f"baseline.{name}: must be a number or null")
            kw[name] = None if v is None else float(v)
        n = len(ENTROPY_EDGES) - 1
        for name in ("token_counts", "response_counts"):
            v = data.get(name) or []
            if v and (len(v) != n or not all(isinstance(x, int) and x >= 0 for x in v)):
                raise ValueError(f"baseline.{name}: must be {n} non-negative integers")
            kw[name] = list(v)
        edges = data.get("edges")
        if edges is not None and [float(e) for e in edges] != list(ENTROPY_EDGES):
            raise ValueError("baseline.edges: differ from this version's histogram edges")
        div = data.get("diversity") or {}
        kw["diversity"] = {m: float(div[m]) for m in DIVERSITY if isinstance(div.get(m), (int, float))}
        samples = data.get("diversity_samples") or {}
        kw["diversity_samples"] = {m: int(samples[m]) for m in DIVERSITY if isinstance(samples.get(m), int)}
        note = data.get("note")
        kw["note"] = note if isinstance(note, str) else None
        return cls(**kw)

    @classmethod
    def from_file_entry(cls, model: str, revision: str, source: str, entry: dict[str, Any]) -> Baseline:
        """A baseline from one model's entry of a ``baseline save`` file (``{"drift", "collapse"[, "baseline"]}``).

        Files written by this version carry the whole baseline under ``"baseline"``; older ones only the drift
        histograms and the collapse references, from which the token measures are read off the histogram
        (mean from bin midpoints, p80 interpolated inside its bin: approximate, and said so in ``note``).
        """
        full = entry.get("baseline")
        if isinstance(full, dict):
            b = cls.from_dict({**full, "model": model, "revision": revision, "source": source})
            return b
        drift, col = entry.get("drift") or {}, entry.get("collapse") or {}
        tok = [int(x) for x in drift.get("token_counts") or []]
        resp = [int(x) for x in drift.get("response_counts") or []]
        if len(tok) != len(ENTROPY_EDGES) - 1 or sum(tok) == 0:
            raise ValueError(f"models.{model}.drift: no token histogram over this version's edges")
        mean, p80, frac = _histogram_measures(np.asarray(tok, dtype=np.float64))
        ent, fork = col.get("entropy") or {}, col.get("forking") or {}
        div = col.get("diversity") or {}
        return cls(
            model=model, revision=revision, source=source, created=time.time(), tokens=sum(tok),
            responses=sum(resp), token_entropy_mean=mean, token_entropy_p80=p80, forking_threshold=p80,
            forking_fraction=frac, response_entropy_mean=_num(ent.get("mu0")),
            response_entropy_sd=_num(ent.get("sigma0")),
            top20_mean=_num(fork.get("mu0")), top20_sd=_num(fork.get("sigma0")), token_counts=tok,
            response_counts=resp if len(resp) == len(tok) else [0] * len(tok),
            diversity={m: float(div[m]) for m in DIVERSITY if isinstance(div.get(m), (int, float))},
            note="token measures read off a saved histogram (approximate)",
        )


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _histogram_measures(counts: NDArray[np.float64]) -> tuple[float, float, float]:
    edges = np.asarray(ENTROPY_EDGES, dtype=np.float64)
    upper = edges[1:].copy()
    upper[-1] = edges[-2] * 1.5  # the open last bin: a nominal midpoint
    mids = (edges[:-1] + upper) / 2
    total = counts.sum()
    mean = float((counts * mids).sum() / total)
    cum = np.cumsum(counts)
    b = int(np.searchsorted(cum, 0.8 * total, side="left"))
    before = cum[b - 1] if b > 0 else 0.0
    frac_in = (0.8 * total - before) / counts[b] if counts[b] else 0.0
    p80 = float(edges[b] + frac_in * (upper[b] - edges[b]))
    above = float(counts[b + 1:].sum() + (1 - frac_in) * counts[b]) / total
    return mean, p80, above


class _Welford:
    __slots__ = ("n", "mean", "m2")

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    def sd(self) -> float | None:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n >= 2 else None


class BaselineBuilder:
    """Collects one (model, revision)'s automatic baseline from live traffic (thread-safe: fed on the request
    path, finished from the monitors' worker)."""

    def __init__(self, model: str, revision: str, target_tokens: int, min_responses: int) -> None:
        self.model, self.revision = model, revision
        self.target_tokens, self.min_responses = target_tokens, min_responses
        self._inner = np.asarray(ENTROPY_EDGES[1:-1], dtype=np.float64)
        n = len(ENTROPY_EDGES) - 1
        self._tok = np.zeros(n, dtype=np.int64)
        self._resp = np.zeros(n, dtype=np.int64)
        self._raw: list[NDArray[np.float64]] = []
        self._raw_n = 0
        self._sum = 0.0
        self.tokens = 0
        self.responses = 0
        self._means = _Welford()
        self._top = _Welford()
        self._lock = threading.Lock()
        self.done = False

    def _bin(self, v: NDArray[np.float64]) -> NDArray[np.int64]:
        idx = np.searchsorted(self._inner, np.maximum(v, 0.0), side="right")
        return np.bincount(idx, minlength=len(ENTROPY_EDGES) - 1).astype(np.int64)

    def add(self, h: NDArray[np.float64]) -> None:
        if self.done or h.size == 0:
            return
        k = max(1, math.ceil(TOP_SHARE * h.size))
        top = float(np.partition(h, h.size - k)[h.size - k:].mean())
        mean = float(h.mean())
        with self._lock:
            self._tok += self._bin(h)
            self._resp += self._bin(np.array([mean]))
            if self._raw_n < RAW_CAP * self.target_tokens:
                self._raw.append(h.copy())
                self._raw_n += int(h.size)
            self._sum += float(h.sum())
            self.tokens += int(h.size)
            self.responses += 1
            self._means.add(mean)
            self._top.add(top)

    @property
    def volume_reached(self) -> bool:
        return self.tokens >= self.target_tokens and self.responses >= self.min_responses

    def progress(self) -> dict[str, Any]:
        return {"revision": self.revision, "tokens": self.tokens, "responses": self.responses,
                "target_tokens": self.target_tokens, "target_responses": self.min_responses}

    def finish(self, diversity: dict[str, float | None], samples: dict[str, int], now: float | None = None) -> Baseline:
        with self._lock:
            self.done = True
            raw = np.concatenate(self._raw) if self._raw else np.zeros(0)
            p80 = float(np.quantile(raw, 0.8)) if raw.size else None
            frac = float(np.count_nonzero(raw > p80)) / raw.size if p80 is not None else None
            self._raw = []
            return Baseline(
                model=self.model, revision=self.revision, source="auto", created=time.time() if now is None else now,
                tokens=self.tokens, responses=self.responses,
                token_entropy_mean=self._sum / self.tokens if self.tokens else None,
                token_entropy_p80=p80, forking_threshold=p80, forking_fraction=frac,
                response_entropy_mean=self._means.mean if self._means.n else None,
                response_entropy_sd=self._means.sd(), top20_mean=self._top.mean if self._top.n else None,
                top20_sd=self._top.sd(), token_counts=self._tok.tolist(), response_counts=self._resp.tolist(),
                diversity={m: v for m, v in diversity.items() if m in DIVERSITY and v is not None},
                diversity_samples={m: n for m, n in samples.items() if m in DIVERSITY},
            )
