"""Distribution drift of token entropy: a sliding window against a baseline, PSI and Jensen-Shannon.

Both measures compare two histograms over the same fixed bins, turned into probabilities p (window) and
q (baseline). Empty bins are smoothed with ``eps`` (added to every bin, then renormalised) so that neither
measure is infinite:

- Population Stability Index, PSI = sum_i (p_i - q_i) ln(p_i / q_i) = KL(p||q) + KL(q||p)  (nats, >= 0).
  Customary reading: < 0.1 stable, 0.1-0.25 moderate, > 0.25 a significant shift.
- Jensen-Shannon divergence, JS = 1/2 KL(p||m) + 1/2 KL(q||m), m = (p+q)/2  (nats, 0 <= JS <= ln 2).

Two distributions are tracked per model: of token entropy (the gauge) and of the per-response mean entropy
(status only: with few responses its PSI is mostly sampling noise, ~ (bins - 1)(1/n1 + 1/n2)). The window is
the last ``window`` responses: one small per-response bin-count row each, kept in a ring (memory
``window x 2 x len(bins)`` int32, 2,000 x 2 x 16 x 4 bytes = 256 kB by default). The baseline is the first
``baseline_tokens`` tokens after start (then frozen), or a saved snapshot (:meth:`DriftMonitor.to_dict`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

Floats = NDArray[np.float64]

# Fixed bin edges (nats). Fine near 0, where over half of all tokens sit; the last bin is open.
ENTROPY_EDGES: tuple[float, ...] = (
    0.0, 0.01, 0.03, 0.07, 0.15, 0.25, 0.4, 0.6, 0.8, 1.0, 1.3, 1.7, 2.2, 3.0, 4.0, 6.0, float("inf"),
)
EPS = 1e-4
MIN_RESPONSES = 200


def _probs(counts: ArrayLike, eps: float) -> Floats:
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or c.size == 0 or np.any(c < 0):
        raise ValueError("counts must be a non-empty 1-D array of non-negative numbers")
    s = c.sum()
    p = c / s if s > 0 else np.full(c.size, 1.0 / c.size)
    p = p + eps
    out: Floats = p / p.sum()
    return out


def psi(window: ArrayLike, baseline: ArrayLike, eps: float = EPS) -> float:
    """Population Stability Index of two histograms over the same bins, nats.

    ``PSI = sum_i (p_i - q_i) ln(p_i / q_i)`` with p from ``window``, q from ``baseline`` (counts or
    probabilities; both are normalised, then smoothed by ``eps``). Symmetric; equals KL(p||q) + KL(q||p).
    """
    p, q = _probs(window, eps), _probs(baseline, eps)
    if p.shape != q.shape:
        raise ValueError("histograms must have the same bins")
    return float(np.sum((p - q) * np.log(p / q)))


def js_divergence(window: ArrayLike, baseline: ArrayLike, eps: float = EPS) -> float:
    """Jensen-Shannon divergence of two histograms over the same bins, nats, in [0, ln 2]."""
    p, q = _probs(window, eps), _probs(baseline, eps)
    if p.shape != q.shape:
        raise ValueError("histograms must have the same bins")
    m = 0.5 * (p + q)
    # 0 log 0 = 0: sum over each side's support only (possible when eps = 0)
    kp = float(np.sum(p[p > 0] * np.log(p[p > 0] / m[p > 0])))
    kq = float(np.sum(q[q > 0] * np.log(q[q > 0] / m[q > 0])))
    return 0.5 * kp + 0.5 * kq


class DriftMonitor:
    """Token-entropy and response-mean-entropy drift of one model (sliding window vs baseline)."""

    def __init__(
        self,
        window: int = 2_000,
        baseline_tokens: int = 20_000,
        edges: tuple[float, ...] = ENTROPY_EDGES,
        min_window_tokens: int = 500,
    ) -> None:
        self.edges: Floats = np.asarray(edges, dtype=np.float64)
        self._inner: Floats = self.edges[1:-1]
        nb = len(edges) - 1
        self.window = window
        self.baseline_tokens = baseline_tokens
        self.min_window_tokens = min_window_tokens
        self._tok_rows = np.zeros((window, nb), dtype=np.int32)
        self._resp_rows = np.zeros((window, nb), dtype=np.int32)
        self._row_tokens = np.zeros(window, dtype=np.int64)
        self._next = 0
        self._seen = 0
        self.win_tokens = np.zeros(nb, dtype=np.int64)
        self.win_responses = np.zeros(nb, dtype=np.int64)
        self.base_tokens = np.zeros(nb, dtype=np.int64)
        self.base_responses = np.zeros(nb, dtype=np.int64)
        self.frozen = False  # True once the baseline is complete (or loaded)
        self.source = "startup"

    def _bin(self, values: Floats) -> NDArray[np.int64]:
        idx = np.searchsorted(self._inner, np.maximum(values, 0.0), side="right")
        return np.bincount(idx, minlength=len(self.edges) - 1).astype(np.int64)

    def update(self, entropies: Floats) -> bool:
        """Add one response's per-token entropies. Returns True when this call completed the baseline."""
        v = np.asarray(entropies, dtype=np.float64)
        v = v[~np.isnan(v)]
        if v.size == 0:
            return False
        tok = self._bin(v)
        resp = self._bin(np.array([v.mean()]))
        i = self._next
        self.win_tokens += tok - self._tok_rows[i]
        self.win_responses += resp - self._resp_rows[i]
        self._tok_rows[i] = tok
        self._resp_rows[i] = resp
        self._row_tokens[i] = v.size
        self._next = (i + 1) % self.window
        self._seen += 1
        if self.frozen:
            return False
        self.base_tokens += tok
        self.base_responses += resp
        if int(self.base_tokens.sum()) >= self.baseline_tokens:
            self.frozen = True
            return True
        return False

    @property
    def window_token_count(self) -> int:
        return int(self.win_tokens.sum())

    def values(self) -> dict[str, float | None]:
        """PSI and JS for tokens and response means; None until the baseline is frozen and the window is full enough."""
        out: dict[str, float | None] = {
            "psi_tokens": None, "js_tokens": None, "psi_responses": None, "js_responses": None,
        }
        if not self.frozen or self.window_token_count < self.min_window_tokens:
            return out
        out["psi_tokens"] = psi(self.win_tokens, self.base_tokens)
        out["js_tokens"] = js_divergence(self.win_tokens, self.base_tokens)
        # Response means are few: with B bins and n responses PSI's sampling noise is ~ (B - 1)(1/n1 + 1/n2),
        # so they are compared only once both sides hold MIN_RESPONSES.
        if min(self.base_responses.sum(), self.win_responses.sum()) >= MIN_RESPONSES:
            out["psi_responses"] = psi(self.win_responses, self.base_responses)
            out["js_responses"] = js_divergence(self.win_responses, self.base_responses)
        return out

    def drift(self) -> dict[str, float | None]:
        """The gauge values: the token-entropy divergences (the response-mean ones are in :meth:`values`)."""
        v = self.values()
        return {"psi": v["psi_tokens"], "js": v["js_tokens"]}

    # -- baseline snapshots ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "edges": [e if np.isfinite(e) else "inf" for e in self.edges.tolist()],
            "token_counts": self.base_tokens.tolist(),
            "response_counts": self.base_responses.tolist(),
            "complete": self.frozen,
        }

    def load_dict(self, data: dict[str, Any]) -> None:
        """Replace the baseline with a snapshot (validated by :func:`validate_drift_dict`) and freeze it."""
        d = validate_drift_dict(data)
        if len(d["edges"]) != len(self.edges) or not np.allclose(d["edges"], self.edges):
            raise ValueError("baseline bins differ from this monitor's bins")
        self.base_tokens = np.asarray(d["token_counts"], dtype=np.int64)
        self.base_responses = np.asarray(d["response_counts"], dtype=np.int64)
        self.frozen = True
        self.source = "file"


def validate_drift_dict(data: Any) -> dict[str, Any]:
    """Check a drift baseline snapshot; returns it with ``edges`` as floats. Raises ValueError naming the field."""
    if not isinstance(data, dict):
        raise ValueError("drift: must be an object")
    try:
        edges = [float(e) for e in data["edges"]]
    except (KeyError, TypeError, ValueError):
        raise ValueError("drift.edges: missing or not a list of numbers") from None
    if len(edges) < 3 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError("drift.edges: must be at least 3 increasing numbers")
    for key in ("token_counts", "response_counts"):
        c = data.get(key)
        if (
            not isinstance(c, list) or len(c) != len(edges) - 1
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in c)
        ):
            raise ValueError(f"drift.{key}: must be {len(edges) - 1} non-negative integers")
    if sum(data["token_counts"]) == 0:
        raise ValueError("drift.token_counts: empty baseline")
    return {**data, "edges": edges}
