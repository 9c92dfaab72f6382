import numpy as np

from monitors.changepoint import DownwardCusum, PageHinkley


def _run(det: DownwardCusum | PageHinkley, xs: np.ndarray) -> int | None:
    """Index of the first alarm, or None."""
    for i, x in enumerate(xs):
        if det.update(float(x)):
            return i
    return None


def test_cusum_stationary_false_alarms_and_step_delay() -> None:
    rng = np.random.default_rng(0)
    det = DownwardCusum(k=0.5, h=8.0, warmup=500)
    assert _run(det, rng.normal(1.0, 0.2, 50_000)) is None and det.alarms == 0
    # a 1-sigma fall: the textbook delay for k=0.5, h=8 is ~ (h + 1.166) / (1 - k) ~ 18 samples
    delay = _run(det, rng.normal(0.8, 0.2, 200))
    assert delay is not None and 8 <= delay <= 40
    assert det.level == 1.0


def test_cusum_recovers_and_reference_from_baseline() -> None:
    det = DownwardCusum(warmup=None)
    for _ in range(100):
        det.update(1.0)
    assert not det.ready  # warmup None: only freeze() or set_reference fixes the reference
    det.set_reference(1.0, 0.1)
    for _ in range(50):
        det.update(0.5)
    assert det.alarm
    for _ in range(200):
        det.update(1.0)
    assert not det.alarm and det.level == 0.0


def test_cusum_batched_moves_once_per_batch() -> None:
    rng = np.random.default_rng(1)
    det = DownwardCusum(k=0.5, h=8.0, warmup=1_000, batch=8)
    assert _run(det, rng.normal(1.0, 0.2, 20_000)) is None
    n0 = det.samples
    delay = _run(det, rng.normal(0.9, 0.2, 400))  # half a sigma per value = 1.4 sigma per batch of 8
    assert delay is not None and delay < 120
    assert det.samples - n0 == (delay + 1) // 8


def test_page_hinkley_detects_fall_not_rise() -> None:
    rng = np.random.default_rng(2)
    ph = PageHinkley(delta=0.01, lam=3.0)
    assert _run(ph, rng.normal(1.0, 0.1, 5_000)) is None
    assert _run(ph, rng.normal(1.5, 0.1, 200)) is None
    delay = _run(ph, rng.normal(0.6, 0.1, 500))
    assert delay is not None and delay < 50
