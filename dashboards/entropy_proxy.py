"""The entropy-proxy overview dashboard, per model, built with grafana-foundation-sdk.

Queries read the raw series with ``$__rate_interval`` (so the dashboard works without the recording rules),
except where a window longer than the panel's step is the point: the 1-hour confident-wrong ratio and the
30m-against-the-day-before ratio use the recording rules that the alerts use, so the panel shows what the
alert sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, timeseries
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

UID = "entropy-proxy-overview"
TITLE = "entropy-proxy / overview"
TAGS = ["entropy-proxy", "llm", "vllm"]
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")

M = 'model=~"$model"'  # every per-model query filters on the model variable
RI = "$__rate_interval"


def _mean(metric: str, by: str, extra: str = "") -> str:
    """Mean of a histogram over all replicas: rate of the sums over rate of the counts."""
    sel = "{" + M + (", " + extra if extra else "") + "}"
    return (f"sum by ({by}) (rate({metric}_sum{sel}[{RI}]))\n/\n"
            f"sum by ({by}) (rate({metric}_count{sel}[{RI}]))")


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    targets: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "none"
    kind: str = "timeseries"  # timeseries | heatmap | stat
    width: int = 12
    height: int = 8
    minimum: float | None = None
    maximum: float | None = None


@dataclass(frozen=True)
class Row:
    title: str
    panels: list[Panel] = field(default_factory=list)


TOKEN_BUCKETS = f'entropy_proxy_token_entropy_nats_bucket{{{M}, token_class="all"}}'
OVERHEAD_BUCKETS = "entropy_proxy_overhead_seconds_bucket"

ROWS = [
    Row("Entropy", [
        Panel("Token entropy distribution",
              "Heatmap of per-token entropy (nats) from the histogram, all replicas summed. "
              "Collapse shows as the mass sinking to the lowest buckets.",
              [(f"sum by (le) (rate({TOKEN_BUCKETS}[{RI}]))", "{{le}}")],
              kind="heatmap", width=24),
        Panel("Mean and forking-token entropy",
              "Mean token entropy, and the 80th percentile of token entropy: the forking-token cut-off "
              "(Wang et al. 2025). Collapse takes entropy from forking tokens first.",
              [(_mean("entropy_proxy_token_entropy_nats", "model", 'token_class="all"'), "mean {{model}}"),
               (f"histogram_quantile(0.8, sum by (model, le) (rate({TOKEN_BUCKETS}[{RI}])))",
                "p80 (forking cut-off) {{model}}")],
              unit="nats", minimum=0),
        Panel("Forking fraction and response confidence",
              "Mean share of forking tokens per response, and mean response confidence "
              "(exp of the mean logprob).",
              [(_mean("entropy_proxy_forking_fraction", "model"), "forking fraction {{model}}"),
               (_mean("entropy_proxy_response_confidence", "model"), "confidence {{model}}")],
              unit="percentunit", minimum=0, maximum=1),
        Panel("Drift against the baseline",
              "PSI and Jensen-Shannon divergence of the token-entropy distribution against the baseline "
              "(largest replica), and the 30m mean over the day before (all replicas: what the drift and "
              "collapse alerts see).",
              [(f"max by (model, method) (entropy_proxy_entropy_drift{{{M}}})", "{{method}} {{model}}"),
               (f"model:entropy_proxy_token_entropy_nats:mean30m{{{M}}}\n/\n"
                f"(model:entropy_proxy_token_entropy_nats:mean1d{{{M}}} offset 30m)",
                "30m / 1d mean {{model}}")]),
        Panel("Collapse score and diagnosed state",
              "Collapse score per replica (0 healthy .. 1 collapsed) and the state the monitors diagnose.",
              [(f"max by (model) (entropy_proxy_collapse_score{{{M}}})", "collapse score {{model}}"),
               (f"max by (model, state) (entropy_proxy_entropy_state{{{M}}})", "{{state}} {{model}}")],
              minimum=0, maximum=1),
    ]),
    Row("Diversity and reasoning", [
        Panel("Response diversity",
              "distinct-2 over the window and mean pairwise chrF distance of repeated prompts "
              "(Matsutani et al. 2025).",
              [(f'avg by (model, measure) (entropy_proxy_diversity{{{M}, '
                f'measure=~"distinct_2|chrf_distance"}})', "{{measure}} {{model}}")],
              minimum=0),
        Panel("Format mix and planning grams",
              "Shannon entropy of the response-format mix (Zhao et al. 2025) and semantic entropy of "
              "strategic planning grams (HICRA).",
              [(f'avg by (model, measure) (entropy_proxy_diversity{{{M}, '
                f'measure=~"format_entropy|semantic_gram_entropy"}})', "{{measure}} {{model}}")],
              unit="nats", minimum=0),
        Panel("Planning vs execution tokens",
              "Mean token entropy of planning tokens (strategic grams) and of the rest.",
              [(_mean("entropy_proxy_token_entropy_nats", "model, token_class", 'token_class!="all"'),
                "{{token_class}} {{model}}")],
              unit="nats", minimum=0),
        Panel("Recognition ratio",
              "Off-policy over on-policy mean entropy from the probe. Well above 1: the model recognises "
              "its own text, so low entropy is information, not collapse.",
              [(f"avg by (model) (entropy_proxy_recognition_ratio{{{M}}})", "{{model}}")],
              minimum=0),
    ]),
    Row("Flags and correctness", [
        Panel("Flagged responses",
              "Share of annotated responses carrying each flag.",
              [(f"sum by (model, flag) (rate(entropy_proxy_responses_flagged_total{{{M}}}[{RI}]))\n"
                "/ on (model) group_left\n"
                f"sum by (model) (rate(entropy_proxy_response_entropy_nats_count{{{M}}}[{RI}]))",
                "{{flag}} {{model}}")],
              unit="percentunit", minimum=0),
        Panel("Confident-wrong rate",
              "Share of labelled responses (last hour) that were flagged confident and labelled incorrect.",
              [(f"model:entropy_proxy_confident_wrong:ratio_rate1h{{{M}}}", "{{model}}")],
              unit="percentunit", minimum=0),
        Panel("Feedback labels",
              "Correctness labels arriving through POST /v1/feedback, per second.",
              [(f"sum by (model, label) (rate(entropy_proxy_feedback_total{{{M}}}[{RI}]))",
                "{{label}} {{model}}")],
              unit="reqps", minimum=0),
        Panel("Calibration",
              "ECE, Brier score and AUROC of the proxy's confidence against feedback labels.",
              [(f"avg by (model, measure) (entropy_proxy_calibration{{{M}}})", "{{measure}} {{model}}")],
              minimum=0, maximum=1),
        Panel("Mean response entropy",
              "Mean over responses of their mean token entropy.",
              [(_mean("entropy_proxy_response_entropy_nats", "model"), "{{model}}")],
              unit="nats", kind="stat"),
    ]),
    Row("Serving", [
        Panel("Proxy overhead",
              "Time the proxy itself adds to each request (not the upstream's).",
              [(f"histogram_quantile({q}, sum by (endpoint, le) (rate({OVERHEAD_BUCKETS}[{RI}])))",
                f"p{int(float(q) * 100)} {{{{endpoint}}}}") for q in ("0.5", "0.99")],
              unit="s", minimum=0),
        Panel("Requests",
              "Requests by status, all replicas.",
              [(f"sum by (model, status) (rate(entropy_proxy_requests_total{{{M}}}[{RI}]))",
                "{{status}} {{model}}")],
              unit="reqps", minimum=0),
        Panel("Logprobs missing",
              "Share of requests that came back without logprobs and went unannotated.",
              [(f"sum by (model) (rate(entropy_proxy_logprobs_missing_total{{{M}}}[{RI}]))\n/\n"
                f"sum by (model) (rate(entropy_proxy_requests_total{{{M}}}[{RI}]))", "{{model}}")],
              unit="percentunit", minimum=0, width=8),
        Panel("Upstream errors",
              "Upstream failures by kind.",
              [(f"sum by (model, kind) (rate(entropy_proxy_upstream_errors_total{{{M}}}[{RI}]))",
                "{{kind}} {{model}}")],
              unit="reqps", minimum=0, width=8),
        Panel("Audit records dropped",
              "Audit records not written (queue full, store down). The proxy keeps serving; "
              "the trail has gaps.",
              [(f"sum by (reason) (rate(entropy_proxy_audit_dropped_total[{RI}]))", "{{reason}}")],
              unit="cps", minimum=0, width=8),
    ]),
]


def _panel(p: Panel) -> db.Panel:
    builder: db.Panel
    if p.kind == "heatmap":
        builder = heatmap.Panel().calculate(False)
    elif p.kind == "stat":
        builder = stat.Panel()
    else:
        builder = timeseries.Panel().fill_opacity(10)
    builder = (builder.title(p.title).description(p.description).datasource(DATASOURCE)
               .unit(p.unit).span(p.width).height(p.height))
    if p.minimum is not None:
        builder = builder.min(p.minimum)
    if p.maximum is not None:
        builder = builder.max(p.maximum)
    for i, (expr, legend) in enumerate(p.targets):
        q = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(chr(ord("A") + i)).range()
        if p.kind == "heatmap":
            q = q.format(PromQueryFormat.HEATMAP)
        builder = builder.with_target(q)
    return builder


def build() -> dm.Dashboard:
    dash = (
        db.Dashboard(TITLE)
        .uid(UID)
        .tags(TAGS)
        .description("Per-model entropy, drift, collapse, diversity, calibration and serving health of "
                     "entropy-proxy.")
        .timezone("UTC")
        .time("now-6h", "now")
        .refresh("30s")
        .editable()
        .with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            db.QueryVariable("model").label("Model").datasource(DATASOURCE)
            .query("label_values(entropy_proxy_requests_total, model)")
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*")
            .current(dm.VariableOption(selected=True, text="All", value="$__all"))
        )
    )
    # Stable panel ids: links such as ?viewPanel=N keep pointing at the same panel across regenerations.
    next_id = 1
    for row in ROWS:
        dash = dash.with_row(db.Row(row.title).id(next_id))
        next_id += 1
        for p in row.panels:
            dash = dash.with_panel(_panel(p).id(next_id))
            next_id += 1
    return dash.build()


def queries(dashboard_json: dict) -> list[str]:
    """Every PromQL expression of a dashboard's panels, in panel order (used by the tests)."""
    return [t["expr"] for p in dashboard_json["panels"] for t in p.get("targets", []) if "expr" in t]
