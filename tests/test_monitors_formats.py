import math

import numpy as np
import pytest

from monitors.formats import FORMATS, FormatMix, classify_format, shannon_entropy

from .synthetic import formatted


@pytest.mark.parametrize(
    ("text", "finish", "label"),
    [
        ("", "tool_calls", "tool_call"),
        ('<tool_call>{"name": "f"}</tool_call>', None, "tool_call"),
        ('{"name": "search", "arguments": {"q": "x"}}', None, "tool_call"),
        ('{"answer": 4}', None, "json"),
        ('```json\n[1, 2, 3]\n```', None, "json"),
        ("Use this:\n```python\nprint(1)\n```", None, "code"),
        ("| a | b |\n|---|---|\n| 1 | 2 |", None, "table"),
        ("So the answer is $\\boxed{4}$.", None, "latex"),
        ("$$x^2$$", None, "latex"),
        ("Steps:\n- one\n- two", None, "list"),
        ("1. first\n2. second", None, "list"),
        ("Just a sentence. And another - with a dash.", None, "prose"),
        ("{not json", None, "prose"),
    ],
)
def test_classify(text: str, finish: str | None, label: str) -> None:
    assert classify_format(text, finish) == label


def test_synthetic_formats_round_trip() -> None:
    rng = np.random.default_rng(0)
    for fmt in ("code", "json", "list", "latex", "prose"):
        assert classify_format(formatted(rng, fmt)) == fmt


def test_entropy_of_mix_and_collapse_to_one_format() -> None:
    assert shannon_entropy({"a": 1, "b": 1}) == pytest.approx(math.log(2))
    assert shannon_entropy({}) == 0.0
    mix = FormatMix(window=100)
    for i in range(100):
        mix.update(FORMATS[i % 7])
    assert mix.entropy() == pytest.approx(math.log(7), abs=0.01)
    def collapsed() -> bool:
        mix.update("code")
        return (mix.entropy() or 0) < 0.5 * math.log(7)

    n = next(i for i in range(1, 200) if collapsed())
    assert 60 <= n <= 80  # measured: 74 responses of a 100-response window
    for _ in range(100):
        mix.update("code")
    assert mix.entropy() == 0.0 and mix.shares() == {"code": 1.0}
