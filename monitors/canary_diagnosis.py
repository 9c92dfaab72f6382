r"""Canary rounds against a baseline: one interval per measure, a verdict only where an interval excludes no change.

**Pairing by prompt.** The canary's prompts are fixed, so each prompt is its own control: for prompt ``p`` the
current value (mean over the current rounds) is compared with its baseline value (mean over the baseline rounds),
and the uncertainty comes from resampling *prompts* (a bootstrap over the P prompts both sides share). Sampling
noise of the current round, of the baseline and the prompts' different reactions to a change all show up in the
spread of the per-prompt differences, so the interval carries all three. Measures pooled over the prompts of a
round (``format_entropy``, ``ratio``) are computed per round and then averaged over rounds on both sides, so one
round is compared with one round's worth of samples (a plug-in entropy of 250 samples is not comparable with one
of 50: it is biased less).

**The interval.** For each measure the statistic ``current - baseline`` (``ratio``: ``log(current / baseline)``,
reported as the factor ``current / baseline``) is recomputed on ``n_boot`` resamples of the prompts; its bootstrap
standard error, scaled by ``sqrt(P / (P - 1))`` (the plug-in variance's small-sample bias), gives the interval
``estimate +- t_{P-1} * se`` (a bootstrap-t-style interval with Student quantiles: percentile intervals cannot
resolve the far tails that the correction below needs with a dozen prompts, and are too narrow at P ~ 10).

**Family-wise error.** Up to nine measures are tested each round. Each interval is built at level ``1 - alpha/m``
(Bonferroni, ``m`` = the measures tested), so when nothing changed the probability that *any* interval excludes
no change - and so that any state other than ``healthy`` is claimed - is at most ``alpha`` per round (5 %), not the
1 - 0.95^9 = 37 % of nine unadjusted 95 % intervals. ``collapse`` further requires two families to agree (a
diversity measure down *and* entropy down or the ratio up), which only lowers its false rate.

**The verdict** (:func:`diagnose_canary`), first rule that holds:

1. fewer baseline rounds than ``min_baseline``: ``unknown``;
2. a diversity measure (distinct-2, chrF distance, format entropy) fell and entropy fell (mean or forking) or the
   ratio H_off / H_on rose: ``collapse`` - behaviour narrowed while the model grew certain;
3. the ratio rose: ``recognition`` - the model sharpened on its own samples relative to foreign text (what
   post-training produces), diversity steady;
4. any other interval excludes no change: ``drift``;
5. none does: ``healthy``.

Every rule is this project's proposal built on RESEARCH sections 2-5 and 7, not a published classifier.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .canary import SCALAR_MEASURES, PromptRound, pass_at_k, pass_k_for
from .formats import FORMATS

__all__ = ["Change", "CanaryVerdict", "compare", "diagnose_canary", "t_quantile"]

F64 = NDArray[np.float64]
ALPHA = 0.05
MIN_PROMPTS = 4  # fewer shared prompts than this: the measure is not tested
MIN_BASELINE = 5  # baseline rounds before any verdict but unknown
ENTROPY_SIDE = ("mean_entropy", "forking_entropy")
DIVERSITY_SIDE = ("distinct_2", "chrf_distance", "format_entropy")
UNITS = {"mean_entropy": " nats", "forking_entropy": " nats"}


# -- Student t quantile (no scipy at run time) -----------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_cdf`; |error| < 1e-9)."""
    if not 0.0 < p < 1.0:
        raise ValueError("p must be in (0, 1)")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-10:
            break
    return (lo + hi) / 2.0


# -- arranging rounds ------------------------------------------------------------------------------------------------
def _value(p: PromptRound, measure: str, k: int | None) -> float:
    if measure in SCALAR_MEASURES:
        v = getattr(p, measure)
    elif measure in ("pass_1", "pass_k") and p.correct is not None and p.n > 0:
        kk = 1 if measure == "pass_1" else min(p.n, k or pass_k_for(p.n))
        v = pass_at_k(p.n, p.correct, kk)
    elif measure == "h_off":
        v = p.h_off
    elif measure == "h_on":
        v = p.mean_entropy if p.h_off is not None else None
    else:
        v = None
    return float(v) if v is not None and math.isfinite(v) else math.nan


def _matrix(rounds: Sequence[Sequence[PromptRound]], ids: list[str], measure: str, k: int | None) -> F64:
    out = np.full((len(rounds), len(ids)), np.nan)
    col = {pid: j for j, pid in enumerate(ids)}
    for i, rnd in enumerate(rounds):
        for p in rnd:
            if p.prompt_id in col:
                out[i, col[p.prompt_id]] = _value(p, measure, k)
    return out


def _formats(rounds: Sequence[Sequence[PromptRound]], ids: list[str]) -> F64:
    labels = {f: i for i, f in enumerate(FORMATS)}
    out = np.zeros((len(rounds), len(ids), len(FORMATS)))
    col = {pid: j for j, pid in enumerate(ids)}
    for i, rnd in enumerate(rounds):
        for p in rnd:
            if p.prompt_id in col:
                for f, c in p.formats.items():
                    out[i, col[p.prompt_id], labels.get(f, labels["prose"])] += c
    return out


def _entropy_rows(counts: F64) -> F64:
    """Shannon entropy (nats) along the last axis of a count array."""
    n = counts.sum(axis=-1, keepdims=True)
    p = np.divide(counts, n, out=np.zeros_like(counts), where=n > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    out: F64 = terms.sum(axis=-1)
    return out


# -- the comparison --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Change:
    """One measure, now against the baseline, with its (Bonferroni-adjusted) interval."""

    measure: str
    current: float
    baseline: float
    change: float  # current - baseline; for "ratio" the factor current / baseline
    lower: float
    upper: float
    null: float  # the value meaning no change: 0, or 1 for the ratio's factor
    level: float  # the interval's coverage (1 - alpha / m)
    prompts: int

    @property
    def significant(self) -> bool:
        return self.lower > self.null or self.upper < self.null

    @property
    def direction(self) -> str | None:
        if not self.significant:
            return None
        return "up" if self.lower > self.null else "down"

    def describe(self) -> str:
        unit = UNITS.get(self.measure, "")
        how = f"x{self.change:.3g}" if self.measure == "ratio" else f"{self.change:+.3g}{unit}"
        lo, hi = (f"x{self.lower:.3g}", f"x{self.upper:.3g}") if self.measure == "ratio" else (
            f"{self.lower:+.3g}", f"{self.upper:+.3g}")
        verdict = (f"{self.direction}: the interval excludes no change" if self.significant
                   else "the interval holds no change")
        return (f"{self.measure} {how} ({100 * self.level:.2f} % interval {lo} .. {hi}, {self.prompts} prompts; "
                f"baseline {self.baseline:.4g}, now {self.current:.4g}): {verdict}")

    def to_dict(self) -> dict[str, Any]:
        return {"measure": self.measure, "current": _r(self.current), "baseline": _r(self.baseline),
                "change": _r(self.change), "interval": [_r(self.lower), _r(self.upper)], "level": round(self.level, 5),
                "prompts": self.prompts, "significant": self.significant, "direction": self.direction}


def _r(x: float) -> float | None:
    return round(x, 5) if math.isfinite(x) else None


def compare(
    current: Sequence[Sequence[PromptRound]], baseline: Sequence[Sequence[PromptRound]], *, alpha: float = ALPHA,
    n_boot: int = 2_000, seed: int = 0, k: int | None = None, min_prompts: int = MIN_PROMPTS,
) -> list[Change]:
    """Every measure that ``min_prompts`` shared prompts can test, current rounds against baseline rounds.

    Intervals are at level ``1 - alpha / m`` with ``m`` the number of measures tested (see the module docstring).
    """
    if not current or not baseline:
        return []
    cur_ids = {p.prompt_id for r in current for p in r}
    ids = sorted(cur_ids & {p.prompt_id for r in baseline for p in r})
    if len(ids) < min_prompts:
        return []
    rng = np.random.default_rng(seed)
    # Each test: (measure, prompt columns used, estimate function over a (B, P') index array -> (B,) values,
    # and whether it is on the log scale).
    tests: list[tuple[str, NDArray[np.int64], Any, bool]] = []
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of a prompt no round measured: NaN, dropped below
        for m in (*SCALAR_MEASURES, "pass_1", "pass_k"):
            c = np.nanmean(_matrix(current, ids, m, k), axis=0)
            b = np.nanmean(_matrix(baseline, ids, m, k), axis=0)
            cols = np.flatnonzero(np.isfinite(c) & np.isfinite(b))
            if cols.size >= min_prompts:
                cc, bb = c[cols], b[cols]
                tests.append((m, cols, lambda idx, cc=cc, bb=bb: (cc[idx].mean(-1), bb[idx].mean(-1)), False))
        fc, fb = _formats(current, ids), _formats(baseline, ids)
        cols = np.flatnonzero((fc.sum(axis=(0, 2)) > 0) & (fb.sum(axis=(0, 2)) > 0))
        if cols.size >= min_prompts:
            fcc, fbb = fc[:, cols], fb[:, cols]

            def fmt(idx: NDArray[np.int64], fcc: F64 = fcc, fbb: F64 = fbb) -> tuple[F64, F64]:
                return (_entropy_rows(fcc[:, idx].sum(axis=-2)).mean(0),
                        _entropy_rows(fbb[:, idx].sum(axis=-2)).mean(0))

            tests.append(("format_entropy", cols, fmt, False))
        sides = [(_matrix(r, ids, "h_off", k), _matrix(r, ids, "h_on", k)) for r in (current, baseline)]
        usable = [np.isfinite(off) & np.isfinite(on) for off, on in sides]
        cols = np.flatnonzero(usable[0].any(axis=0) & usable[1].any(axis=0))
        if cols.size >= min_prompts:
            (co, cn), (bo, bn) = [(np.where(u, off, 0.0)[:, cols], np.where(u, on, 0.0)[:, cols])
                                  for (off, on), u in zip(sides, usable, strict=True)]

            def ratio(
                idx: NDArray[np.int64], co: F64 = co, cn: F64 = cn, bo: F64 = bo, bn: F64 = bn
            ) -> tuple[F64, F64]:
                def per_round(off: F64, on: F64) -> F64:
                    num, den = off[:, idx].sum(-1), on[:, idx].sum(-1)
                    r: F64 = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
                    out: F64 = np.log(np.nanmean(r, axis=0))
                    return out

                return per_round(co, cn), per_round(bo, bn)

            tests.append(("ratio", cols, ratio, True))
    m_tests = len(tests)
    out: list[Change] = []
    for name, cols, fn, log_scale in tests:
        p = int(cols.size)
        full = np.arange(p)[None, :]
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            cur_v, base_v = (float(x[0]) for x in fn(full))
            boots = rng.integers(0, p, size=(n_boot, p))
            bc, bb = fn(boots)
            reps = bc - bb
        reps = reps[np.isfinite(reps)]
        est = cur_v - base_v
        if not math.isfinite(est) or reps.size < 2:
            continue
        se = float(np.std(reps, ddof=1)) * math.sqrt(p / (p - 1))
        level = 1.0 - alpha / m_tests
        half = t_quantile(1.0 - (1.0 - level) / 2.0, p - 1) * se
        lo, hi = est - half, est + half
        if log_scale:
            out.append(Change(name, math.exp(cur_v), math.exp(base_v), math.exp(est), math.exp(lo), math.exp(hi),
                              1.0, level, p))
        else:
            out.append(Change(name, cur_v, base_v, est, lo, hi, 0.0, level, p))
    return out


# -- the verdict -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CanaryVerdict:
    state: str  # unknown | healthy | recognition | collapse | drift
    reasons: tuple[str, ...]
    changes: tuple[Change, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "reasons": list(self.reasons), "changes": [c.to_dict() for c in self.changes]}


def diagnose_canary(
    changes: Sequence[Change], *, baseline_rounds: int, min_baseline: int = MIN_BASELINE
) -> CanaryVerdict:
    """The canary's state from the compared measures (rules in the module docstring); reasons name the intervals."""
    ch = tuple(changes)
    if baseline_rounds < min_baseline:
        return CanaryVerdict("unknown", (f"baseline has {baseline_rounds} of {min_baseline} rounds",), ch)
    if not ch:
        return CanaryVerdict("unknown", ("no measure shared by enough prompts to compare",), ch)
    sig = {c.measure: c for c in ch if c.significant}
    m = len(ch)
    family = f"Bonferroni over {m} measures: each interval at {100 * (1 - ALPHA / m):.2f} %"
    div_down = [sig[n] for n in DIVERSITY_SIDE if n in sig and sig[n].direction == "down"]
    ent_down = [sig[n] for n in ENTROPY_SIDE if n in sig and sig[n].direction == "down"]
    ratio_up = [sig["ratio"]] if "ratio" in sig and sig["ratio"].direction == "up" else []
    if div_down and (ent_down or ratio_up):
        reasons = ["behaviour narrowed: " + "; ".join(c.describe() for c in div_down),
                   "and the model grew certain: " + "; ".join(c.describe() for c in ent_down + ratio_up)]
        return CanaryVerdict("collapse", (*reasons, family), ch)
    if ratio_up:
        return CanaryVerdict("recognition", (
            "the model sharpened on its own samples relative to foreign text: " + ratio_up[0].describe(),
            "diversity did not fall", family), ch)
    if sig:
        return CanaryVerdict("drift", ("measures moved: " + "; ".join(c.describe() for c in sig.values()), family),
                             ch)
    return CanaryVerdict("healthy", (f"no interval of {m} measures excludes no change", family), ch)
