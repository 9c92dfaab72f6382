from collections import Counter

import numpy as np
import pytest

from monitors.forking import forking_stats
from monitors.planning import PlanningClassifier, SemanticGramWindow, load_lexicon

from .synthetic import tokenize


def test_default_lexicon_loads() -> None:
    lex = load_lexicon()
    assert len(lex) > 50 and "let's try a different approach" in lex
    assert all(not p.startswith("#") and 2 <= len(p.split()) <= 6 for p in lex)


def test_token_mask_follows_the_match(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pc = PlanningClassifier(["let's try a different approach", "we can use the fact that"])
    tokens = ["Hmm", ".", " Let", "\u2019s", " try", " a", " different", "  approach", ":", " x", "=", "2"]
    mask, grams = pc.classify(tokens)
    assert mask.tolist() == [False, False, True, True, True, True, True, True, False, False, False, False]
    assert grams == Counter({"let's try a different approach": 1})
    # word boundaries: a phrase inside a longer word does not match
    assert not pc.classify(["xlet's try a different approaches"])[0].any()
    f = tmp_path / "lex.txt"
    f.write_text("# comment\n\nsolve for x now\n")
    assert load_lexicon(str(f)) == ["solve for x now"]
    f.write_text("# only comments\n")
    with pytest.raises(ValueError):
        load_lexicon(str(f))


def test_mask_is_independent_of_token_split() -> None:
    pc = PlanningClassifier(load_lexicon())
    text = "First compute 3 squared. Let me double check the sum: it is 9. So the answer is 9."
    for t in (10, 25, 60):
        toks = tokenize(text, t)
        mask, grams = pc.classify(toks)
        covered = "".join(tok for tok, m in zip(toks, mask, strict=True) if m).lower()
        assert "let me double check" in covered and "so the answer is" in covered
        assert sum(grams.values()) == 2


def test_semantic_gram_entropy_window() -> None:
    w = SemanticGramWindow(window=4)
    assert w.entropy() is None
    w.update(Counter({"a": 1}))
    w.update(Counter({"b": 1}))
    assert w.entropy() == pytest.approx(np.log(2))
    for _ in range(4):
        w.update(Counter({"a": 2}))
    assert w.entropy() == 0.0 and w.planning_responses() == 4


def test_forking_stats() -> None:
    h = np.array([0.0, 0.005, 0.2, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0])
    fs = forking_stats(h, 0.672)
    assert fs.fraction == pytest.approx(0.3)
    assert fs.mean_forking == pytest.approx(2.0) and fs.mean_rest == pytest.approx(0.205 / 7)
    assert fs.near_zero == pytest.approx(0.6)
    assert fs.top20_mean == pytest.approx(2.5)  # ceil(0.2 * 10) = 2 largest: 3.0, 2.0
    empty = forking_stats(np.array([]), 0.5)
    assert empty.fraction is None and empty.tokens == 0
    assert forking_stats(np.zeros(4), 0.5).mean_forking is None
