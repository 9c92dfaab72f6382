"""The truncated-logprob entropy estimator: accuracy on real vLLM fixtures, the tail model, edge cases."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from bench.estimator_accuracy import evaluate as evaluate_cases
from bench.estimator_accuracy import load_cases
from monitors import entropy as ent
from monitors.entropy import (
    DEFAULT_VOCAB_SIZE,
    ESTIMATOR_NAME,
    PositionEstimates,
    estimate_positions,
    renormalised_entropy,
)

V_FIXTURE = 49152


def _h(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@pytest.fixture(scope="module")
def cases():
    return load_cases()


# -- real fixtures: SmolLM2-135M on vLLM 0.32 CPU, exact entropy from the same weights -------------------------


def test_fixtures_cover_both_k(cases):
    assert ESTIMATOR_NAME == "topk-tail-v1"
    assert sum(c.logprobs.shape[0] for c in cases[20]) == 224
    assert sum(c.logprobs.shape[0] for c in cases[5]) == 272  # 48 native + 224 truncated
    assert all(c.vocab_size == V_FIXTURE for cs in cases.values() for c in cs)


def test_truncation_to_k5_matches_the_vllm_layout(cases):
    native = {c.name: c for c in cases[20]}
    for c in cases[5]:
        assert c.logprobs.shape[1] == 5
        assert (c.sampled_col == 0).all()
        if c.name not in native:
            continue
        full = native[c.name]
        for j in range(full.logprobs.shape[0]):
            row = full.logprobs[j]
            s = row[full.sampled_col[j]]
            rest = np.sort(np.delete(row, full.sampled_col[j]))[::-1][:4]
            np.testing.assert_array_equal(c.logprobs[j], np.concatenate([[s], rest]))


@pytest.mark.parametrize(("k", "max_median"), [(20, 0.10), (5, 0.40)])
def test_fixture_accuracy_targets(cases, k, max_median):
    ev = evaluate_cases(cases[k])
    point = np.abs(ev["point"])
    assert np.median(point) <= max_median
    # The tail model must beat both the naive renormalised estimate and the packed lower bound by far.
    assert np.median(point) < 0.5 * np.median(np.abs(ev["renormalised"]))
    assert np.median(point) < 0.5 * np.median(np.abs(ev["lower"]))
    assert abs(np.median(ev["point"])) < 0.1  # no systematic bias


@pytest.mark.parametrize("k", [5, 20])
def test_fixture_bounds_contain_exact_everywhere(cases, k):
    for c in cases[k]:
        est = estimate_positions(c.logprobs, c.vocab_size, sampled_col=c.sampled_col)
        assert (est.lower <= c.exact).all(), c.name
        assert (c.exact <= est.upper).all(), c.name
        assert (est.lower <= est.point).all() and (est.point <= est.upper).all()


def test_fixture_bounds_hold_with_the_default_vocab_size(cases):
    # A larger configured V only loosens the upper bound; the point estimate stays close.
    for c in cases[20]:
        est = estimate_positions(c.logprobs, DEFAULT_VOCAB_SIZE, sampled_col=c.sampled_col)
        assert (est.lower <= c.exact).all() and (c.exact <= est.upper).all()
    err = np.concatenate([
        estimate_positions(c.logprobs, DEFAULT_VOCAB_SIZE, sampled_col=c.sampled_col).point - c.exact
        for c in cases[20]
    ])
    assert np.median(np.abs(err)) <= 0.10


def test_pinning_the_sampled_token_to_rank_k_would_break_the_lower_bound(cases):
    # Why `sampled_col` matters: capping the tail at the sampled token's own probability is not rigorous.
    broken = 0
    for c in cases[20]:
        p = np.exp(c.logprobs)
        r = np.maximum(1.0 - p.sum(axis=1), 0.0)
        naive_cap = p.min(axis=1)
        naive = np.array([_h(row) for row in p]) + ent._packed_lower(r, naive_cap)
        broken += int((naive > c.exact + 1e-9).sum())
    assert broken > 0


# -- the tail model ------------------------------------------------------------------------------------------


def test_log_ndtr_matches_erfc():
    xs = np.array([-40.0, -12.0, -5.0, -1.0, 0.0, 0.5, 2.0, 6.0])
    got = ent._log_ndtr(xs)
    for x, g in zip(xs, got, strict=True):
        ref = math.log(0.5 * math.erfc(-x / math.sqrt(2.0))) if x > -30 else (
            -0.5 * x * x - math.log(-x) - 0.5 * math.log(2 * math.pi) - 1.0 / (x * x)  # asymptotic series
        )
        assert g == pytest.approx(ref, rel=2e-6, abs=2e-7)


@pytest.mark.parametrize("n", [1, 4, 19, 20])
@pytest.mark.parametrize(("p_last", "mass"), [(0.02, 0.3), (0.004, 0.6), (0.05, 0.01), (1e-3, 1e-4)])
def test_model_tail_matches_its_discrete_sum(n, p_last, mass):
    # The closed form replaces the sum over ranks by an integral; check against the explicit sum.
    v = 4096
    h_closed = ent._gaussian_tail_entropy(np.array([p_last]), np.array([n]), np.array([mass]), v)[0]
    nd = NormalDist()
    z = np.array([nd.inv_cdf(1.0 - (k - 0.5) / v) for k in range(1, v + 1)])
    # Recover sigma from the solver's own equation by bisection on the discrete sum (independent path).
    lo, hi = 0.0, 500.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if (p_last * np.exp(mid * (z[n:] - z[n - 1]))).sum() > mass:
            lo = mid
        else:
            hi = mid
    q = p_last * np.exp(lo * (z[n:] - z[n - 1]))
    assert q.sum() == pytest.approx(mass, rel=1e-6)
    assert h_closed == pytest.approx(_h(q), rel=0.03, abs=2e-3)


def test_lookup_table_matches_the_solver():
    rng = np.random.default_rng(7)
    for v in (1000, V_FIXTURE, DEFAULT_VOCAB_SIZE):
        n = rng.integers(1, 40, 2000)
        p_last = np.exp(rng.uniform(np.log(1e-6), np.log(0.3), n.size))
        mass = np.minimum(np.exp(rng.uniform(-14, 0, n.size)), 0.999 * (v - n) * p_last)
        direct = ent._gaussian_tail_entropy(p_last, n, mass, v)
        table = ent._tail_entropy(p_last, n, mass, v)
        np.testing.assert_allclose(table, direct, atol=5e-4)


def test_point_grows_with_a_fatter_tail():
    # Same top tokens, more mass below: more entropy, and between the bounds.
    top = np.array([0.3, 0.2, 0.1, 0.05, 0.02])
    points = []
    for r in (0.01, 0.05, 0.1, 0.2, 0.3):
        scale = (1.0 - r) / top.sum()
        est = estimate_positions(np.log(top * scale)[None, :], 5000)
        points.append(est.point[0])
        assert est.lower[0] < est.point[0] < est.upper[0]
    assert np.all(np.diff(points) > 0)


# -- API and edge cases ----------------------------------------------------------------------------------------


def _fields(est: PositionEstimates) -> list[np.ndarray]:
    return [est.point, est.lower, est.upper, est.tail_mass, est.top1_prob, est.margin, est.n_known]


@pytest.mark.parametrize("shape", [(0, 20), (0, 0), (0, 1)])
def test_empty(shape):
    est = estimate_positions(np.zeros(shape))
    assert all(a.shape == (0,) for a in _fields(est))
    assert est.n_known.dtype == np.int64 and est.point.dtype == np.float64


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        estimate_positions(np.zeros(5))
    with pytest.raises(ValueError):
        estimate_positions(np.zeros((1, 2)), 0)


def test_single_entry_row():
    est = estimate_positions(np.array([[math.log(0.6)]]), 1000, sampled_col=np.array([0]))
    assert est.n_known[0] == 1 and est.top1_prob[0] == pytest.approx(0.6)
    assert est.margin[0] == pytest.approx(0.6) and est.tail_mass[0] == pytest.approx(0.4)
    # The one entry is the sampled token: the missing top token may hold all of r.
    assert est.lower[0] == pytest.approx(_h(np.array([0.6, 0.4])))
    assert est.upper[0] == pytest.approx(_h(np.array([0.6])) + 0.4 * math.log(999 / 0.4))
    assert est.lower[0] <= est.point[0] <= est.upper[0]


def test_single_entry_without_sampled_column_has_no_cap():
    est = estimate_positions(np.array([[math.log(0.6)], [math.log(0.6)]]), 1000, sampled_col=np.array([-1, 0]))
    np.testing.assert_allclose(est.lower, _h(np.array([0.6, 0.4])))
    none = estimate_positions(np.array([[math.log(0.6)]]), 1000)
    assert none.lower[0] == pytest.approx(_h(np.array([0.6, 0.4])))


def test_rows_without_entries():
    lp = np.full((3, 4), np.nan)
    lp[1, :2] = np.log([0.5, 0.25])
    v = 50_000
    est = estimate_positions(lp, v, sampled_col=np.array([-1, 0, -1]))
    for i in (0, 2):
        assert est.n_known[i] == 0 and est.tail_mass[i] == 1.0
        assert est.lower[i] == 0.0 and est.upper[i] == pytest.approx(math.log(v))
        assert 0.0 < est.point[i] < math.log(v)
        assert est.top1_prob[i] == 0.0 and est.margin[i] == 0.0
    assert est.n_known[1] == 2 and est.margin[1] == pytest.approx(0.25)


def test_positive_logprobs_are_clamped():
    lp = np.array([[2.0, 1.0, -1.0], [0.0, 0.0, np.nan], [0.3, -0.5, -2.0]])
    est = estimate_positions(lp, 100, sampled_col=np.array([0, 0, 1]))
    for a in _fields(est):
        assert np.isfinite(a).all()
    assert (est.tail_mass == 0.0).all() and (est.top1_prob <= 1.0).all()
    assert (est.lower <= est.point).all() and (est.point <= est.upper).all()
    assert est.point[1] == pytest.approx(math.log(2))  # two entries at p=1, scaled to 1/2 each


def test_vllm_neg_inf_sentinel_is_probability_zero():
    lp = np.array([[math.log(0.7), math.log(0.3), -9999.0, -9999.0]])
    est = estimate_positions(lp, 100, sampled_col=np.array([0]))
    h = _h(np.array([0.7, 0.3]))
    assert est.n_known[0] == 4
    assert est.lower[0] == pytest.approx(h) and est.point[0] == pytest.approx(h)
    assert est.upper[0] == pytest.approx(h)
    assert renormalised_entropy(lp)[0] == pytest.approx(h)


def test_sampled_token_outside_the_top_k():
    # V=6: ranks 1..3 listed plus the sampled token at rank 6; the tail holds ranks 4 and 5.
    full = np.array([0.4, 0.2, 0.15, 0.14, 0.10, 0.01])
    row = np.log(np.array([0.01, 0.4, 0.2, 0.15]))
    exact = _h(full)
    est = estimate_positions(row[None, :], 6, sampled_col=np.array([0]))
    assert est.lower[0] <= exact <= est.upper[0]
    # Not knowing which entry is the sampled one is still rigorous (second-smallest cap) ...
    unk = estimate_positions(row[None, :], 6, sampled_col=np.array([-1]))
    assert unk.lower[0] <= exact
    # ... while taking the sampled token's own p as the cap would not be.
    r = np.array([1.0 - np.exp(row).sum()])
    naive = _h(np.exp(row)) + ent._packed_lower(r, np.array([0.01]))[0]
    assert naive > exact


def test_collapsed_rows_allow_one_large_missing_token():
    # Completions dict form: " the" at rank 1 (0.5) was overwritten by a rank-4 " the" (0.05).
    full = np.array([0.5, 0.2, 0.1, 0.05, 0.15])
    listed = np.log(np.array([0.05, 0.2, 0.1]))
    exact = _h(full)
    est = estimate_positions(listed[None, :], 5, sampled_col=np.array([1]), collapsed=np.array([True]))
    assert est.lower[0] <= exact <= est.upper[0]
    assert est.lower[0] == pytest.approx(_h(np.exp(listed)) + _h(np.array([0.65])))
    plain = estimate_positions(listed[None, :], 5, sampled_col=np.array([1]))
    assert plain.lower[0] > exact  # what the cap would claim if the row were not marked


def test_k_uniform_and_all_known():
    for k in (1, 2, 5, 20):
        est = estimate_positions(np.full((2, k), -math.log(k)), 1000)
        for a in (est.point, est.lower, est.upper):
            np.testing.assert_allclose(a, math.log(k), atol=1e-12)


def test_renormalised_entropy_ignores_the_tail():
    lp = np.log(np.array([[0.2, 0.2, np.nan], [0.5, 0.25, 0.25]]))
    np.testing.assert_allclose(renormalised_entropy(lp), [math.log(2), _h(np.array([0.5, 0.25, 0.25]))])
    assert renormalised_entropy(np.full((1, 3), np.nan))[0] == 0.0


def test_batch_equals_row_by_row(cases):
    c = cases[20][0]
    whole = estimate_positions(c.logprobs, c.vocab_size, sampled_col=c.sampled_col)
    for j in range(0, c.logprobs.shape[0], 7):
        one = estimate_positions(c.logprobs[j : j + 1], c.vocab_size, sampled_col=c.sampled_col[j : j + 1])
        for a, b in zip(_fields(whole), _fields(one), strict=True):
            assert a[j] == pytest.approx(b[0], rel=1e-12, abs=1e-12)


# -- the scalar path for a few rows (one stream chunk) must give the vectorised path's numbers -----------------

FIELDS = ("point", "lower", "upper", "tail_mass", "top1_prob", "margin", "n_known")


def assert_same(small: PositionEstimates | None, vec: PositionEstimates) -> None:
    assert small is not None
    for f in FIELDS:
        a, b = getattr(small, f), getattr(vec, f)
        assert a.shape == b.shape and a.dtype == b.dtype, f
        assert np.isfinite(a).all(), f
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9, err_msg=f)


def both(lp, v, sampled_col=None, collapsed=None):
    lp = np.asarray(lp, dtype=np.float64)
    return ent._estimate_small(lp, v, sampled_col, collapsed), ent._estimate_vectorised(lp, v, sampled_col, collapsed)


@pytest.mark.parametrize("k", [5, 20])
def test_small_path_equals_vectorised_at_every_fixture_position(cases, k):
    for c in cases[k]:
        t = c.logprobs.shape[0]
        for j in range(t):
            row = c.logprobs[j : j + 1]
            for col in (c.sampled_col[j : j + 1], np.array([-1]), None):
                assert_same(*both(row, c.vocab_size, col))
            assert_same(*both(row, c.vocab_size, c.sampled_col[j : j + 1], np.array([True])))
            assert_same(*both(row, DEFAULT_VOCAB_SIZE, c.sampled_col[j : j + 1]))
        # Multi-row chunks: each row of the small path equals the whole response's vectorised row.
        whole = ent._estimate_vectorised(c.logprobs, c.vocab_size, c.sampled_col, None)
        for j in range(0, t, 16):
            part = ent._estimate_small(c.logprobs[j : j + 16], c.vocab_size, c.sampled_col[j : j + 16], None)
            assert part is not None
            for f in FIELDS:
                np.testing.assert_allclose(getattr(part, f), getattr(whole, f)[j : j + 16], rtol=1e-9, atol=1e-9)


NAN = math.nan
EDGE_ROWS = {
    "nan_padding": ([math.log(0.5), math.log(0.2), NAN, NAN], 0),
    "neg_inf_sentinel": ([math.log(0.7), math.log(0.3), -9999.0, -9999.0], 0),
    "sentinel_sampled": ([-9999.0, math.log(0.4), math.log(0.2)], 0),
    "true_neg_inf": ([math.log(0.6), -math.inf, math.log(0.1)], 2),
    "unknown_sampled": ([math.log(0.01), math.log(0.4), math.log(0.2), math.log(0.15)], -1),
    "sampled_in_tail": ([math.log(0.01), math.log(0.4), math.log(0.2), math.log(0.15)], 0),
    "sampled_tie": ([math.log(0.1), math.log(0.5), math.log(0.1)], 0),
    "positive_logprobs": ([2.0, 1.0, -1.0], 0),
    "huge_logit": ([800.0, -1.0, math.inf], 1),
    "two_at_one": ([0.0, 0.0, NAN], 0),
    "sum_over_one": ([math.log(0.6), math.log(0.6)], 1),
    "all_nan": ([NAN, NAN, NAN], 0),
    "single_entry": ([math.log(0.6)], 0),
    "single_entry_unknown": ([math.log(0.6)], -1),
    "all_known": ([math.log(0.5), math.log(0.25), math.log(0.25)], 1),
    "underflow": ([-1e-3, -740.0, -745.5, -800.0], 0),
    "column_out_of_range": ([math.log(0.5), math.log(0.3)], 7),
    "sampled_padding": ([math.log(0.5), NAN], 1),
}


@pytest.mark.parametrize("name", sorted(EDGE_ROWS))
@pytest.mark.parametrize("collapsed", [False, True])
@pytest.mark.parametrize("v", [2, 5, 1000, DEFAULT_VOCAB_SIZE])
def test_small_path_edge_rows(name, collapsed, v):
    row, col = EDGE_ROWS[name]
    lp = np.array([row])
    assert_same(*both(lp, v, np.array([col]), np.array([collapsed])))
    if not collapsed:
        assert_same(*both(lp, v, np.array([col])))
    # All edge rows in one chunk, padded to one width: row by row as in the vectorised batch.
    width = max(len(r) for r, _ in EDGE_ROWS.values())
    batch = np.full((len(EDGE_ROWS), width), NAN)
    for i, (r, _) in enumerate(EDGE_ROWS.values()):
        batch[i, : len(r)] = r
    cols = np.array([c for _, c in EDGE_ROWS.values()])
    assert_same(*both(batch, v, cols, np.full(len(EDGE_ROWS), collapsed)))


def test_small_path_all_nan_row_values():
    small, _ = both(np.full((1, 3), NAN), 1000, np.array([0]))
    assert small is not None
    assert small.n_known[0] == 0 and small.lower[0] == 0.0 and small.upper[0] == pytest.approx(math.log(1000))
    assert small.point[0] == pytest.approx(0.5 * math.log(1000)) and small.tail_mass[0] == 1.0


def test_dispatch_by_row_count_and_width(monkeypatch):
    calls: list[str] = []
    small, vec = ent._estimate_small, ent._estimate_vectorised
    monkeypatch.setattr(ent, "_estimate_small", lambda *a: calls.append("small") or small(*a))
    monkeypatch.setattr(ent, "_estimate_vectorised", lambda *a: calls.append("vec") or vec(*a))
    lp = np.log(np.full((ent._SMALL_MAX_ROWS + 1, 4), 0.2))
    estimate_positions(lp[:1], 1000)
    estimate_positions(lp[: ent._SMALL_MAX_ROWS], 1000)
    assert calls == ["small", "small"]
    calls.clear()
    estimate_positions(lp, 1000)  # too many rows
    estimate_positions(np.log(np.full((1, ent._TABLE_MAX_N + 1), 0.001)), 100_000)  # too wide for the table
    estimate_positions(np.zeros((0, 4)), 1000)
    assert calls == ["vec", "vec", "vec"]
    calls.clear()
    # Optional arrays of another shape: the vectorised path's own broadcasting (a scalar `collapsed`).
    est = estimate_positions(lp[:2], 1000, collapsed=np.bool_(True))
    assert calls == ["small", "vec"]
    assert_same(ent._estimate_small(lp[:2], 1000, None, np.array([True, True])), est)
