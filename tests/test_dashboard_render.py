"""dashboards/render.py: the dashboard's queries filled in as Grafana fills them, and drawn.

A fake ``query_range`` records what would be sent to Prometheus. The run against a real Prometheus is the hook
at the end of tests/test_prometheus_e2e.py, which renders test-artifacts/dashboard.png from that scenario.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import httpx
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from dashboards import render as r
from tests.plugins.prometheus import compress_durations

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = json.loads((ROOT / "dashboards" / "entropy-proxy.json").read_text())
T0 = 1_700_000_000.0
LES = ["0.1", "1.0", "10.0", "+Inf"]  # "10.0" sorts before "2" as text: the order must be numeric


class FakePrometheus:
    """Answers every range query with plausible series and keeps the expressions it was asked."""

    def __init__(self, empty: tuple[str, ...] = ()) -> None:
        self.asked: list[tuple[str, float, float, float]] = []
        self.empty = empty

    def __call__(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        self.asked.append((expr, start, end, step))
        if any(e in expr for e in self.empty):
            return []
        times = [start + i * step for i in range(int((end - start) / step) + 1)]
        if "_bucket" in expr and "histogram_quantile" not in expr:
            # All tokens in the top bucket, then all in the lowest: a collapse half-way.
            half = len(times) // 2
            return [{"metric": {"le": le},
                     "values": [[t, "4" if le in ("+Inf", "10.0") or (i >= half) else "0"]
                                for i, t in enumerate(times)]} for le in LES]
        return [{"metric": {"model": "m", "state": "healthy", "measure": "distinct_2"},
                 "values": [[t, "NaN" if i == 0 else str(0.5 + 0.01 * i)] for i, t in enumerate(times)]}]


def test_rate_interval_follows_grafana() -> None:
    # max($__interval + scrape interval, 4 x scrape interval)
    assert r.rate_interval(step=1, scrape_interval=1) == "4s"
    assert r.rate_interval(step=60, scrape_interval=15) == "75s"
    assert r.rate_interval(step=0.5, scrape_interval=2.5) == "10s"


def test_substitute_fills_every_variable_and_refuses_unknown_ones() -> None:
    expr = 'sum(rate(x{model=~"$model", a="${model}"}[$__rate_interval])) / $__interval ${datasource}'
    assert r.substitute(expr, rate_interval="10s", model="smollm2", interval="2s") == (
        'sum(rate(x{model=~"smollm2", a="smollm2"}[10s])) / 2s ')
    with pytest.raises(ValueError, match=r"\$cluster"):
        r.substitute('x{cluster="$cluster"}', rate_interval="10s")


def test_every_main_panel_query_is_fully_substituted() -> None:
    panels = r.main_panels(DASHBOARD)
    assert [p["title"] for p in panels] == list(r.MAIN_PANELS)
    for p in panels:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert "$" not in r.substitute(t["expr"], rate_interval="1m"), t["expr"]


def test_main_panels_names_a_missing_title() -> None:
    with pytest.raises(KeyError, match="No such panel"):
        r.main_panels(DASHBOARD, ["Token entropy distribution", "No such panel"])


def test_legend_format() -> None:
    assert r.legend("{{state}} {{ model }}", {"state": "collapse", "model": "m"}) == "collapse m"
    assert r.legend("p50 {{endpoint}}", {}) == "p50"
    assert r.legend("", {"model": "m", "le": "1"}) == '{le="1", model="m"}'


def test_bucket_shares_de_accumulates_in_numeric_order() -> None:
    series = [{"metric": {"le": le}, "values": [[T0, c], [T0 + 1, "0"]]}
              for le, c in [("+Inf", "10"), ("10.0", "10"), ("0.1", "2"), ("1.0", "5")]]
    times, les, shares = r.bucket_shares(series)
    assert times == [T0, T0 + 1]
    assert les == LES
    assert [s[0] for s in shares] == pytest.approx([0.2, 0.3, 0.5, 0.0])
    assert sum(s[0] for s in shares) == pytest.approx(1.0)
    assert all(math.isnan(s[1]) for s in shares)  # no observations: a blank column, not a zero one


def test_render_runs_each_query_once_with_the_variables_filled(tmp_path: Path) -> None:
    prom = FakePrometheus(empty=("upstream_errors",))
    panels = r.main_panels(DASHBOARD)
    out = tmp_path / "sub" / "dash.png"
    drawn = r.render(prom, panels, out, start=T0, end=T0 + 120, step=2, rate_interval_value="10s",
                     rewrite=compress_durations, markers=[(T0 + 60, "switch")], subtitle="fake")
    expected = [t["expr"] for p in panels for t in p["targets"]]
    assert len(prom.asked) == len(expected)
    for (expr, start, end, step), raw in zip(prom.asked, expected, strict=True):
        assert (start, end, step) == (T0, T0 + 120, 2)
        assert "$" not in expr
        if "$__rate_interval" in raw:
            assert "[10s]" in expr  # compressing the dashboard's windows leaves the rate interval alone
    drift = next(e for e, *_ in prom.asked if "mean1d" in e)
    assert "offset 30s" in drift  # ... but does compress the panel's own 30m offset
    assert drawn["Token entropy distribution"] == len(LES)
    assert drawn["Upstream errors"] == 0  # drawn as "No data"
    assert all(n > 0 for title, n in drawn.items() if title != "Upstream errors"), drawn
    image = imread(out)
    assert image.shape[0] > 1000 and image.shape[1] > 1500
    assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas


def test_overrides_put_a_query_on_its_own_right_axis() -> None:
    panel = {"title": "p", "type": "timeseries",
             "fieldConfig": {"defaults": {"unit": "percentunit", "min": 0},
                             "overrides": [{"matcher": {"id": "byFrameRefID", "options": "B"},
                                            "properties": [{"id": "custom.axisPlacement", "value": "right"},
                                                           {"id": "unit", "value": "short"},
                                                           {"id": "max", "value": 10}]}]}}
    series = [{"metric": {"model": "m"}, "values": [[T0, "0.5"], [T0 + 1, "0.25"]]}]
    labels = [{"metric": {"label": "correct"}, "values": [[T0, "7"], [T0 + 1, "9"]]}]
    fig = Figure()
    ax = fig.add_subplot()
    n = r._draw_timeseries(ax, panel, [({"refId": "A", "legendFormat": "{{model}}"}, series),
                                       ({"refId": "B", "legendFormat": "{{label}}"}, labels)])
    assert n == 2
    left, right = fig.axes
    assert [line.get_label() for line in left.get_lines()] == ["m"]
    assert [line.get_label() for line in right.get_lines()] == ["correct"]
    assert right.get_ylim()[1] == pytest.approx(10.4)
    assert [t.get_text() for t in left.get_legend().get_texts()] == ["m", "correct"]


def test_prometheus_query_range_sends_the_range_and_raises_on_errors() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.params["query"] == "bad(":
            return httpx.Response(400, json={"status": "error", "error": "parse error"})
        result = [{"metric": {"job": "x"}, "values": [[T0, "1"]]}]
        data = {"resultType": "matrix", "result": result}
        return httpx.Response(200, json={"status": "success", "data": data})

    query_range = r.prometheus_query_range("http://prom:9090", transport=httpx.MockTransport(handler))
    assert query_range("up", T0, T0 + 60, 15) == [{"metric": {"job": "x"}, "values": [[T0, "1"]]}]
    assert seen[0].url.path == "/api/v1/query_range"
    assert dict(seen[0].url.params) == {"query": "up", "start": str(T0), "end": str(T0 + 60), "step": "15"}
    with pytest.raises(RuntimeError, match="parse error"):
        query_range("bad(", T0, T0 + 60, 15)


def test_cli_renders_the_committed_dashboard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    prom = FakePrometheus()
    monkeypatch.setattr(r, "prometheus_query_range", lambda url: prom)
    out = tmp_path / "d.png"
    assert r.main(["--prometheus", "http://prom:9090", "--since", "2h", "--scrape-interval", "30s",
                   "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    _, start, end, step = prom.asked[0]
    assert end - start == 7200 and step == 30  # ~240 points
    raw = [t["expr"] for p in r.main_panels(DASHBOARD) for t in p["targets"]]
    assert all("[120s]" in e for (e, *_), x in zip(prom.asked, raw, strict=True) if "$__rate_interval" in x)
    assert "wrote" in capsys.readouterr().out


class ShareOrCount:
    """A Prometheus whose ratio queries (a rule's ``ratio`` or a ``/``) answer shares in 0-1 and whose other
    queries answer what a counter's rate or increase does in the end-to-end run: several per window."""

    def __call__(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        times = [start + i * step for i in range(int((end - start) / step) + 1)]
        value = "0.25" if ("ratio" in expr or "/" in expr) else "9"
        return [{"metric": {"model": "m"}, "values": [[t, value] for t in times]}]


# The confident-wrong panel as it was when docs/dashboard.png read up to 1,000 %: feedback label counts on its
# percent axis (commit cd6d4e6).
OLD_CONFIDENT_WRONG = {"title": "Confident-wrong rate", "type": "timeseries",
                       "fieldConfig": {"defaults": {"min": 0, "unit": "percentunit"}, "overrides": []},
                       "targets": [{"refId": "A", "expr": 'model:entropy_proxy_confident_wrong:ratio_rate1h'
                                                          '{model=~"$model"}'},
                                   {"refId": "B", "expr": 'sum by (model, label) (increase(entropy_proxy_feedback_'
                                                          'total{model=~"$model"}[$__rate_interval]))'}]}


def test_percent_check_catches_the_old_confident_wrong_panel() -> None:
    bad = r.percent_outside_range(ShareOrCount(), [OLD_CONFIDENT_WRONG], start=T0, end=T0 + 60, step=1,
                                  rate_interval_value="10s")
    assert bad == [("Confident-wrong rate", "B", 9.0)]


def test_percent_targets_follow_units_and_overrides() -> None:
    picked = {(p["title"], t["refId"]) for p, t in r.percent_targets(DASHBOARD["panels"])}
    assert ("Confident-wrong rate", "A") in picked and ("Flagged responses", "A") in picked
    assert not any(title in ("Feedback labels", "Requests", "Proxy overhead") for title, _ in picked)
    panel = {"title": "p", "type": "timeseries", "targets": [{"refId": "A", "expr": "a"}, {"refId": "B", "expr": "b"}],
             "fieldConfig": {"defaults": {"unit": "percentunit"},
                             "overrides": [{"matcher": {"id": "byFrameRefID", "options": "B"},
                                            "properties": [{"id": "unit", "value": "short"}]}]}}
    assert [t["refId"] for _, t in r.percent_targets([panel])] == ["A"]


def test_percent_check_passes_shares_and_reports_a_query_without_data() -> None:
    panels = [p for p, _ in r.percent_targets(DASHBOARD["panels"])]
    assert r.percent_outside_range(ShareOrCount(), panels, start=T0, end=T0 + 60, step=1,
                                   rate_interval_value="10s") == []
    bad = r.percent_outside_range(lambda *a: [], panels[:1], start=T0, end=T0 + 60, step=1,
                                  rate_interval_value="10s")
    assert len(bad) >= 1 and math.isnan(bad[0][2])
