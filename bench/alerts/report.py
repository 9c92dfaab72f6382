"""Per-scenario verdicts from alert episodes, and the docs/alerts.md table (written by the benchmark itself)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .scenarios import Scenario
from .tsdb import Episode

BEGIN, END = "<!-- bench.alerts:begin -->", "<!-- bench.alerts:end -->"


def verdict(sc: Scenario, episodes: list[Episode]) -> dict[str, Any]:
    """What fired, whether it should have, how fast, and whether it held while the fault lasted."""
    fault_start = None if sc.fault is None else sc.fault[0] * 60
    fault_end = None if sc.fault is None else sc.fault[1] * 60
    end_s = sc.minutes * 60
    fired = [e for e in episodes if e.firing is not None]
    raised = sorted({e.alert for e in fired})
    # A page is false when nothing was wrong yet: any page of a healthy scenario, any page before the fault.
    # Another alert than the expected one firing during a fault (drift while entropy collapses) is reported,
    # not counted as false: the traffic did change.
    false_pages = [e for e in fired if fault_start is None or (e.firing or 0) < fault_start]
    also = sorted({e.alert for e in fired if e not in false_pages and e.alert not in sc.expect})
    out: dict[str, Any] = {
        "scenario": sc.name, "title": sc.title, "simulated_h": sc.minutes / 60, "expected": list(sc.expect),
        "raised": raised, "false_pages": [_ep(e) for e in false_pages],
        "episodes": [_ep(e) for e in episodes],
    }
    missed = []
    for alert in sc.expect:
        mine = sorted((e for e in fired if e.alert == alert and fault_start is not None and e.firing is not None
                       and e.firing >= fault_start), key=lambda e: e.firing or 0)
        if not mine:
            missed.append(alert)
            continue
        first = mine[0]
        out.setdefault("fire_min", {})[alert] = round((first.firing - fault_start) / 60, 1)
        # Held: the share of [first firing, fault end] during which some instance of the alert was firing.
        assert fault_end is not None
        covered = _covered([(e.firing, e.resolved if e.resolved is not None else end_s) for e in mine],
                           first.firing, fault_end)
        out.setdefault("held", {})[alert] = round(covered / max(1.0, fault_end - first.firing), 3)
        after = [e.resolved for e in mine if e.resolved is not None and e.resolved >= fault_end]
        still = any(e.resolved is None for e in mine)
        if fault_end < end_s:
            out.setdefault("resolve_min", {})[alert] = (None if still or not after
                                                        else round((max(after) - fault_end) / 60, 1))
    out["missed"] = missed
    out["ok"] = not missed and not false_pages and all(v >= 0.99 for v in out.get("held", {}).values())
    out["also_raised"] = also
    return out


def _covered(spans: list[tuple[float, float]], lo: float, hi: float) -> float:
    total, cur = 0.0, lo
    for a, b in sorted(spans):
        a, b = max(a, cur), min(b, hi)
        if b > a:
            total += b - a
            cur = b
    return total


def _ep(e: Episode) -> dict[str, Any]:
    def m(x: float | None) -> float | None:
        return None if x is None else round(x / 60, 1)
    return {"alert": e.alert, "labels": e.labels, "active_min": m(e.active), "firing_min": m(e.firing),
            "resolved_min": m(e.resolved)}


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact binomial interval for k successes in n trials (bisection on the binomial tail)."""
    def cdf(x: int, p: float) -> float:
        return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(x + 1))

    def solve(f: Any) -> float:
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) else (lo, mid)
        return (lo + hi) / 2

    lower = 0.0 if k == 0 else solve(lambda p: 1 - cdf(k - 1, p) < alpha / 2)
    upper = 1.0 if k == n else solve(lambda p: cdf(k, p) > alpha / 2)
    return lower, upper


def _names(alerts: list[str]) -> str:
    return ", ".join(a.removeprefix("EntropyProxy") for a in alerts) or "none"


def table(results: list[dict[str, Any]], header: str) -> str:
    rows = ["| scenario | simulated | pages expected | pages raised | false pages | time to fire | "
            "held while on | time to resolve | verdict |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        fire = ", ".join(f"{v:g} min" for v in (r.get("fire_min") or {}).values()) or "-"
        held = ", ".join(f"{v:.0%}" for v in (r.get("held") or {}).values()) or "-"
        res = ", ".join("still firing" if v is None else f"{v:g} min" for v in (r.get("resolve_min") or {}).values())
        raised = _names(r["raised"])
        if r["also_raised"]:
            raised += f" (also, during or after the fault: {_names(r['also_raised'])})"
        rows.append(f"| {r['scenario']}: {r['title']} | {r['simulated_h']:g} h | {_names(r['expected'])} | "
                    f"{raised} | {len(r['false_pages'])} | {fire} | {held} | {res or '-'} | "
                    f"{'ok' if r['ok'] else 'FAIL'} |")
    healthy = [r for r in results if not r["expected"]]
    days = sum(r["simulated_h"] for r in healthy) / 24
    fp = sum(len(r["false_pages"]) for r in results)
    collapses = [r for r in results if r["expected"]]
    caught = sum(1 for r in collapses if not r["missed"])
    lines = [header, "", *rows, ""]
    if days:
        bound = -math.log(0.05) / days
        hp = sum(len(r["false_pages"]) for r in healthy)
        lines.append(f"False pages: {hp} in {days:.1f} simulated days of the healthy scenarios ({fp} in all scenarios, "
                     f"counting the healthy hours before each fault)"
                     + (f"; with none, the 95% upper bound on the false-page rate is {bound:.2f} a day (Poisson, "
                        "zero events)." if hp == 0 else "."))
    if collapses:
        lo, hi = clopper_pearson(caught, len(collapses))
        lines.append(f"Collapses paged: {caught} of {len(collapses)} scenarios (95% Clopper-Pearson interval "
                     f"{lo:.2f}-{hi:.2f}; a handful of scenarios bounds little).")
    return "\n".join(lines) + "\n"


def write_doc(path: Path, text: str) -> None:
    doc = path.read_text() if path.exists() else f"{BEGIN}\n{END}\n"
    if BEGIN not in doc:
        doc += f"\n{BEGIN}\n{END}\n"
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")
