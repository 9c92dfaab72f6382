"""Prometheus families of the baselines (CONTRACT section 9), read from the monitors at scrape time.

- ``entropy_proxy_baseline{model,measure}``: the baseline in use; a measure is absent while the model has no
  baseline (or the baseline did not measure it);
- ``entropy_proxy_baseline_info{model,revision,source}`` = 1 for the baseline in use;
- ``entropy_proxy_diversity_samples{model,measure}``: responses behind the current ``entropy_proxy_diversity``;
- ``entropy_proxy_forking_tokens_total{model}`` / ``entropy_proxy_forking_checked_tokens_total{model}``: tokens
  above the baseline's **fixed** forking threshold / all tokens compared with it (counted while a baseline is in
  use), so ``rate(forking_tokens) / rate(forking_checked_tokens)`` is the forking fraction the rules compare with
  ``entropy_proxy_baseline{measure="forking_fraction"}``.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

NS = "entropy_proxy"


def families(monitoring: Any, with_samples: bool) -> list[Metric]:
    base = GaugeMetricFamily(f"{NS}_baseline", "The baseline in use for the model's revision, by measure.",
                             labels=["model", "measure"])
    info = GaugeMetricFamily(f"{NS}_baseline_info", "1 for the baseline in use: its revision and source.",
                             labels=["model", "revision", "source"])
    samples = GaugeMetricFamily(f"{NS}_diversity_samples", "Responses behind the current diversity value.",
                                labels=["model", "measure"])
    above = CounterMetricFamily(f"{NS}_forking_tokens", "Tokens above the baseline's fixed forking threshold.",
                                labels=["model"])
    checked = CounterMetricFamily(f"{NS}_forking_checked_tokens",
                                  "Tokens compared with the baseline's fixed forking threshold.", labels=["model"])
    fams: list[Metric] = [base, info, samples, above, checked]
    if not with_samples or monitoring is None:
        return fams
    for label, mm in list(monitoring.models.items()):
        live = mm.live
        if live is None:
            continue
        b = live.baseline
        if b is not None:
            for measure, v in b.measures().items():
                base.add_metric([label, measure], v)
            info.add_metric([label, b.revision, b.source], 1.0)
        div = mm.diversity_values()
        for measure, n in (mm.text.get("samples") or {}).items():
            if div.get(measure) is not None:
                samples.add_metric([label, measure], float(n))
        above.add_metric([label], float(live.above))
        checked.add_metric([label], float(live.checked))
    return fams
