"""The semantic-entropy benchmark's data and scoring (the figures come from `python -m bench.semantic`)."""

from __future__ import annotations

import pytest

from bench.semantic import ANSWERS, QUESTIONS, analyse, is_correct, load_jsonl


def test_question_set_is_labelled_and_sourced() -> None:
    qs = load_jsonl(QUESTIONS)
    assert len(qs) >= 300
    assert len({q["id"] for q in qs}) == len(qs)
    assert len({q["question"] for q in qs}) == len(qs)
    assert {q["kind"] for q in qs} == {"capital", "symbol", "add", "mul"}
    for q in qs:
        assert q["gold"] and q["source"]
        if q["kind"] in ("add", "mul"):
            a, op, b = q["question"].removeprefix("What is ").removesuffix("?").split(" ")
            assert int(q["gold"]) == (int(a) + int(b) if op == "+" else int(a) * int(b))


@pytest.mark.parametrize(("kind", "gold", "aliases", "answer", "ok"), [
    ("capital", "Bogotá", [], "The capital of Colombia is Bogota.", True),
    ("capital", "Washington D.C.", ["Washington"], "Washington, D.C.", True),
    ("capital", "Nur-Sultan", ["Astana"], "Astana is the capital.", True),
    ("capital", "Paris", [], "Lyon, not Parisian at all", False),
    ("symbol", "Fe", [], "The chemical symbol of iron is Fe.", True),
    ("symbol", "Fe", [], "Iron's symbol is F.", False),
    ("add", "97", [], "42 + 55 = 97.", True),
    ("add", "97", [], "42 + 55 = 96. Not 97? No: 96", False),
    ("mul", "1200", [], "It is 1,200", True),
])
def test_normalised_match(kind: str, gold: str, aliases: list[str], answer: str, ok: bool) -> None:
    assert is_correct({"kind": kind, "gold": gold, "aliases": aliases}, answer) is ok


@pytest.mark.slow
def test_analysis_runs_on_the_cached_answers() -> None:
    """The analysis over the first cached answers, with the real packaged embedding model: every score is
    reported with an interval around it."""
    answers = load_jsonl(ANSWERS)[:40]
    assert len(answers) == 40
    result = analyse(load_jsonl(QUESTIONS), answers, n_boot=100)
    assert result["questions"] == 40
    names = [row["score"] for row in result["table"]]
    assert "SE, 5 samples, embeddings + number guard (CV threshold)" in names
    assert "combination: logistic(token scores + SE 10), 5-fold CV" in names
    for row in result["table"]:
        assert 0.0 <= row["ci"][0] <= row["auroc"] <= row["ci"][1] <= 1.0, row
    assert result["cost"]["extra_tokens_10_mean"] > result["cost"]["extra_tokens_5_mean"] > 0
