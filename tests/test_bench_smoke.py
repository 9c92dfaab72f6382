"""The benchmark harness keeps working with the proxy in the path (a CI smoke run: seconds, no thresholds).

The figures themselves come from `python -m bench.overhead` on a quiet machine (docs/benchmarks.md)."""

import pytest

pytestmark = pytest.mark.slow


def test_overhead_harness_quick_run_through_the_proxy(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import overhead

    assert overhead.main(["--quick", "--targets", "direct,proxy", "--long-seconds", "2", "--levels", "1,4"]) == 0
    out = capsys.readouterr().out
    assert "proxy" in out and "proxy: stream True, non-stream True" in out  # logprobs came back intact


def test_request_path_parts_and_upstream_reader_run(capsys: pytest.CaptureFixture[str]) -> None:
    """bench.request_path's in-process timings and bench.upstream_reader's two clients keep working (the lean client
    reads the same events and bodies as httpx: the benchmark raises otherwise)."""
    from bench import request_path, upstream_reader

    assert request_path.main(["parts"]) == 0
    assert upstream_reader.main(["--rounds", "2", "--streams", "2", "--requests", "10"]) == 0
    out = capsys.readouterr().out
    assert "annotate_body_bytes" in out and "annotate_chunk_bytes" in out
    assert "lean / httpx" in out
