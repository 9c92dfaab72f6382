"""The CI guards of ``tests/plugins/ci_guard.py`` and the tiers' "fail, don't skip" rule, run in child pytest
sessions (``pytester``) so that a regression in them cannot hide behind the session that tests them."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CI_VALUES = ["1", "true", "yes", "Yes"]


@pytest.fixture
def child(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.Pytester:
    """A child session that loads the project's guard (and the given tiers) with an empty PATH and no CI."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # the child needs none of them; each costs start-up
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # neither prometheus nor promtool can be found
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("ENTROPY_PROXY_TEST_VLLM_URL", raising=False)
    pytester.makeconftest(
        'pytest_plugins = ["tests.plugins.ci_guard", "tests.plugins.prometheus", "tests.plugins.vllm_server"]\n')
    return pytester


def _run(p: pytest.Pytester, *args: str) -> pytest.RunResult:
    return p.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly", *args)


TIERS = """
from tests.test_rules import promtool

def test_prometheus_tier(prometheus_bin):
    pass

def test_promtool_tier():
    promtool()

def test_ci_is_normalised():
    import os
    assert os.environ.get("CI") in (None, "true")
"""


@pytest.mark.parametrize("ci", CI_VALUES)
def test_every_ci_value_makes_the_prometheus_and_promtool_tiers_fail(child, monkeypatch, ci):
    child.makepyfile(test_tiers=TIERS)
    monkeypatch.setenv("CI", ci)
    r = _run(child)
    r.assert_outcomes(passed=1, failed=1, errors=1)  # the prometheus_bin fixture errors, promtool() fails
    assert r.ret == pytest.ExitCode.TESTS_FAILED
    r.stdout.fnmatch_lines(["*prometheus is not on PATH*CI: failing, not skipping*"])


def test_without_ci_the_tiers_skip_and_the_run_passes(child):
    child.makepyfile(test_tiers=TIERS)
    r = _run(child)
    r.assert_outcomes(passed=1, skipped=2)
    assert r.ret == pytest.ExitCode.OK


@pytest.mark.parametrize("narrowing", [["-m", "not slow"], ["-k", "one"], ["--deselect", "test_sel.py::test_two"]])
def test_a_ci_run_that_leaves_tests_out_fails(child, monkeypatch, narrowing):
    child.makepyfile(test_sel="def test_one():\n    pass\n\ndef test_two():\n    pass\n")
    monkeypatch.setenv("CI", "true")
    r = _run(child, *narrowing)
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    r.stderr.fnmatch_lines([f"*CI runs the whole suite: {narrowing[0]}*"])
    monkeypatch.delenv("CI")
    assert _run(child, *narrowing).ret == pytest.ExitCode.OK  # outside CI selecting is fine


SKIPS = {
    "test_skips": """
import pytest

def test_passes():
    pass

def test_skips():
    pytest.skip("some reason")

@pytest.mark.xfail(reason="known", strict=True)
def test_xfails():
    assert False
""",
    "test_optional": """
import pytest

pytest.importorskip("no_such_optional_extra")

def test_never_runs():
    pass
""",
}


def test_a_ci_run_with_any_skip_fails(child, monkeypatch):
    child.makepyfile(**SKIPS)
    monkeypatch.setenv("CI", "yes")
    r = _run(child)
    assert r.ret == pytest.ExitCode.TESTS_FAILED
    r.stdout.fnmatch_lines(["*CI: a skipped test fails the run*", "*skipped under CI: test_optional.py*",
                            "*skipped under CI: test_skips.py::test_skips*"])
    monkeypatch.delenv("CI")
    assert _run(child).ret == pytest.ExitCode.OK


def test_an_xfail_is_not_a_skip(child, monkeypatch):
    child.makepyfile(test_x=SKIPS["test_skips"].replace('pytest.skip("some reason")', "pass"))
    monkeypatch.setenv("CI", "1")
    r = _run(child)
    r.assert_outcomes(passed=2, xfailed=1)
    assert r.ret == pytest.ExitCode.OK


# -- ENTROPY_PROXY_TEST_VLLM_URL must be a vLLM serving smollm2 -------------------------------------------------
def _server(routes: dict[str, tuple[int, object]]) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            status, body = routes.get(self.path, (404, {"detail": "Not Found"}))
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


VLLM_TEST = "def test_tier(vllm_server):\n    assert vllm_server.startswith('http://127.0.0.1:')\n"
MODELS = {"object": "list", "data": [{"id": "smollm2", "object": "model", "max_model_len": 2048}]}


@pytest.mark.parametrize(("routes", "why"), [
    ({"/v1/models": (200, MODELS)}, "GET /version answered 404"),  # an OpenAI-compatible server, not vLLM
    ({"/version": (200, {"version": "0.32.0"}), "/v1/models": (200, {"data": [{"id": "llama"}]})}, "not 'smollm2'"),
    ({"/version": (200, {"version": "dev"}), "/v1/models": (200, MODELS)}, "not a vLLM version"),
])
def test_a_vllm_url_that_is_not_a_vllm_serving_smollm2_fails_the_run(child, monkeypatch, routes, why):
    child.makepyfile(test_v=VLLM_TEST)
    for url in _server(routes):
        monkeypatch.setenv("ENTROPY_PROXY_TEST_VLLM_URL", url)
        r = _run(child)  # outside CI too: a URL given on purpose and wrong is an error, not a reason to skip
        r.assert_outcomes(errors=1)
        r.stdout.fnmatch_lines([f"*is not the vLLM the real tier is written for*{why}*"])


def test_a_vllm_url_that_proves_itself_is_used(child, monkeypatch):
    child.makepyfile(test_v=VLLM_TEST)
    for url in _server({"/version": (200, {"version": "0.32.0"}), "/v1/models": (200, MODELS)}):
        monkeypatch.setenv("ENTROPY_PROXY_TEST_VLLM_URL", url + "/v1")
        r = _run(child)
        r.assert_outcomes(passed=1)
