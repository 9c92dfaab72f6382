"""A smoke run of the load and soak benchmark (bench/load.py): seconds, not minutes, and no timed assertions;
the figures in docs/reliability.md come from the full command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import load


@pytest.mark.slow
def test_load_smoke_run_has_no_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "load.json"
    code = load.main(["--quick", "--clients", "10", "--seconds", "1.5", "--soak-s", "2", "--json", str(out)])
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert code == 0, text
    for name in ("direct", "proxy", "soak"):
        assert res[name]["requests"] > 0 and res[name]["errors"] == 0, (name, res[name])
    assert res["proxy_overhead"]["requests"] == res["proxy"]["requests"]
    assert res["soak"]["samples"] >= 2 and res["soak"]["rss_end_mib"] > 0
    assert "added by the proxy at this load" in text and "soak: RSS" in text


def test_slope_and_quantiles() -> None:
    assert load.slope_mib_per_min([(t, 100 + 0.5 * t) for t in range(0, 100)]) == pytest.approx(30.0)
    text = "\n".join([
        'entropy_proxy_overhead_seconds_bucket{endpoint="chat",le="0.001"} 50.0',
        'entropy_proxy_overhead_seconds_bucket{endpoint="chat",le="0.005"} 99.0',
        'entropy_proxy_overhead_seconds_bucket{endpoint="chat",le="+Inf"} 100.0',
        'entropy_proxy_overhead_seconds_bucket{endpoint="completions",le="0.001"} 0.0',
    ])
    q = load.overhead_quantiles(text)
    assert q == {"p50_ms_at_most": 1.0, "p99_ms_at_most": 5.0, "requests": 100.0}
