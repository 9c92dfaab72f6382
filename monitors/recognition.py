r"""Recognition: on-policy versus off-policy entropy from re-scored text, and the entropy-state diagnosis.

A probe re-scores text under the model with ``prompt_logprobs`` (teacher forcing): for each position ``t`` of the
scored text it gets the top-K logprobs of the model's next-token distribution plus the logprob of the token
that actually follows. From them, per position (all in nats):

* the entropy ``H_t`` of the model's prediction, estimated from the top K exactly as the proxy estimates the
  entropy of generated tokens (:func:`monitors.entropy.estimate_positions`, ``topk-tail-v1``);
* the input surprise ``S_t = -log p(x_t | x_<t)`` of the token actually there (Shannon information content).

For text the model sampled itself at temperature 1, ``E[S_t] = H_t``; text the model would not write has
``S_t > H_t`` on average (the gap is the cross-entropy minus entropy, i.e. the KL divergence of the text's source
from the model, per token). The two sides of one prompt:

* **on-policy**: the model's own completion. Re-scoring it must reproduce the entropies measured at generation
  time (same model, same prefix, same distribution): the *self-check* is their mean absolute difference.
* **off-policy**: a completion the model did not write (a reference answer, another model's answer).

The **recognition ratio** is ``H_off / H_on`` with ``H`` the mean per-token entropy of each side; over a window
of pairs it is the ratio of the mean of per-pair means (a ratio of means, so one near-zero on-policy response
cannot blow it up). G. and Lindsey (arXiv 2605.25459) report 3-4x lower entropy on the model's own trajectory
for post-trained models and none for pretrained ones; a small model may show none (SmolLM2-135M: 0.67-0.87).

Reading it: both sides of a pair share the prompt, so a change of traffic moves both and leaves the ratio where it
was. A *rising* ratio means the model grew more certain on its own samples relative to foreign text: it sharpened
on its own distribution, which is what post-training and collapse produce. A ratio needs genuinely foreign text
(a reference answer, or another model's answer): an "other" answer from the same model gives ~1 by construction,
so none is formed. A rise counts only when its bootstrap interval (:meth:`RecognitionTracker.rise_interval`)
excludes 1: with the per-pair spread of a real model, rises of 1.25 over 5 pairs appear by chance.

The diagnosis (:func:`diagnose`) combines the live monitors and the ratio into one state per model; its rule and
the evidence behind each step are documented on the function and in ``docs/recognition.md``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .canary_diagnosis import t_quantile
from .collapse import COLLAPSE_THRESHOLD
from .entropy import DEFAULT_VOCAB_SIZE, NEG_INF_SENTINEL, estimate_positions

__all__ = [
    "Diagnosis",
    "Evidence",
    "RecognitionTracker",
    "ScoredText",
    "SelfCheck",
    "bootstrap_ratio_interval",
    "bootstrap_rise_interval",
    "diagnose",
    "input_surprise",
    "recognition_ratio",
    "rows_from_prompt_logprobs",
    "score_rows",
    "selfcheck",
]

F64 = NDArray[np.float64]

MIN_ON_ENTROPY = 1e-3  #: nats; below this the on-policy side is deterministic and a ratio means nothing
# Decision thresholds (see diagnose()).
COLLAPSE_LINE = COLLAPSE_THRESHOLD  #: the collapse score at which entropy counts as "down"
DIVERSITY_FALL = 0.25  #: diversity component at which behaviour counts as narrowed (a 12.5 % relative fall)
RISE_LEVEL = 0.95  #: coverage of the rise's interval; a rise is read only when the interval lies above 1
PSI_LINE, JS_LINE = 0.25, 0.1
STATES = ("healthy", "recognition", "collapse", "drift")


# -- scoring ---------------------------------------------------------------------------------------------------------
def rows_from_prompt_logprobs(
    entries: Sequence[Mapping[str, Any] | None], token_ids: Sequence[int]
) -> tuple[F64, NDArray[np.int64], F64]:
    """Arrays for the estimator from vLLM ``prompt_logprobs`` entries of the scored positions.

    Parameters
    ----------
    entries : sequence of mapping or None, length T
        One per scored position: ``{token_id (str): {"logprob": float, "rank": int, "decoded_token": str}}``
        (the top K plus the actual token, which vLLM always includes). ``None`` marks a position without
        logprobs (the first token of a prompt).
    token_ids : sequence of int, length T
        The actual token at each position.

    Returns
    -------
    logprobs : ndarray, shape (T, W)
        Known logprobs per row, NaN padding (rows without entries are all NaN).
    actual_col : ndarray of int, shape (T,)
        Column of the actual token in each row, -1 if absent.
    actual_logprob : ndarray, shape (T,)
        Logprob of the actual token, NaN if absent.
    """
    if len(entries) != len(token_ids):
        raise ValueError(f"{len(entries)} entries for {len(token_ids)} token ids")
    t = len(entries)
    width = max((len(e) for e in entries if e), default=0)
    lp = np.full((t, max(width, 1)), np.nan)
    col = np.full(t, -1, dtype=np.int64)
    actual = np.full(t, np.nan)
    for i, (entry, tid) in enumerate(zip(entries, token_ids, strict=True)):
        if not entry:
            continue
        want = str(tid)
        for j, (key, info) in enumerate(entry.items()):
            v = info.get("logprob") if isinstance(info, Mapping) else info
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                lp[i, j] = float(v)
                if str(key) == want:
                    col[i], actual[i] = j, float(v)
    return lp, col, actual


def input_surprise(actual_logprob: F64) -> F64:
    """Per-position input surprise ``S_t = -log p(x_t)`` in nats (``inf`` for vLLM's -9999 sentinel, NaN if unknown).

    ``mean(S)`` over a text is its cross-entropy under the model; for the model's own temperature-1 samples its
    expectation equals the mean entropy.
    """
    a = np.asarray(actual_logprob, dtype=np.float64)
    out: F64 = np.where(a <= NEG_INF_SENTINEL, np.inf, -np.minimum(a, 0.0))
    return out


@dataclass(frozen=True, slots=True)
class ScoredText:
    """One re-scored text: per-position entropy estimate, bounds and input surprise (nats)."""

    entropies: F64
    lower: F64
    upper: F64
    surprise: F64

    @property
    def tokens(self) -> int:
        return int(self.entropies.size)

    @property
    def mean_entropy(self) -> float:
        h = self.entropies[np.isfinite(self.entropies)]
        return float(h.mean()) if h.size else math.nan

    @property
    def mean_surprise(self) -> float:
        s = self.surprise[np.isfinite(self.surprise)]
        return float(s.mean()) if s.size else math.nan


def score_rows(
    logprobs: F64, actual_col: NDArray[np.int64], actual_logprob: F64, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> ScoredText:
    """Entropy (``topk-tail-v1`` with the actual token as the sampled column) and surprise per scored position.

    Rows without any entry are dropped (they carry neither quantity).
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    keep = ~np.all(np.isnan(lp), axis=1) if lp.size else np.zeros(lp.shape[0], dtype=bool)
    lp, col, act = lp[keep], np.asarray(actual_col)[keep], np.asarray(actual_logprob, dtype=np.float64)[keep]
    est = estimate_positions(lp, vocab_size, sampled_col=col)
    return ScoredText(entropies=est.point, lower=est.lower, upper=est.upper, surprise=input_surprise(act))


@dataclass(frozen=True, slots=True)
class SelfCheck:
    """Re-scored versus generation-time per-token entropy of the same completion."""

    aligned: bool  #: same number of positions (then compared position by position)
    mean_abs_diff: float | None  #: nats, over aligned positions; None when not aligned
    max_abs_diff: float | None
    mean_diff: float  #: mean(rescored) - mean(generated), nats; defined even when not aligned
    generated_tokens: int
    rescored_tokens: int


def selfcheck(generated: F64, rescored: F64, *, drop_last_generated: bool = False) -> SelfCheck:
    """Compare generation-time and re-scored entropies of one completion.

    ``drop_last_generated``: the generation-time list ends with a token that is not part of the text (the
    end-of-turn token of a finished chat answer); it is left out when that makes the lengths agree.
    """
    g = np.asarray(generated, dtype=np.float64)
    r = np.asarray(rescored, dtype=np.float64)
    if drop_last_generated and g.size == r.size + 1:
        g = g[:-1]
    mean_diff = float(r.mean() - g.mean()) if g.size and r.size else math.nan
    if g.size != r.size or g.size == 0:
        return SelfCheck(False, None, None, mean_diff, int(g.size), int(r.size))
    d = np.abs(r - g)
    d = d[np.isfinite(d)]
    mad = float(d.mean()) if d.size else None
    mx = float(d.max()) if d.size else None
    return SelfCheck(True, mad, mx, mean_diff, int(g.size), int(r.size))


def recognition_ratio(h_off: float, h_on: float) -> float | None:
    """``H_off / H_on`` (mean entropies, nats); None when either is not finite or ``H_on < MIN_ON_ENTROPY``."""
    if not (math.isfinite(h_off) and math.isfinite(h_on)) or h_on < MIN_ON_ENTROPY or h_off < 0:
        return None
    return h_off / h_on


def bootstrap_ratio_interval(
    h_on: Sequence[float], h_off: Sequence[float], *, n_boot: int = 2_000, level: float = 0.9, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the ratio of means ``mean(h_off) / mean(h_on)`` over resampled pairs."""
    on = np.asarray(h_on, dtype=np.float64)
    off = np.asarray(h_off, dtype=np.float64)
    if on.size != off.size or on.size < 2:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, on.size, size=(n_boot, on.size))
    den = on[idx].mean(axis=1)
    ok = den >= MIN_ON_ENTROPY
    if not ok.any():
        return None
    ratios = off[idx].mean(axis=1)[ok] / den[ok]
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(ratios, [a, 1.0 - a])
    return float(lo), float(hi)


def bootstrap_rise_interval(
    base: Sequence[tuple[float, float]], after: Sequence[tuple[float, float]], *, n_boot: int = 1_000,
    level: float = RISE_LEVEL, seed: int = 0,
) -> tuple[float, float] | None:
    """Interval of the rise ``ratio(after) / ratio(base)`` over (h_on, h_off) pairs.

    Both groups are resampled independently; the interval is ``exp(log rise +- t * se)`` with ``se`` the bootstrap
    standard error of the log rise (scaled by ``sqrt(n / (n - 1))`` of the smaller group) and the Student quantile
    with the smaller group's ``n - 1`` degrees of freedom: a percentile interval of five pairs is too narrow.
    """
    b = np.asarray(base, dtype=np.float64).reshape(-1, 2)
    a = np.asarray(after, dtype=np.float64).reshape(-1, 2)
    if b.shape[0] < 2 or a.shape[0] < 2:
        return None
    rng = np.random.default_rng(seed)

    def log_ratio(x: F64, idx: NDArray[np.int64]) -> F64:
        on, off = x[idx, 0].mean(axis=-1), x[idx, 1].mean(axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out: F64 = np.where(on >= MIN_ON_ENTROPY, np.log(off / np.where(on > 0, on, 1.0)), np.nan)
        return out

    est = float(log_ratio(a, np.arange(a.shape[0])[None, :])[0] - log_ratio(b, np.arange(b.shape[0])[None, :])[0])
    reps = log_ratio(a, rng.integers(0, a.shape[0], (n_boot, a.shape[0]))) - log_ratio(
        b, rng.integers(0, b.shape[0], (n_boot, b.shape[0])))
    reps = reps[np.isfinite(reps)]
    if not math.isfinite(est) or reps.size < 2:
        return None
    n = min(a.shape[0], b.shape[0])
    half = t_quantile(1.0 - (1.0 - level) / 2.0, n - 1) * float(np.std(reps, ddof=1)) * math.sqrt(n / (n - 1))
    return math.exp(est - half), math.exp(est + half)


# -- the window of pairs ---------------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Side:
    entropy: deque[float]
    surprise: deque[float]


@dataclass
class RecognitionTracker:
    """Per-model window of (on, off) pairs and a baseline ratio fixed by the first ``baseline_pairs`` pairs.

    ``ratio()`` reads the last ``window`` pairs once ``min_pairs`` exist. ``baseline()`` is the ratio of the first
    ``baseline_pairs`` pairs; ``rise()`` = ratio of the pairs *after* the baseline / baseline, once ``min_pairs``
    of them exist (so the comparison never overlaps the baseline). Single on-policy probes (no off-policy
    text) feed the surprise and entropy readings of the on side only, and the self-check window (mean absolute
    differences of the last ``window`` aligned responses; ``misaligned`` counts the others).
    """

    window: int = 50
    baseline_pairs: int = 20
    min_pairs: int = 5
    pairs: deque[tuple[float, float]] = field(init=False)
    _base: list[tuple[float, float]] = field(init=False, default_factory=list)
    _after: int = field(init=False, default=0)
    on: _Side = field(init=False)
    off: _Side = field(init=False)
    total_pairs: int = field(init=False, default=0)
    checks: deque[float] = field(init=False)
    misaligned: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.pairs = deque(maxlen=self.window)
        self.checks = deque(maxlen=self.window)
        self.on = _Side(deque(maxlen=self.window), deque(maxlen=self.window))
        self.off = _Side(deque(maxlen=self.window), deque(maxlen=self.window))

    def add_selfcheck(self, check: SelfCheck) -> None:
        if check.mean_abs_diff is None:
            self.misaligned += 1
        else:
            self.checks.append(check.mean_abs_diff)

    def selfcheck(self) -> float | None:
        return float(np.mean(self.checks)) if self.checks else None

    def add_on(self, h: float, s: float) -> None:
        if math.isfinite(h):
            self.on.entropy.append(h)
        if math.isfinite(s):
            self.on.surprise.append(s)

    def add_off(self, h: float, s: float) -> None:
        if math.isfinite(h):
            self.off.entropy.append(h)
        if math.isfinite(s):
            self.off.surprise.append(s)

    def add_pair(self, h_on: float, h_off: float) -> None:
        if not (math.isfinite(h_on) and math.isfinite(h_off)):
            return
        self.total_pairs += 1
        if len(self._base) < self.baseline_pairs:
            self._base.append((h_on, h_off))
        else:
            self._after += 1
        self.pairs.append((h_on, h_off))

    @staticmethod
    def _ratio(pairs: Sequence[tuple[float, float]]) -> float | None:
        if not pairs:
            return None
        arr = np.asarray(pairs, dtype=np.float64)
        return recognition_ratio(float(arr[:, 1].mean()), float(arr[:, 0].mean()))

    def ratio(self) -> float | None:
        return self._ratio(list(self.pairs)) if len(self.pairs) >= self.min_pairs else None

    def baseline(self) -> float | None:
        return self._ratio(self._base) if len(self._base) >= self.baseline_pairs else None

    def rise(self) -> float | None:
        base = self.baseline()
        n = min(self._after, len(self.pairs))
        if base is None or n < self.min_pairs or base <= 0:
            return None
        now = self._ratio(list(self.pairs)[-n:])
        return None if now is None else now / base

    def rise_interval(self, *, level: float = RISE_LEVEL, seed: int = 0) -> tuple[float, float] | None:
        """Bootstrap interval of :meth:`rise` (:func:`bootstrap_rise_interval`); None while the rise is."""
        if self.rise() is None:
            return None
        n = min(self._after, len(self.pairs))
        return bootstrap_rise_interval(self._base, list(self.pairs)[-n:], level=level, seed=seed)

    def interval(self) -> tuple[float, float] | None:
        if len(self.pairs) < self.min_pairs:
            return None
        arr = np.asarray(self.pairs, dtype=np.float64)
        return bootstrap_ratio_interval(arr[:, 0].tolist(), arr[:, 1].tolist(), n_boot=500)

    def summary(self) -> dict[str, Any]:
        def mean(xs: deque[float]) -> float | None:
            return round(float(np.mean(xs)), 4) if xs else None

        def rnd(x: float | None) -> float | None:
            return None if x is None else round(x, 4)

        ci, ri = self.interval(), self.rise_interval()
        return {
            "selfcheck_abs_diff": rnd(self.selfcheck()), "selfcheck_misaligned": self.misaligned,
            "ratio": rnd(self.ratio()), "ratio_interval_90": None if ci is None else [rnd(ci[0]), rnd(ci[1])],
            "baseline_ratio": rnd(self.baseline()), "rise": rnd(self.rise()),
            "rise_interval_95": None if ri is None else [rnd(ri[0]), rnd(ri[1])],
            "pairs": self.total_pairs, "window_pairs": len(self.pairs),
            "on_policy": {"mean_entropy": mean(self.on.entropy), "input_surprise": mean(self.on.surprise)},
            "off_policy": {"mean_entropy": mean(self.off.entropy), "input_surprise": mean(self.off.surprise)},
        }


# -- diagnosis -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Evidence:
    """What the monitors say about one model (None: not measured yet)."""

    collapse_score: float = 0.0  #: monitors.collapse score, 0..1
    entropy_fall: float | None = None  #: CUSUM level of the mean-entropy fall, 0..1
    forking_fall: float | None = None  #: CUSUM level of the forking-token entropy fall, 0..1
    diversity_fall: float | None = None  #: largest relative diversity fall, scaled 0..1
    psi: float | None = None
    js: float | None = None
    recognition_ratio: float | None = None  #: H_off / H_on over the probe window
    recognition_rise: float | None = None  #: that ratio after the probe baseline / the baseline ratio
    recognition_rise_interval: tuple[float, float] | None = None  #: its bootstrap interval (RISE_LEVEL)


@dataclass(frozen=True, slots=True)
class Diagnosis:
    state: str
    reasons: tuple[str, ...]


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def diagnose(ev: Evidence) -> Diagnosis:
    """The entropy state of a model, first rule that holds (thresholds are module constants).

    1. Entropy is not down (collapse score < ``COLLAPSE_LINE``): ``drift`` if PSI >= 0.25 or JS >= 0.1
       (the token-entropy distribution moved, either way), else ``healthy``.
    2. Entropy down and diversity fell (component >= ``DIVERSITY_FALL``): ``collapse``. Behaviour narrowed:
       fewer distinct trajectories and formats (Matsutani et al.; Zhao et al.) - recognition does not do that.
    3. Entropy down and the recognition ratio's rise has an interval (``RISE_LEVEL``): the interval above 1 ->
       ``recognition`` (the model sharpened on its own samples relative to foreign text, what post-training
       produces; diversity held, so not collapse); the interval holding 1 -> ``drift`` (entropy fell on foreign
       text as much as on the model's own, and both share the prompt: the traffic changed, not the model); the
       interval below 1 -> ``drift`` as well (the model grew *less* certain on its own text relative to foreign
       text: something changed, not a sharpening). A rise without an interval is not read.
    4. Entropy down, diversity measured and steady: ``recognition`` (RESEARCH section 7: entropy down with
       diversity steady; low entropy as information).
    5. Nothing tells them apart: ``collapse``, the reading that warrants a look.

    Every step is this project's proposal built on those papers (a guess), not a published classifier.
    """
    reasons = [f"collapse score {ev.collapse_score:.3g} (entropy fall {_f(ev.entropy_fall)}, "
               f"forking fall {_f(ev.forking_fall)})"]
    if ev.collapse_score < COLLAPSE_LINE:
        reasons[0] += f" < {COLLAPSE_LINE}: entropy not down"
        if (ev.psi or 0.0) >= PSI_LINE or (ev.js or 0.0) >= JS_LINE:
            reasons.append(f"distribution moved: PSI {_f(ev.psi)} (>= {PSI_LINE}) / JS {_f(ev.js)} (>= {JS_LINE})")
            return Diagnosis("drift", tuple(reasons))
        reasons.append(f"distribution steady: PSI {_f(ev.psi)}, JS {_f(ev.js)}")
        return Diagnosis("healthy", tuple(reasons))
    reasons[0] += f" >= {COLLAPSE_LINE}: entropy down"
    div = ev.diversity_fall
    if div is not None and div >= DIVERSITY_FALL:
        reasons.append(f"diversity fall {div:.3g} >= {DIVERSITY_FALL}: behaviour narrowed")
        return Diagnosis("collapse", tuple(reasons))
    ci = ev.recognition_rise_interval
    if ev.recognition_rise is not None and ci is not None:
        msg = (f"recognition ratio {_f(ev.recognition_ratio)}, x{ev.recognition_rise:.3g} of its baseline "
               f"({100 * RISE_LEVEL:.0f} % interval x{ci[0]:.3g} .. x{ci[1]:.3g})")
        if ci[0] > 1.0:
            reasons.append(msg + ": the interval lies above 1; the model sharpened on its own samples relative to "
                                 "foreign text (post-training or collapse; diversity held)")
            return Diagnosis("recognition", tuple(reasons))
        if ci[1] < 1.0:
            reasons.append(msg + ": the interval lies below 1; the model grew less certain on its own text "
                                 "relative to foreign text")
            return Diagnosis("drift", tuple(reasons))
        reasons.append(msg + ": the interval holds 1; entropy fell on foreign text as much as on the model's own, "
                             "and both share the prompt: the traffic changed, not the model")
        return Diagnosis("drift", tuple(reasons))
    if div is not None:
        reasons.append(f"diversity fall {div:.3g} < {DIVERSITY_FALL}: behaviour steady; no probe ratio yet")
        return Diagnosis("recognition", tuple(reasons))
    reasons.append("neither diversity nor a probe ratio measured yet: cannot rule out collapse")
    return Diagnosis("collapse", tuple(reasons))
