"""What a CI run must not do quietly: skip a tier, select a subset, or test against something that is not vLLM.

Under CI (the ``CI`` variable set to ``1``, ``true`` or ``yes``, any case — what CI services set):

- ``CI`` is rewritten to ``true`` at start-up, so every tier's own "fail, don't skip, under CI=true" check and
  every child process agree on what CI means;
- a run given ``-m``, ``-k`` or ``--deselect`` stops with a usage error: CI runs the whole suite;
- a run in which any test was skipped fails (exit status 1), whatever the test's own reason.

Tiers call :func:`unavailable` when their server or tool is missing: it fails under CI and skips elsewhere.
``tests/test_ci_guards.py`` holds these rules with ``pytester``.
"""

from __future__ import annotations

import os

import pytest

CI_VALUES = ("1", "true", "yes")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in CI_VALUES


def unavailable(reason: str) -> None:
    """Fail under CI (a CI run never passes by skipping a real tier), skip elsewhere."""
    if in_ci():
        pytest.fail(f"{reason} (CI: failing, not skipping)", pytrace=False)
    pytest.skip(reason)


def pytest_configure(config: pytest.Config) -> None:
    if not in_ci():
        return
    os.environ["CI"] = "true"
    narrowed = [flag for flag, value in (("-m", config.option.markexpr), ("-k", config.option.keyword),
                                         ("--deselect", config.option.deselect)) if value]
    if narrowed:
        raise pytest.UsageError(
            f"CI runs the whole suite: {', '.join(narrowed)} would leave tests out (unset CI to select tests)")
    config.pluginmanager.register(_SkipsFail(), "ci_guard_skips")


class _SkipsFail:
    """Counts skipped tests (xfail aside) and turns a passing CI run that had any into a failed one."""

    def __init__(self) -> None:
        self.skipped: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            self.skipped.append(report.nodeid)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:  # a module-level skip (pytest.skip(allow_module_level=True), importorskip)
            self.skipped.append(report.nodeid)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.skipped and exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.skipped:
            terminalreporter.section("CI: a skipped test fails the run")
            for nodeid in self.skipped:
                terminalreporter.line(f"skipped under CI: {nodeid}")
