"""House style held by the suite: ruff (E, F, I, B, UP) over the tree and mypy --strict over monitors/."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing() -> None:
    r = _run("ruff", "check", ".")
    assert r.returncode == 0, r.stdout + r.stderr


def test_monitors_are_strictly_typed() -> None:
    r = _run("mypy", "monitors")
    assert r.returncode == 0, r.stdout + r.stderr
