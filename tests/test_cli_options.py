"""The ``entropy-proxy`` command line as users type it: a group's options also after the sub-command
(``entropy-proxy audit report --config FILE``, as with git and kubectl), and files written only where asked."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from proxy.cli import build_parser, main
from tests.test_audit_cli import _seed


@pytest.fixture
def url(tmp_path: Path) -> str:
    u = f"sqlite:///{tmp_path}/audit.db"
    _seed(u)
    return u


@pytest.fixture
def config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"upstream: http://127.0.0.1:9\naudit:\n  url: {url}\n")
    return path


def _ids(out: str) -> list[str]:
    return [ln.split()[0] for ln in out.splitlines() if ln.strip()]


@pytest.mark.parametrize("order", ["before", "after", "mixed"])
def test_audit_options_before_or_after_the_sub_command(order: str, config: Path, url: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    argv = {"before": ["audit", "--config", str(config), "list", "--limit", "2"],
            "after": ["audit", "list", "--limit", "2", "--config", str(config)],
            "mixed": ["audit", "--config", "/nonexistent.yaml", "list", "--url", url, "--limit", "2"]}[order]
    assert main(argv) == 0
    assert _ids(capsys.readouterr().out) == ["r-new", "r-unsure"]


def test_audit_report_config_after_the_sub_command(config: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "out" / "rel.png"
    png.parent.mkdir()
    assert main(["audit", "report", "--config", str(config), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "r-bad" in out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_later_value_wins_and_an_unset_one_keeps_the_earlier(config: Path, url: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["audit", "--url", url, "list"])
    assert args.url == url and args.config is None  # not given after: the group's value stays
    args = build_parser().parse_args(["audit", "--url", "sqlite:///a.db", "list", "--url", url])
    assert args.url == url


def test_audit_report_writes_no_file_unasked(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(["audit", "report", "--url", url]) == 0
    assert list(cwd.iterdir()) == []
    assert "--png" in capsys.readouterr().out  # says how to get the diagram


def _groups(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, dict[str,
                                                                                             argparse.ArgumentParser]]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            out.append((parser.prog, parser, dict(action.choices)))
            for child in action.choices.values():
                out.extend(_groups(child))
    return out


def test_every_sub_command_accepts_its_groups_options() -> None:
    # Walks the real parser, so sub-commands added later (by any module) are held to the same rule.
    groups = [g for g in _groups(build_parser()) if g[0] != "entropy-proxy"]
    assert any(prog.endswith("audit") for prog, _, _ in groups)
    for prog, parent, children in groups:
        options = [s for a in parent._actions if a.option_strings and a.dest != "help" for s in a.option_strings]
        for name, child in children.items():
            missing = [o for o in options if o not in child._option_string_actions]
            assert not missing, f"{prog} {name} does not accept {missing} after the sub-command"
