"""The monitor set as the proxy runs it (proxy.monitoring), on synthetic traffic: false alarms and detection delays.

Traffic: 128-token responses (55 % near-zero, 25 % moderate, 20 % forking-entropy tokens), 20 prompts asked
repeatedly, five formats. Window 200 responses, baseline 10,000 tokens (CUSUM references: 400 responses).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from proxy.monitoring import Monitoring, validate_baseline
from proxy.settings import load_settings

from .synthetic import formatted, observation, token_entropies

FORMATS = ("prose", "code", "list", "json", "latex")


def _mon(**kw: object) -> Monitoring:
    over = {"upstream": "http://u", "models": ["m"], "monitors.window": 200, "monitors.baseline": 10_000, **kw}
    return Monitoring(load_settings(over, environ={}))


def _feed(mon: Monitoring, rng: np.random.Generator, n: int, *, scale: float = 1.0, fork: float = 1.0,
          fmt: str | None = None, same: bool = False) -> list[dict[str, float | str | None]]:
    out = []
    for _ in range(n):
        h = token_entropies(rng, 128, scale, fork)
        p = f"prompt {int(rng.integers(0, 20))}"
        text = f"The answer to {p} is fixed." if same else formatted(rng, fmt or FORMATS[int(rng.integers(0, 5))])
        mon.observe(observation(h, text, prompt=p))
        mon.process_pending()
        mm = mon.models["m"]
        out.append({"score": mm.collapse_score(), "psi": mm.drift.drift()["psi"], "state": mm.state(),
                    **mm.diversity_values()})
    return out


def _first(rows: list[dict[str, float | str | None]], pred) -> int | None:  # type: ignore[no-untyped-def]
    return next((i + 1 for i, r in enumerate(rows) if pred(r)), None)


@pytest.fixture(scope="module")
def warmed() -> tuple[Monitoring, np.random.Generator, list[dict[str, float | str | None]]]:
    rng = np.random.default_rng(11)
    mon = _mon()
    rows = _feed(mon, rng, 3_000)
    return mon, rng, rows


def test_stationary_no_false_alarms(warmed) -> None:  # type: ignore[no-untyped-def]
    mon, _, rows = warmed
    after = rows[400:]
    assert all(r["state"] == "healthy" for r in after)
    assert max(float(r["score"]) for r in after) < 0.5  # type: ignore[arg-type]
    assert float(np.mean([r["score"] for r in after])) < 0.02
    assert max(float(r["psi"] or 0) for r in after) < 0.05  # type: ignore[arg-type]
    st = mon.status()["models"]["m"]
    assert st["baseline"]["complete"] and st["collapse"]["entropy_cusum"]["alarms"] == 0
    assert 0.2 < st["forking_threshold"] < 1.5  # the adaptive p80 of the synthetic traffic
    assert st["forking"]["fraction"] == pytest.approx(0.2, abs=0.03)


def _fresh_copy() -> tuple[Monitoring, np.random.Generator]:
    rng = np.random.default_rng(12)
    mon = _mon()
    _feed(mon, rng, 600)
    return mon, rng


def test_step_down_in_entropy() -> None:
    mon, rng = _fresh_copy()
    rows = _feed(mon, rng, 250, scale=0.5)
    n_score = _first(rows, lambda r: r["score"] >= 0.5)
    n_psi = _first(rows, lambda r: (r["psi"] or 0) >= 0.25)
    assert n_score is not None and n_score <= 20  # measured: 8 (two batches of 4 responses)
    assert n_psi is not None and n_psi <= 200  # measured: 188 - PSI needs most of the 200-response window
    assert rows[-1]["state"] == "recognition"  # entropy down, diversity steady


def test_loss_of_forking_entropy() -> None:
    mon, rng = _fresh_copy()
    rows = _feed(mon, rng, 100, fork=0.4)
    n = _first(rows, lambda r: r["score"] >= 0.5)
    assert n is not None and n <= 20
    assert mon.models["m"].collapse.forking.alarm


def test_collapse_to_one_format() -> None:
    mon, rng = _fresh_copy()
    base = mon.models["m"].diversity_values()["format_entropy"]
    rows = _feed(mon, rng, 250, fmt="code")
    n = _first(rows, lambda r: r["format_entropy"] < 0.5 * base)
    assert n is not None and n <= 160  # measured: ~ 0.7 x window
    assert rows[-1]["format_entropy"] == 0.0
    assert mon.models["m"].collapse_components()["diversity"] == 1.0


def test_repeated_identical_answers() -> None:
    mon, rng = _fresh_copy()
    base = mon.models["m"].diversity_values()
    rows = _feed(mon, rng, 300, scale=0.5, same=True)
    n_chrf = _first(rows, lambda r: r["chrf_distance"] < 0.5 * base["chrf_distance"])
    n_d2 = _first(rows, lambda r: r["distinct_2"] < 0.5 * base["distinct_2"])
    assert n_chrf is not None and n_chrf <= 150
    assert n_d2 is not None and n_d2 <= 200  # the distinct-2 window is 200 responses
    assert rows[-1]["state"] == "collapse" and rows[-1]["score"] > 0.9


def test_baseline_snapshot_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    mon, rng = _fresh_copy()
    snap = validate_baseline(mon.baseline_snapshot())
    f = tmp_path / "b.json"
    import json
    f.write_text(json.dumps(snap))
    restarted = _mon(**{"monitors.baseline_file": str(f)})
    mm = restarted.models["m"]
    assert mm.drift.frozen and mm.collapse.entropy.ready
    rows = _feed(restarted, rng, 30, scale=0.5)  # a new version with lower entropy: compared with the old one
    assert rows[-1]["score"] >= 0.5
    with pytest.raises(ValueError, match="format"):
        validate_baseline({"models": {}})


def test_fixed_threshold_and_feedback_fit() -> None:
    mon = _mon(**{"thresholds.forking": 0.5})
    assert mon.current_forking_threshold("m") == 0.5
    mon2 = _mon()
    assert mon2.current_forking_threshold("anything") == 0.672
    for i, h in enumerate(np.repeat(np.linspace(0.1, 1.5, 5), 50)):  # 5 windows of 50 labels
        mon2.feedback("m", float(h), float(-0.2 * np.exp(h) + 0.95), key=f"r{i}")
        mon2.feedback("m", float(h), float(-0.2 * np.exp(h) + 0.95), key=f"r{i}")  # relabelled: counted once
    law = mon2.status()["models"]["m"]["performance_law"]
    assert law["ceiling"] == pytest.approx(0.75) and law["points"] == 5 and law["labels"] == 250


def test_request_path_cost(capsys) -> None:  # type: ignore[no-untyped-def]
    """Per-response cost of Monitoring.observe (request path) and of the background text work, 128 tokens: printed,
    not asserted (a loaded machine must not fail it); what is asserted is that nothing was dropped."""
    rng = np.random.default_rng(4)
    mon = _mon()
    obs = [observation(token_entropies(rng), formatted(rng, FORMATS[i % 5]), prompt=f"p{i % 20}")
           for i in range(2_000)]
    fast = slow = 0.0
    for i in range(0, len(obs), 500):  # the queue holds 1,000: drain between chunks
        t0 = time.perf_counter()
        for o in obs[i : i + 500]:
            mon.observe(o)
        t1 = time.perf_counter()
        mon.process_pending()
        fast += t1 - t0
        slow += time.perf_counter() - t1
    fast, slow = fast / len(obs), slow / len(obs)
    with capsys.disabled():
        print(f"\nmonitors: request path {fast * 1e6:.0f} us/response ({fast / 128 * 1e6:.2f} us/token), "
              f"background {slow * 1e6:.0f} us/response (dropped {mon.dropped})")
    assert mon.dropped == 0 and mon.processed == len(obs)
