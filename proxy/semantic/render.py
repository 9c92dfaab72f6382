"""How semantic entropy shows on ``GET /audit`` and in ``entropy-proxy audit report`` (no torch here)."""

from __future__ import annotations

from html import escape
from typing import Any

from monitors.semantic import rank_scores

SCORES = (("1 - confidence", "confidence"), ("mean token entropy", "mean_entropy"),
          ("semantic entropy", "semantic_entropy"))


def score_ranking(rows: list[dict[str, Any]]) -> list[tuple[str, float | None, int]]:
    """The scores the proxy records, ranked by AUROC for telling wrong (labelled incorrect) from right."""
    def value(name: str, r: dict[str, Any]) -> float | None:
        v = r.get(name)
        if v is None:
            return None
        return 1.0 - float(v) if name == "confidence" else float(v)

    return rank_scores({label: [value(col, r) for r in rows] for label, col in SCORES},
                       [bool(r["correct"]) for r in rows])


def ranking_lines(ranking: list[tuple[str, float | None, int]]) -> list[str]:
    return [f"{name:<20} AUROC {'n/a' if a is None else f'{a:.4f}'} over {n} labelled" for name, a, n in ranking]


def ranking_html(ranking: list[tuple[str, float | None, int]]) -> str:
    rows = "".join(
        f'<tr data-score="{escape(name)}"><td>{escape(name)}</td><td><b>{"n/a" if a is None else f"{a:.4f}"}</b></td>'
        f"<td>{n}</td></tr>" for name, a, n in ranking
    )
    return ('<table class="cal scores"><tr><th>score (higher: more likely wrong)</th><th>AUROC</th>'
            f"<th>labelled</th></tr>{rows}</table>")


def semantic_html(r: dict[str, Any]) -> str:
    """The shadow samples grouped by meaning, for one recorded response (empty when it was not sampled)."""
    se = r.get("semantic_entropy")
    if se is None:
        return ""
    clusters = r.get("semantic_clusters") or []
    items = []
    for c in clusters:
        answers = c.get("answers")
        if answers is None:
            shown = '<span class="muted">(text not stored)</span>'
        elif not answers:
            shown = '<span class="muted">no sample means this</span>'
        else:
            shown = " | ".join(escape(a) for a in answers)
        mark = " ← the client's answer" if c.get("original") else ""
        items.append(f'<li class="cluster" data-size="{int(c.get("size", 0))}">'
                     f'{int(c.get("size", 0))} sample(s), p={float(c.get("probability", 0.0)):.3f}{mark}: {shown}</li>')
    disc = r.get("semantic_entropy_discrete")
    return (f'<div class="semantic" data-semantic-entropy="{float(se):.4f}">semantic entropy {float(se):.3f} nats'
            f' (discrete {"n/a" if disc is None else f"{float(disc):.3f}"}) over {r.get("semantic_samples")} samples,'
            f' {len(clusters)} meaning(s)<ul>{"".join(items)}</ul></div>')
