"""ONE real vLLM (CPU build, SmolLM2-135M-Instruct, float32) per test session.

``vllm_server`` yields its base URL without ``/v1``. With ``ENTROPY_PROXY_TEST_VLLM_URL`` set, that running
server is used and nothing is started, once it has proved to be a vLLM serving ``smollm2`` (else the run
fails). Otherwise, as soon as collection finds a selected test that uses the fixture, vLLM is spawned in the
background so its warm-up (about 40 s) overlaps the fast tiers; the fixture waits for it.

If vLLM cannot be started: under CI (``CI=1``, ``true`` or ``yes``) the tests fail (a CI run must never
silently skip the real tier); elsewhere they are skipped with the reason, which says how to set it up
(``scripts/setup-vllm.sh``). Tests that use the fixture are marked ``vllm`` automatically (``-m "not vllm"``
deselects them outside CI) and get a timeout long enough to include the first start.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.localvllm import LocalVLLM, VLLMStartError
from tests.plugins.ci_guard import unavailable as ci_unavailable

ENV_URL = "ENTROPY_PROXY_TEST_VLLM_URL"
MODEL = "smollm2"  # the served name the tier's tests and fixtures are written for (scripts/setup-vllm.sh)
FIXTURE = "vllm_server"
STARTUP_TIMEOUT = 420.0  # seconds; about 40 s on an idle 2-core machine, far more while the tiers share it
TEST_TIMEOUT = STARTUP_TIMEOUT + 180.0
LOG = Path(__file__).resolve().parents[2] / "test-artifacts" / "vllm-server.log"

_server: LocalVLLM | None = None


def unavailable(reason: str) -> None:
    """Fail under CI, skip elsewhere."""
    ci_unavailable(f"real vLLM not available: {reason}")


def _uses_vllm(item: pytest.Item) -> bool:
    return FIXTURE in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _uses_vllm(item):
            item.add_marker(pytest.mark.vllm)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(TEST_TIMEOUT))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Spawn vLLM early (no waiting) when a selected test will need it."""
    global _server
    if os.environ.get(ENV_URL) or session.config.option.collectonly:
        return
    if not any(_uses_vllm(item) for item in session.items):
        return
    server = LocalVLLM(log_path=LOG, startup_timeout=STARTUP_TIMEOUT)
    try:
        server.spawn()
    except VLLMStartError:
        return  # the fixture retries and reports the reason to the tests that need it
    _server = server


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _server
    if _server is not None:
        _server.stop()
        _server = None


def _json(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return None


def _external(url: str) -> str:
    """The given server's base URL, once it has shown itself to be a vLLM serving the tier's model: its
    ``/version`` names a version and its ``/v1/models`` lists ``smollm2``. Anything else fails the run (a tier
    that passes against some other OpenAI-compatible server would claim what it did not test)."""
    base = url.rstrip("/").removesuffix("/v1")
    try:
        version = httpx.get(base + "/version", timeout=10.0)
        models = httpx.get(base + "/v1/models", timeout=10.0)
    except httpx.HTTPError as e:
        unavailable(f"{ENV_URL}={url} does not answer: {e!r}")
    problems = []
    v = _json(version)
    if version.status_code != 200 or not isinstance(v, dict) or not re.fullmatch(r"\d+\.\d+\S*",
                                                                                  str(v.get("version", ""))):
        problems.append(f"GET /version answered {version.status_code} {version.text[:200]!r}, not a vLLM version")
    m = _json(models)
    ids = [d.get("id") for d in m.get("data", ()) if isinstance(d, dict)] if isinstance(m, dict) else []
    if models.status_code != 200 or MODEL not in ids:
        problems.append(f"GET /v1/models answered {models.status_code} listing {ids}, not {MODEL!r}")
    if problems:
        pytest.fail(f"{ENV_URL}={url} is not the vLLM the real tier is written for: " + "; ".join(problems),
                    pytrace=False)
    return base


@pytest.fixture(scope="session")
def vllm_server() -> Iterator[str]:
    """Base URL (``http://127.0.0.1:PORT``, no ``/v1``) of the session's real vLLM."""
    global _server
    if os.environ.get(ENV_URL):
        yield _external(os.environ[ENV_URL])
        return
    if _server is None:
        _server = LocalVLLM(log_path=LOG, startup_timeout=STARTUP_TIMEOUT)
    try:
        _server.wait_ready()
    except VLLMStartError as e:
        _server.stop()
        unavailable(str(e))
    yield _server.base_url
    # Stopped in pytest_sessionfinish: a session fixture's teardown and the session end coincide anyway.


@pytest.fixture(scope="session")
def vllm_model(vllm_server: str) -> str:
    """The served model name: ``smollm2``, which the session's vLLM (local, or external once proved) serves."""
    r = httpx.get(vllm_server + "/v1/models", timeout=10.0)
    r.raise_for_status()
    ids = [str(d["id"]) for d in r.json()["data"]]
    return MODEL if MODEL in ids else ids[0]
