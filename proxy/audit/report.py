"""The audit report, shared by ``entropy-proxy audit report`` and ``GET /audit``.

Confident-but-wrong responses (flagged ``confident``, labelled incorrect) come first, then calibration of the
proxy's ``confidence`` against the labels (Brier, ECE over 10 equal-width bins, AUROC, saturation rate) and
the reliability diagram. The math lives in :mod:`monitors.calibration`; this module only queries and formats.

The recognition probe's stored results come with it: per model (count, pairs, the ratio of means
sum(H_off)/sum(H_on), the mean self-check difference), and for each listed response its own results. ``GET /audit``
also passes the live per-model state and its evidence from ``app.state.monitoring`` (``states``); the command
line reads only the store, which does not hold the state.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitors.calibration import Calibration, ReliabilityBin, calibration
from proxy.audit.store import AuditStore
from proxy.semantic.render import ranking_lines, score_ranking


@dataclass(slots=True)
class Filters:
    model: str | None = None
    flag: str | None = None
    label: str | None = None  # correct | incorrect | unlabelled
    limit: int = 50


@dataclass(slots=True)
class Report:
    filters: Filters
    confident_wrong: list[dict[str, Any]]
    responses: list[dict[str, Any]]  # the filtered list, most recent first, confident-wrong ones excluded
    calibration: Calibration
    models: list[str] = field(default_factory=list)
    total: int = 0
    probe_summary: list[dict[str, Any]] = field(default_factory=list)  # per model, over the stored probe results
    probe_recent: list[dict[str, Any]] = field(default_factory=list)  # the latest stored probe results
    states: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> monitoring status (state, diagnosis)
    # (score, AUROC for wrong answers, responses used), best first: confidence, mean entropy, semantic entropy
    scores: list[tuple[str, float | None, int]] = field(default_factory=list)
    canary: dict[str, list[Any]] = field(default_factory=dict)  # model -> latest canary rounds (proxy.canary)


async def build_report(
    store: AuditStore,
    filters: Filters | None = None,
    window: int | None = None,
    states: dict[str, dict[str, Any]] | None = None,
) -> Report:
    """Query the store once for everything the report shows; ``window`` bounds the labelled responses used.

    Each listed response gets ``probe``: its probe results, newest first (empty when it was not probed)."""
    f = filters or Filters()
    wrong: list[dict[str, Any]] = []
    if f.flag in (None, "", "confident") and f.label in (None, "", "incorrect"):
        wrong = await store.confident_wrong(model=f.model, limit=f.limit)
    seen = {(r["response_id"], r["choice_index"]) for r in wrong}
    listed = await store.recent(model=f.model, flag=f.flag, label=f.label, limit=f.limit + len(seen))
    rest = [r for r in listed if (r["response_id"], r["choice_index"]) not in seen][: f.limit]
    pairs = await store.labelled(model=f.model, limit=window)
    cal = calibration([q for q, _ in pairs], [1.0 if ok else 0.0 for _, ok in pairs])
    probed = await store.probe_results_for([r["response_id"] for r in wrong + rest])
    for r in wrong + rest:
        r["probe"] = probed.get(r["response_id"], [])
    if states is not None and f.model:
        states = {m: v for m, v in states.items() if m == f.model}
    return Report(
        f, wrong, rest, cal, models=await store.models(), total=await store.count(),
        probe_summary=await store.probe_summary(model=f.model),
        probe_recent=await store.recent_probe_results(model=f.model, limit=min(f.limit, 20)),
        states=dict(states or {}),
        scores=score_ranking(await store.labelled_scores(model=f.model, limit=window)),
        canary=await _canary_rounds(store),
    )


async def _canary_rounds(store: AuditStore) -> dict[str, list[Any]]:
    from proxy.canary.render import load_rounds  # imported here: proxy.canary imports the audit store

    return await load_rounds(store)


def fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def label_of(r: dict[str, Any]) -> str:
    c = r.get("correct")
    return "unlabelled" if c is None else ("correct" if c else "incorrect")


def one_line(r: dict[str, Any]) -> str:
    rid = r["response_id"] + (f"#{r['choice_index']}" if r["choice_index"] else "")
    return (
        f"{rid:<40} {when(r['created'])}  {r['model'][:28]:<28} {','.join(r['flags']) or '-':<24} "
        f"mean={fmt(r['mean_entropy'])} conf={fmt(r['confidence'])} {label_of(r)}"
    )


def probe_text(p: dict[str, Any]) -> str:
    """One probe result in words: the pair (if any) and the self-check."""
    parts = []
    if p.get("ratio") is not None:
        parts.append(
            f"ratio {fmt(p['ratio'])} (H_off {fmt(p['off_mean_entropy'])} / H_on {fmt(p['on_mean_entropy'])} nats,"
            f" {p.get('source') or 'off-policy'})"
        )
    else:
        parts.append(f"on-policy only, H_on {fmt(p.get('on_mean_entropy'))} nats")
    if p.get("selfcheck_abs_diff") is not None:
        parts.append(f"self-check {fmt(p['selfcheck_abs_diff'], 4)} nats")
    else:
        parts.append("self-check not aligned")
    return ", ".join(parts)


def probe_summary_lines(summary: list[dict[str, Any]]) -> list[str]:
    return [
        f"{s['model']}: {s['results']} results, {s['pairs']} pairs, ratio sum(H_off)/sum(H_on) {fmt(s['ratio'])}, "
        f"self-check {fmt(s['selfcheck_abs_diff'], 4)} nats over {s['aligned']} aligned"
        for s in summary
    ]


def calibration_lines(cal: Calibration) -> list[str]:
    lines = [
        f"labelled responses: {cal.n} ({cal.positives} correct, {cal.n - cal.positives} incorrect)",
        f"Brier score:        {fmt(cal.brier, 4)}",
        f"ECE (10 bins):      {fmt(cal.ece, 4)}",
        f"AUROC:              {fmt(cal.auroc, 4)}",
        f"saturation (>=0.99): {fmt(cal.saturation, 4)}",
    ]
    if cal.n and cal.auroc is None:
        lines.append("(AUROC needs both correct and incorrect labels)")
    return lines


def text_report(report: Report) -> str:
    out = [f"entropy-proxy audit report: {report.total} responses recorded", ""]
    out.append(f"Confident but wrong ({len(report.confident_wrong)}):")
    out += ["  " + one_line(r) for r in report.confident_wrong] or ["  none"]
    out += ["", "Calibration of confidence against feedback:"]
    out += ["  " + line for line in calibration_lines(report.calibration)]
    out += ["", "Scores ranked by AUROC for telling wrong answers from right ones:"]
    out += ["  " + line for line in ranking_lines(report.scores)]
    out += ["", "Reliability (bin: count, mean confidence, accuracy):"]
    for b in report.calibration.bins:
        if b.count:
            out.append(f"  [{b.lo:.1f}, {b.hi:.1f}): {b.count:>5}  conf={fmt(b.confidence)}  acc={fmt(b.accuracy)}")
    out += ["", "Recognition probe (stored results per model):"]
    out += ["  " + line for line in probe_summary_lines(report.probe_summary)] or ["  none"]
    if report.probe_recent:
        out.append("Latest probe results:")
        out += [f"  {p['response_id']:<40} {when(p['created'])}  {probe_text(p)}" for p in report.probe_recent]
    for model, st in report.states.items():
        out.append(f"state of {model}: {st.get('state')}")
        out += [f"  - {reason}" for reason in st.get("diagnosis") or []]
    return "\n".join(out) + "\n"


def write_reliability_png(bins: tuple[ReliabilityBin, ...], path: str | Path, title: str = "Reliability") -> Path:
    """Reliability diagram (accuracy per confidence bin against the diagonal); needs the ``report`` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError("the reliability PNG needs matplotlib: pip install 'entropy-proxy[report]'") from e
    path = Path(path)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    try:
        ax.plot([0, 1], [0, 1], linestyle="--", color="#888888", label="perfect calibration")
        filled = [b for b in bins if b.count]
        ax.bar(
            [b.lo for b in filled],
            [b.accuracy or 0.0 for b in filled],
            width=[b.hi - b.lo for b in filled],
            align="edge",
            edgecolor="#1f3b73",
            color="#4f7cc9",
            alpha=0.8,
            label="accuracy",
        )
        ax.scatter([b.confidence or 0.0 for b in filled], [b.accuracy or 0.0 for b in filled], color="#c0392b",
                   zorder=3, label="mean confidence")
        for b in filled:
            ax.annotate(str(b.count), ((b.lo + b.hi) / 2, (b.accuracy or 0) + 0.02), ha="center", fontsize=8)
        ax.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="confidence", ylabel="accuracy", title=title)
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
