"""Property tests: the bounds hold for any top-K list cut from any distribution, the way vLLM cuts it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from monitors import entropy as ent
from monitors.entropy import estimate_positions

TOL = 1e-9  # float64 rounding in exp(log p) and in 1 - sum(p)


@dataclass
class Row:
    p: np.ndarray  # the full distribution over the vocabulary
    logprobs: np.ndarray  # (W,) the listed entries, NaN-padded, -9999 for p = 0
    sampled_col: int
    collapsed: bool

    @property
    def exact(self) -> float:
        q = self.p[self.p > 0]
        return float(-(q * np.log(q)).sum())


@st.composite
def distributions(draw: st.DrawFn) -> np.ndarray:
    kind = draw(st.sampled_from(["weights", "gauss", "zipf"]))
    if kind == "weights":
        w = np.array(draw(st.lists(
            st.floats(0.0, 1e3, allow_subnormal=False) | st.just(0.0), min_size=1, max_size=40
        )))
        if w.sum() <= 0:
            w[0] = 1.0
    else:
        v = draw(st.integers(1, 3000))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        if kind == "gauss":
            z = rng.normal(0.0, draw(st.floats(0.05, 10.0)), v)
            spikes = draw(st.integers(0, 5))  # a few context-driven outliers above the bulk
            z[:spikes] += rng.uniform(0.0, 15.0, min(spikes, v))
            w = np.exp(z - z.max())
        else:
            w = np.arange(1, v + 1, dtype=np.float64) ** -draw(st.floats(0.2, 4.0))
        n_zero = draw(st.integers(0, v - 1))  # masked tokens: probability exactly 0
        w[rng.permutation(v)[:n_zero]] = 0.0
        rng.shuffle(w)
    p = w / w.sum()
    return p.astype(np.float64)


@st.composite
def topk_rows(draw: st.DrawFn, allow_collapse: bool = True) -> Row:
    p = draw(distributions())
    v = p.size
    k = draw(st.integers(1, min(v, 25)))
    order = np.argsort(-p, kind="stable")
    mode = draw(st.sampled_from(["unknown", "sampled_in", "sampled_out"]))
    listed = list(order[:k])
    col_token = -1
    if mode == "sampled_out":
        below = [int(i) for i in order[k:] if p[i] > 0]
        if below:  # vLLM: the sampled token plus the top K-1
            col_token = draw(st.sampled_from(below))
            listed = [col_token, *order[: k - 1]]
        else:
            mode = "sampled_in"
    if mode == "sampled_in":
        inside = [int(i) for i in order[:k] if p[i] > 0]
        col_token = draw(st.sampled_from(inside))
    collapsed = allow_collapse and len(listed) > 1 and draw(st.booleans())
    if collapsed:  # a duplicate token string overwrote one entry: any entry may be gone
        listed.pop(draw(st.integers(0, len(listed) - 1)))
    perm = draw(st.permutations(range(len(listed))))
    listed = [listed[i] for i in perm]
    width = len(listed) + draw(st.integers(0, 3))
    lp = np.full(width, np.nan)
    with np.errstate(divide="ignore"):
        lp[: len(listed)] = np.maximum(np.log(p[listed]), -9999.0)
    col = listed.index(col_token) if col_token in listed else -1
    return Row(p, lp, col, collapsed)


def _estimate(rows: list[Row], vocab_size: int | None = None):
    width = max(r.logprobs.size for r in rows)
    lp = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        lp[i, : r.logprobs.size] = r.logprobs
    v = vocab_size if vocab_size is not None else rows[0].p.size
    return estimate_positions(
        lp, v, sampled_col=np.array([r.sampled_col for r in rows]),
        collapsed=np.array([r.collapsed for r in rows]),
    )


@settings(max_examples=300, deadline=None)
@given(topk_rows())
def test_bounds_contain_the_exact_entropy(row):
    est = _estimate([row])
    assert est.lower[0] <= row.exact + TOL
    assert row.exact <= est.upper[0] + TOL
    assert est.lower[0] <= est.point[0] <= est.upper[0]
    assert 0.0 <= est.tail_mass[0] <= 1.0
    assert est.n_known[0] == np.count_nonzero(~np.isnan(row.logprobs))


@settings(max_examples=100, deadline=None)
@given(topk_rows(), st.integers(0, 10_000))
def test_a_larger_vocab_size_keeps_the_bounds(row, extra):
    est = _estimate([row], row.p.size + extra)
    assert est.lower[0] <= row.exact + TOL <= est.upper[0] + 2 * TOL
    assert est.lower[0] <= est.point[0] <= est.upper[0]


@settings(max_examples=150, deadline=None)
@given(topk_rows(), st.randoms(use_true_random=False))
def test_permuting_columns_changes_nothing(row, rnd):
    n = row.logprobs.size
    perm = list(range(n))
    rnd.shuffle(perm)
    moved = Row(row.p, row.logprobs[perm], perm.index(row.sampled_col) if row.sampled_col >= 0 else -1,
                row.collapsed)
    a, b = _estimate([row]), _estimate([moved])
    for f in ("point", "lower", "upper", "tail_mass", "top1_prob", "margin", "n_known"):
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(topk_rows(), min_size=2, max_size=8).filter(lambda rs: len({r.p.size for r in rs}) == 1)
       | st.builds(lambda r, n: [r] * n, topk_rows(), st.integers(2, 5)))
def test_rows_are_independent(rows):
    together = _estimate(rows)
    for i, r in enumerate(rows):
        alone = _estimate([r])
        for f in ("point", "lower", "upper"):
            assert math.isclose(getattr(together, f)[i], getattr(alone, f)[0], rel_tol=1e-12, abs_tol=1e-12)


@settings(deadline=None)
@given(st.integers(1, 30), st.integers(0, 5000), st.integers(-1, 29), st.integers(0, 3))
def test_uniform_over_k_tokens_is_log_k(k, extra_vocab, col, pad):
    lp = np.concatenate([np.full(k, -math.log(k)), np.full(pad, np.nan)])[None, :]
    est = estimate_positions(lp, k + extra_vocab, sampled_col=np.array([col if col < k else -1]))
    for a in (est.point, est.lower, est.upper):
        assert math.isclose(a[0], math.log(k), rel_tol=1e-12, abs_tol=1e-12)


@settings(deadline=None)
@given(distributions(), st.randoms(use_true_random=False), st.integers(0, 1000))
def test_fully_known_rows_are_exact(p, rnd, extra_vocab):
    nz = [i for i in range(p.size) if p[i] > 0]
    rnd.shuffle(nz)
    lp = np.log(p[nz])[None, :]
    q = p[nz]
    h = float(-(q * np.log(q)).sum())
    est = estimate_positions(lp, p.size + extra_vocab, sampled_col=np.array([rnd.randrange(len(nz))]))
    for a in (est.point, est.lower, est.upper):
        assert math.isclose(a[0], h, rel_tol=1e-9, abs_tol=1e-9)


# -- the scalar path (up to _SMALL_MAX_ROWS rows, one stream chunk) gives the vectorised path's numbers ---------

FIELDS = ("point", "lower", "upper", "tail_mass", "top1_prob", "margin", "n_known")
SPECIAL = st.sampled_from([math.nan, -9999.0, -1e4, -math.inf, math.inf, 0.0, -0.0, -1e-17, 1e-12, 800.0])
ENTRY = (
    SPECIAL
    | st.floats(-40.0, 0.0)
    | st.floats(-800.0, -700.0)  # exp underflows to subnormals and 0
    | st.floats(-5.0, 5.0)  # logits mode
    | st.sampled_from([math.log(0.5), math.log(0.25), math.log(0.125)])  # exact ties
)
VOCAB = st.sampled_from([1, 2, 3, 7, 50, 1000, 49152, 262_144]) | st.integers(1, 12)  # few tables to build


def _same(lp: np.ndarray, v: int, cols: np.ndarray | None, coll: np.ndarray | None) -> None:
    small = ent._estimate_small(lp, v, cols, coll)
    vec = ent._estimate_vectorised(lp, v, cols, coll)
    assert small is not None
    for f in FIELDS:
        a, b = getattr(small, f), getattr(vec, f)
        assert a.shape == b.shape == (lp.shape[0],) and a.dtype == b.dtype
        assert np.isfinite(a).all(), f
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9, err_msg=f)


@settings(max_examples=250, deadline=None)
@given(st.lists(topk_rows(), min_size=1, max_size=ent._SMALL_MAX_ROWS), st.sampled_from([0, 3000, 49152, 262_144]))
def test_small_path_equals_vectorised_on_topk_rows(rows, vocab):
    width = max(r.logprobs.size for r in rows)
    lp = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        lp[i, : r.logprobs.size] = r.logprobs
    v = max(vocab, *(r.p.size for r in rows))  # mostly a few fixed sizes: each new V costs a table
    _same(lp, v, np.array([r.sampled_col for r in rows]), np.array([r.collapsed for r in rows]))
    _same(lp, v, None, None)


@settings(max_examples=400, deadline=None)
@given(
    st.integers(1, ent._SMALL_MAX_ROWS).flatmap(lambda t: st.tuples(
        st.lists(st.lists(ENTRY, min_size=1, max_size=ent._TABLE_MAX_N), min_size=t, max_size=t),
        st.lists(st.integers(-2, 30), min_size=t, max_size=t),
        st.lists(st.booleans(), min_size=t, max_size=t) | st.none(),
    )),
    VOCAB,
)
def test_small_path_equals_vectorised_on_any_row(data, v):
    rows, cols, coll = data
    width = max(len(r) for r in rows)
    lp = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        lp[i, : len(r)] = r
    _same(lp, v, np.array(cols), None if coll is None else np.array(coll))
