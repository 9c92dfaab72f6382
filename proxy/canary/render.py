"""The canary panel of ``GET /audit``: per model, the latest stored rounds with their verdict and the intervals.

Reads the store (``canary_rounds``), so it shows the same in every worker and after a restart.
"""

from __future__ import annotations

import time
from html import escape
from typing import Any

SHOWN = ("mean_entropy", "forking_entropy", "distinct_2", "chrf_distance", "format_entropy", "pass_1", "pass_k",
         "ratio")
ROUNDS = 8


async def load_rounds(store: Any, limit: int = ROUNDS) -> dict[str, list[Any]]:
    """The latest ``limit`` rounds per model from the audit store (empty if the table has none)."""
    from .store import DatabaseRounds

    rounds = DatabaseRounds(store)
    return {m: await rounds.latest(m, limit) for m in sorted(await rounds.models())}


def _f(x: Any, nd: int = 3) -> str:
    return "–" if not isinstance(x, (int, float)) else f"{x:.{nd}f}"


def _change(ch: dict[str, Any]) -> str:
    lo, hi = ch.get("interval") or (None, None)
    if ch.get("change") is None or lo is None or hi is None:
        return ""
    ratio = ch.get("measure") == "ratio"
    body = (f"x{ch['change']:.2f} [{lo:.2f}, {hi:.2f}]" if ratio
            else f"{ch['change']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    return f"<b>{escape(body)}</b>" if ch.get("significant") else escape(body)


def canary_html(by_model: dict[str, list[Any]]) -> str:
    if not by_model:
        return ('<p class="muted">No canary rounds stored: enable <code>canary.enabled</code> '
                "(docs/recognition.md, \"Canary\").</p>")
    parts = []
    for model, rounds in by_model.items():
        if not rounds:
            continue
        last = rounds[0]
        verdict = last.verdict or {}
        state = str(verdict.get("state") or "unknown")
        reasons = "".join(f"<li>{escape(str(r))}</li>" for r in verdict.get("reasons") or [])
        changes = {c.get("measure"): c for c in verdict.get("changes") or []}
        head = "".join(f"<th>{m}</th>" for m in SHOWN)
        rows = "".join(
            f'<tr data-pk="{r.pk}"><td>{time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.created))}</td>'
            f"<td>{escape(r.revision)}</td><td>{escape(str((r.verdict or {}).get('state', 'unknown')))}</td>"
            f"<td>{r.tokens}</td>" + "".join(f"<td>{_f(r.measures.get(m))}</td>" for m in SHOWN) + "</tr>"
            for r in rounds
        )
        change_row = ("<tr><td colspan=\"4\">last round vs baseline (interval)</td>"
                      + "".join(f"<td>{_change(changes[m]) if m in changes else ''}</td>" for m in SHOWN) + "</tr>")
        parts.append(
            f'<div class="canary-model" data-model="{escape(model)}" data-state="{escape(state)}">'
            f'<b>{escape(model)}</b> <span class="state state-{escape(state)}">{escape(state)}</span>'
            f' <span class="muted">· revision {escape(last.revision)} · T={last.temperature:g}, n={last.samples}'
            f", {len(last.prompts)} prompts</span><ul>{reasons}</ul>"
            f'<table class="cal canary"><tr><th>round (UTC)</th><th>revision</th><th>state</th><th>tokens</th>{head}'
            f"</tr>{rows}{change_row}</table></div>"
        )
    return "".join(parts)
