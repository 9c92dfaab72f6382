"""Draw the dashboard's main panels with matplotlib from a real Prometheus: a picture of what a user sees.

The panels come from the generated Grafana JSON (``dashboards/entropy-proxy.json``), so the picture runs the
same PromQL as Grafana, through ``/api/v1/query_range``, with the variables filled in as Grafana fills them:
``$__rate_interval`` = max(step + scrape interval, 4 x scrape interval), ``$model`` = the "All" value ``.*``
(or one model), ``$datasource`` = the Prometheus asked. Heatmap panels de-accumulate the ``le`` buckets as
Grafana's heatmap format does; time series keep the panel's legend format, unit, min and max.

    python -m dashboards.render --prometheus http://127.0.0.1:9090 --since 1h --out dashboard.png

The committed ``docs/dashboard.png`` is rendered by ``tests/test_prometheus_e2e.py`` from the Prometheus that
the test runs (it writes ``test-artifacts/dashboard.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "dashboards" / "entropy-proxy.json"
# What the issue calls the main panels, in reading order: the heatmap across the top, then a grid.
MAIN_PANELS = (
    "Token entropy distribution",
    "Mean and forking-token entropy",
    "Collapse score and diagnosed state",
    "Drift against the baseline",
    "Response diversity",
    "Format mix and planning grams",
    "Flagged responses",
    "Confident-wrong rate",
    "Proxy overhead",
    "Upstream errors",
)
# (expr, start, end, step) -> the "result" of a range query: [{"metric": {...}, "values": [[t, "v"], ...]}]
QueryRange = Callable[[str, float, float, float], list[dict[str, Any]]]
_VARIABLE = re.compile(r"\$\{?(\w+)\}?")
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_UNITS = {"nats": "nats", "s": "seconds", "reqps": "requests/s", "cps": "per second", "percentunit": "share"}


def prometheus_query_range(url: str, *, timeout: float = 30.0,
                           transport: httpx.BaseTransport | None = None) -> QueryRange:
    """A :data:`QueryRange` over a Prometheus HTTP API at ``url``; raises on an error answer."""

    def query_range(expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        with httpx.Client(base_url=url, timeout=timeout, transport=transport) as client:
            params = {"query": expr, "start": start, "end": end, "step": step}
            r = client.get("/api/v1/query_range", params=params)
        body = r.json()
        if r.status_code != 200 or body.get("status") != "success":
            raise RuntimeError(f"query_range {expr!r}: {r.status_code} {body.get('error', body)}")
        return list(body["data"]["result"])

    return query_range


def rate_interval(step: float, scrape_interval: float) -> str:
    """Grafana's ``$__rate_interval``: max($__interval + scrape interval, 4 x scrape interval), in seconds."""
    return f"{math.ceil(max(step + scrape_interval, 4 * scrape_interval))}s"


def substitute(expr: str, *, rate_interval: str, model: str = ".*", interval: str = "1s") -> str:
    """``expr`` with the dashboard's variables filled in; an unknown variable raises, not a broken query."""
    values = {"__rate_interval": rate_interval, "__interval": interval, "model": model, "datasource": ""}

    def fill(m: re.Match[str]) -> str:
        if m.group(1) not in values:
            raise ValueError(f"unknown dashboard variable ${m.group(1)} in {expr!r}")
        return values[m.group(1)]

    return _VARIABLE.sub(fill, expr)


def legend(fmt: str, metric: dict[str, str]) -> str:
    """Grafana's ``legendFormat``: ``{{label}}`` replaced by the series' label value."""
    if not fmt:
        return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items())) + "}"
    return _LEGEND.sub(lambda m: metric.get(m.group(1), ""), fmt).strip()


def main_panels(dashboard: dict[str, Any], titles: Sequence[str] = MAIN_PANELS) -> list[dict[str, Any]]:
    """The panels of a dashboard JSON named ``titles``, in that order; a missing title raises KeyError."""
    by_title = {p["title"]: p for p in dashboard["panels"] if p.get("type") != "row"}
    missing = [t for t in titles if t not in by_title]
    if missing:
        raise KeyError(f"dashboard has no panel titled {missing}")
    return [by_title[t] for t in titles]


def bucket_shares(series: list[dict[str, Any]]) -> tuple[list[float], list[str], list[list[float]]]:
    """De-accumulate cumulative ``le`` bucket rates into each bucket's share of the total, per timestamp.

    Returns the timestamps, the bucket upper bounds (sorted, ``+Inf`` last) and ``shares[bucket][time]``; a
    timestamp with no observations has every share NaN (drawn blank, as Grafana leaves an empty column).
    """
    by_le = {s["metric"]["le"]: {float(t): float(v) for t, v in s["values"]} for s in series}
    les = sorted(by_le, key=float)
    times = sorted({t for values in by_le.values() for t in values})
    shares: list[list[float]] = [[] for _ in les]
    for t in times:
        cumulative = [by_le[le].get(t, math.nan) for le in les]
        total = cumulative[-1]
        below = 0.0
        for i, c in enumerate(cumulative):
            ok = math.isfinite(c) and math.isfinite(total) and total > 0
            shares[i].append(max(0.0, c - below) / total if ok else math.nan)
            if math.isfinite(c):
                below = max(below, c)  # a bucket scraped a moment later may read a hair lower
    return times, les, shares


def _dates(times: Sequence[float]) -> list[float]:
    from matplotlib import dates as mdates

    return [float(mdates.date2num(datetime.fromtimestamp(t, tz=UTC))) for t in times]


def _draw_heatmap(ax: Any, panel: dict[str, Any], result: list[dict[str, Any]], step: float, fig: Any) -> int:
    from matplotlib.colors import PowerNorm

    times, les, shares = bucket_shares(result)
    if not times:
        return 0
    edges = _dates([times[0] - step / 2] + [t + step / 2 for t in times])
    # The panel's own colour scheme and exponent (Grafana's default exponential scale), so faint buckets show.
    color = panel.get("options", {}).get("color", {})
    mesh = ax.pcolormesh(edges, range(len(les) + 1), shares, cmap=color.get("scheme", "Oranges"),
                         norm=PowerNorm(gamma=color.get("exponent", 0.5), vmin=0, vmax=1), shading="flat")
    labels = [f"≤ {le}" if le != "+Inf" else f"> {les[-2]}" if len(les) > 1 else "all" for le in les]
    ax.set_yticks([i + 0.5 for i in range(len(les))], labels, fontsize=7)
    ax.set_ylabel("token entropy bucket (nats)")
    fig.colorbar(mesh, ax=ax, pad=0.01, label="share of tokens")
    return len(les)


def _overrides(panel: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Field overrides by query (Grafana's ``byFrameRefID`` matcher): refId -> {property id: value}."""
    out: dict[str, dict[str, Any]] = {}
    for o in panel.get("fieldConfig", {}).get("overrides", []):
        if o.get("matcher", {}).get("id") == "byFrameRefID":
            out[o["matcher"]["options"]] = {p["id"]: p.get("value") for p in o.get("properties", [])}
    return out


def _format_axis(ax: Any, unit: str, lo: float | None, hi: float | None) -> None:
    from matplotlib import ticker

    if unit == "percentunit":
        ax.yaxis.set_major_formatter(ticker.PercentFormatter(1.0, decimals=0))
    elif unit == "s":
        ax.yaxis.set_major_formatter(ticker.EngFormatter(unit="s"))
    elif unit in _UNITS:
        ax.set_ylabel(_UNITS[unit], fontsize=8)
    if lo is not None:
        ax.set_ylim(bottom=lo)
    if hi is not None:
        ax.set_ylim(top=hi * 1.04)  # a line at the maximum stays visible above the frame


def _draw_timeseries(ax: Any, panel: dict[str, Any], results: list[tuple[dict[str, Any], list[Any]]]) -> int:
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    overrides = _overrides(panel)
    right: Any = None
    right_props: dict[str, Any] = {}
    lines: list[Any] = []
    for i, (target, result) in enumerate(results):
        props = overrides.get(target.get("refId", ""), {})
        on = ax
        if props.get("custom.axisPlacement") == "right":
            right = right or ax.twinx()
            right_props = right_props or props
            on = right
        for s in result:
            points = [(float(t), float(v)) for t, v in s["values"] if math.isfinite(float(v))]
            if points:
                # The panel's first query is its headline: drawn on top and thicker, so that a state line
                # lying on the same values does not hide it.
                lines += on.plot(_dates([t for t, _ in points]), [v for _, v in points],
                                 linewidth=2.2 if i == 0 else 1.2, zorder=3 if i == 0 else 2,
                                 label=legend(target.get("legendFormat", ""), s["metric"]))
    _format_axis(ax, defaults.get("unit", "none"), defaults.get("min"), defaults.get("max"))
    if right is not None:
        _format_axis(right, right_props.get("unit", defaults.get("unit", "none")), right_props.get("min"),
                     right_props.get("max"))
        right.tick_params(labelsize=7)
    if lines:
        ax.legend(lines, [line.get_label() for line in lines], fontsize=6.5, loc="best", framealpha=0.8)
    return len(lines)


def render(prom_query_range: QueryRange, panels: Sequence[dict[str, Any]], out_png: str | Path, *,
           start: float, end: float, step: float, scrape_interval: float = 15.0,
           rate_interval_value: str | None = None, model: str = ".*",
           rewrite: Callable[[str], str] | None = None, markers: Sequence[tuple[float, str]] = (),
           title: str = "entropy-proxy / overview", subtitle: str = "", columns: int = 3) -> dict[str, int]:
    """Run every target of ``panels`` over [start, end] and draw them into ``out_png``.

    Heatmap panels take a full row at the top, the rest fill a grid of ``columns``. ``rewrite`` is applied to
    each query before the variables are filled (a test Prometheus with compressed rule windows passes its
    duration compressor: the dashboard's own windows shrink, ``$__rate_interval`` stays as given).
    ``markers`` are (unix time, label) pairs drawn as vertical lines on every panel.
    Returns the number of series (heatmap: buckets) drawn per panel title; an empty panel says "No data".
    """
    from matplotlib.figure import Figure

    interval = rate_interval_value or rate_interval(step, scrape_interval)
    heatmaps = [p for p in panels if p.get("type") == "heatmap"]
    others = [p for p in panels if p.get("type") != "heatmap"]
    rows = len(heatmaps) + math.ceil(len(others) / columns)
    fig = Figure(figsize=(6 * columns, 3.6 * rows), layout="constrained", dpi=100)
    grid = fig.add_gridspec(rows, columns)
    axes = [fig.add_subplot(grid[i, :]) for i in range(len(heatmaps))]
    axes += [fig.add_subplot(grid[len(heatmaps) + i // columns, i % columns]) for i in range(len(others))]
    drawn: dict[str, int] = {}
    for ax, panel in zip(axes, heatmaps + others, strict=True):
        results = []
        for target in panel.get("targets", []):
            expr = rewrite(target["expr"]) if rewrite else target["expr"]
            expr = substitute(expr, rate_interval=interval, model=model, interval=f"{step:g}s")
            results.append((target, prom_query_range(expr, start, end, step)))
        if panel.get("type") == "heatmap":
            drawn[panel["title"]] = _draw_heatmap(ax, panel, [s for _, r in results for s in r], step, fig)
        else:
            drawn[panel["title"]] = _draw_timeseries(ax, panel, results)
        if not drawn[panel["title"]]:
            ax.text(0.5, 0.5, "No data", transform=ax.transAxes, ha="center", va="center", color="grey")
        _decorate(ax, panel["title"], start, end, markers, label_markers=ax is axes[0])
    fig.suptitle(title + (f"\n{subtitle}" if subtitle else ""), fontsize=13)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return drawn


def percent_targets(panels: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) pairs drawn on a percent axis: the panel's unit is ``percentunit`` and no override gives
    the target's query another unit."""
    out = []
    for panel in panels:
        if panel.get("type") == "row":
            continue
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        overrides = _overrides(panel)
        for target in panel.get("targets", []):
            if overrides.get(target.get("refId", ""), {}).get("unit", unit) == "percentunit":
                out.append((panel, target))
    return out


def percent_outside_range(prom_query_range: QueryRange, panels: Sequence[dict[str, Any]], *, start: float,
                          end: float, step: float, rate_interval_value: str, model: str = ".*",
                          rewrite: Callable[[str], str] | None = None) -> list[tuple[str, str, float]]:
    """Run every query drawn on a percent axis; (panel title, refId, worst value) for each one that returned a
    value outside 0-1 (0-100 %). A query that returned no value at all is reported with NaN: a check that sees
    nothing must not pass."""
    bad = []
    for panel, target in percent_targets(panels):
        expr = rewrite(target["expr"]) if rewrite else target["expr"]
        expr = substitute(expr, rate_interval=rate_interval_value, model=model, interval=f"{step:g}s")
        values = [float(v) for s in prom_query_range(expr, start, end, step) for _, v in s["values"]]
        finite = [v for v in values if math.isfinite(v)]
        outside = [v for v in finite if not -1e-9 <= v <= 1 + 1e-9]
        if not finite or outside:
            worst = max(outside, key=lambda v: abs(v - 0.5)) if outside else math.nan
            bad.append((panel["title"], target.get("refId", ""), worst))
    return bad


def _decorate(ax: Any, title: str, start: float, end: float, markers: Sequence[tuple[float, str]],
              label_markers: bool) -> None:
    from matplotlib import dates as mdates

    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlim(*_dates([start, end]))
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(tz=UTC, maxticks=7))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=UTC))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    for t, text in markers:
        when = _dates([t])[0]
        ax.axvline(when, color="crimson", linestyle="--", linewidth=1)
        if label_markers:
            left = t > (start + end) / 2  # late markers are labelled on their left, away from the edge
            ax.annotate(text, (when, 1.0), xycoords=("data", "axes fraction"), xytext=(-3 if left else 3, -3),
                        textcoords="offset points", va="top", ha="right" if left else "left", fontsize=9,
                        color="crimson", backgroundcolor=(1, 1, 1, 0.7))


def _seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+)([smhd])", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration such as 30m or 6h: {text!r}")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboards.render", description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", required=True, help="base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--since", type=_seconds, default=6 * 3600, help="time range ending now (default 6h)")
    parser.add_argument("--model", default=".*", help="regex for $model (default: all)")
    parser.add_argument("--scrape-interval", type=_seconds, default=15,
                        help="Prometheus' scrape interval, for $__rate_interval (default 15s)")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    parser.add_argument("--out", type=Path, default=Path("dashboard.png"))
    args = parser.parse_args(argv)
    end = time.time()
    step = max(1.0, round(args.since / 240))  # ~240 points a panel, about what Grafana asks for
    panels = main_panels(json.loads(args.dashboard.read_text()))
    drawn = render(prometheus_query_range(args.prometheus), panels, args.out, start=end - args.since, end=end,
                   step=step, scrape_interval=args.scrape_interval, model=args.model)
    for panel_title, n in drawn.items():
        print(f"{n:4d}  {panel_title}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
