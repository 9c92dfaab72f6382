"""Accuracy and speed of the truncated-logprob entropy estimator against exact full-vocabulary entropy.

Run from the repository root::

    .venv/bin/python -m bench.estimator_accuracy [--fixtures DIR] [--seconds S]

The fixtures (``tests/fixtures/exact/*.json``, ``{request, response, exact}``) hold real vLLM chat responses
with ``top_logprobs`` K and, per generated position, the exact entropy from the same weights. Each position is
evaluated at its native K and, for K=20 responses, also truncated to K=5 exactly as vLLM would have sent it
(the sampled token first, then the other entries in rank order, K entries in all). Printed per K: positions,
median and p90 absolute error (nats) of the point estimate, the naive renormalised top-K entropy, the lower and
upper bounds, the share of positions whose exact value lies within the bounds, and the estimator's throughput:
whole responses per call, and one position per call (a streamed token: vLLM sends one per chunk), the latter
both through ``estimate_positions`` (its scalar path for a few rows) and forced through the vectorised path that
served every call before the scalar one existed.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from monitors import entropy as _entropy
from monitors.entropy import ESTIMATOR_NAME, estimate_positions, renormalised_entropy

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "exact"
KS = (5, 20)


@dataclass(frozen=True)
class Case:
    """The positions of one response at one K, as the proxy would see them."""

    name: str
    k: int
    logprobs: np.ndarray  # (T, K) in the response's column order
    sampled_col: np.ndarray  # (T,)
    exact: np.ndarray  # (T,) nats
    vocab_size: int


def _rows(content: list[dict[str, Any]], k: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Logprob rows and sampled columns; ``k`` truncates to the sampled token + the best k-1 others."""
    rows: list[list[float]] = []
    cols: list[int] = []
    for pos in content:
        top = pos["top_logprobs"]
        col = next(i for i, e in enumerate(top) if e["token"] == pos["token"])
        lps = [float(e["logprob"]) for e in top]
        if k is not None:
            rest = sorted((lp for i, lp in enumerate(lps) if i != col), reverse=True)
            lps, col = [lps[col], *rest[: k - 1]], 0
        rows.append(lps)
        cols.append(col)
    width = max(len(r) for r in rows)
    arr = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        arr[i, : len(r)] = r
    return arr, np.asarray(cols, dtype=np.int64)


def load_cases(fixtures: Path = FIXTURES) -> dict[int, list[Case]]:
    """All fixture responses grouped by K (native K, plus K=5 truncations of larger-K responses)."""
    out: dict[int, list[Case]] = {k: [] for k in KS}
    for path in sorted(fixtures.glob("*.json")):
        data = json.loads(path.read_text())
        k_native = int(data["request"]["top_logprobs"])
        exact = np.asarray(data["exact"]["exact_entropy_nats"], dtype=np.float64)
        vocab = int(data["exact"]["vocab_size"])
        content = data["response"]["choices"][0]["logprobs"]["content"]
        for k in KS:
            if k > k_native:
                continue
            lp, col = _rows(content, None if k == k_native else k)
            out[k].append(Case(path.stem, k, lp, col, exact, vocab))
    return out


def evaluate(cases: list[Case]) -> dict[str, np.ndarray]:
    """Signed errors (estimate - exact, nats) of point, renormalised, lower and upper; and the coverage mask."""
    parts: dict[str, list[np.ndarray]] = {"point": [], "renormalised": [], "lower": [], "upper": [], "covered": []}
    for c in cases:
        est = estimate_positions(c.logprobs, c.vocab_size, sampled_col=c.sampled_col)
        parts["point"].append(est.point - c.exact)
        parts["renormalised"].append(renormalised_entropy(c.logprobs) - c.exact)
        parts["lower"].append(est.lower - c.exact)
        parts["upper"].append(est.upper - c.exact)
        parts["covered"].append((est.lower <= c.exact) & (c.exact <= est.upper))
    return {k: np.concatenate(v) for k, v in parts.items()}


def throughput(cases: list[Case], seconds: float) -> tuple[float, float, float]:
    """Positions/s: one whole response per call; one position per call; one position per call, vectorised."""
    def rate(calls: list[tuple[np.ndarray, np.ndarray, int]], vectorised: bool = False) -> float:
        n_pos, t0, done = 0, time.perf_counter(), 0.0
        while done < seconds:
            for lp, col, v in calls:
                if vectorised:
                    _entropy._estimate_vectorised(lp, v, col, None)
                else:
                    estimate_positions(lp, v, sampled_col=col)
                n_pos += lp.shape[0]
            done = time.perf_counter() - t0
        return n_pos / done

    whole = [(c.logprobs, c.sampled_col, c.vocab_size) for c in cases]
    single = [(c.logprobs[i : i + 1], c.sampled_col[i : i + 1], c.vocab_size)
              for c in cases for i in range(c.logprobs.shape[0])]
    return rate(whole), rate(single), rate(single, vectorised=True)


def _fmt(err: np.ndarray) -> str:
    a = np.abs(err)
    return f"{np.median(a):.3f} / {np.quantile(a, 0.9):.3f}"


def report(fixtures: Path = FIXTURES, seconds: float = 1.0) -> str:
    cases = load_cases(fixtures)
    lines = [
        f"estimator {ESTIMATOR_NAME}; |error| in nats vs exact full-vocabulary entropy, median / p90",
        "",
        "| K | positions | point | renormalised | lower bound | upper bound | bounds cover | positions/s "
        "(response / single) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    single_lines = []
    for k in KS:
        if not cases[k]:
            continue
        ev = evaluate(cases[k])
        whole, single, single_vec = throughput(cases[k], seconds)
        lines.append(
            f"| {k} | {ev['point'].size} | {_fmt(ev['point'])} | {_fmt(ev['renormalised'])} | "
            f"{_fmt(ev['lower'])} | {_fmt(ev['upper'])} | {100.0 * ev['covered'].mean():.1f}% | "
            f"{whole:,.0f} / {single:,.0f} |"
        )
        single_lines.append(
            f"K={k} {1e6 / single:.1f} us/call ({single:,.0f}/s), vectorised path {1e6 / single_vec:.1f} us/call "
            f"({single_vec:,.0f}/s)"
        )
    names = sorted({f"{c.name} (K={c.k})" for cs in cases.values() for c in cs})
    lines += ["", "one position per call (streaming): " + "; ".join(single_lines)]
    lines += ["", "fixtures: " + ", ".join(names), "point bias (median signed error): " + ", ".join(
        f"K={k} {np.median(evaluate(cases[k])['point']):+.3f}" for k in KS if cases[k])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--fixtures", type=Path, default=FIXTURES, help="directory of {request,response,exact} JSON")
    ap.add_argument("--seconds", type=float, default=1.0, help="time spent per throughput measurement")
    args = ap.parse_args(argv)
    print(report(args.fixtures, args.seconds))


if __name__ == "__main__":
    main()
