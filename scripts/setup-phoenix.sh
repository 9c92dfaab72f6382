#!/usr/bin/env bash
# Create .venv-phoenix/ with Arize Phoenix, the OpenTelemetry receiver that the `phoenix` test tier exports spans
# to and reads them back from. Idempotent: skipped when the pinned version is already installed.
#
#   scripts/setup-phoenix.sh         # env: PYTHON (default python3), PHOENIX_VENV
#
# Phoenix lives in its own environment (about 850 MB) because it pins its own fastapi, starlette, sqlalchemy and
# OpenTelemetry versions; the proxy's runtime (.venv) never imports it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PHOENIX_VENV:-$REPO/.venv-phoenix}"
PY="$VENV/bin/python"
PHOENIX_VERSION="${PHOENIX_VERSION:-20.26.1}"

say() { printf 'setup-phoenix: %s\n' "$*"; }
started=$SECONDS

if [[ ! -x "$PY" ]]; then
    say "creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
fi

installed="$("$PY" -c 'import importlib.metadata as m; print(m.version("arize-phoenix"))' 2>/dev/null || true)"
if [[ "$installed" == "$PHOENIX_VERSION" && -x "$VENV/bin/phoenix" ]]; then
    say "arize-phoenix $installed already installed"
else
    say "installing arize-phoenix==$PHOENIX_VERSION (a few minutes, about 850 MB)"
    "$PY" -m pip install --quiet "arize-phoenix==$PHOENIX_VERSION"
fi
say "ready in $((SECONDS - started)) s: $VENV/bin/phoenix"
