"""Shared test set-up: fixtures live in tests/plugins/ by area."""

import os

import pytest

pytest_plugins = ["tests.plugins.ci_guard", "tests.plugins.servers", "tests.plugins.recorded", "pytester"]
for _optional in ("vllm_server", "postgres", "prometheus"):
    if os.path.exists(os.path.join(os.path.dirname(__file__), "plugins", f"{_optional}.py")):
        pytest_plugins.append(f"tests.plugins.{_optional}")

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture
def fixtures_dir() -> str:
    return FIXTURES
