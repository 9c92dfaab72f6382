"""The benchmark harness keeps working with the proxy in the path (a CI smoke run: seconds, no thresholds).

The figures themselves come from `python -m bench.overhead` on a quiet machine (docs/benchmarks.md)."""

import pytest

pytestmark = pytest.mark.slow


def test_overhead_harness_quick_run_through_the_proxy(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import overhead

    assert overhead.main(["--quick", "--targets", "direct,proxy", "--long-seconds", "2", "--levels", "1,4"]) == 0
    out = capsys.readouterr().out
    assert "proxy" in out and "proxy: stream True, non-stream True" in out  # logprobs came back intact
