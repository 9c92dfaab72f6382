"""Record real vLLM completions whose ``top_logprobs`` dicts merged tokens that decode alike, with exact entropies.

The completions API keys each position's ``top_logprobs`` by decoded string; SmolLM2's byte-level tokens that
hold part of a multi-byte character all decode to "\\ufffd" (or to "" after vLLM's context correction), so prompts
that make the model write emoji or CJK text give positions where tokens merged. Each request is sent twice with the
same seed: as a client sends it (string keys: what the proxy reads) and with ``return_tokens_as_token_ids`` (one
key per token id: what was merged away). The generated ids are then teacher-forced through the same weights
(``bench.exact_entropy.Scorer``, float32) for the exact full-vocabulary entropy of every position.

Run from the repository root with the vLLM environment (torch and transformers), against a running vLLM::

    .venv-vllm/bin/python -m bench.exact_merged --vllm http://127.0.0.1:8011 [--out tests/fixtures/exact-merged]

A response is kept only if at least one of its positions lost a token to a merge. The test that reads the
result: ``tests/test_estimator_merged.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.exact_entropy import MODEL_DIR, Scorer

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "exact-merged"
K = 20
PROMPTS = [
    "Reply with a row of ten different emoji and nothing else: ",
    "Write the Chinese characters for 'good morning, friend' three times: ",
    "Some Japanese: こんにちは、元気ですか？ Continue the conversation in Japanese: ",
    "Emoji story: 🐶🏠🌧️ then ",
]


def _ids(tokens: list[str]) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in tokens]


def record(client: httpx.Client, url: str, prompt: str, seed: int, scorer: Scorer, k: int = K) -> dict[str, Any] | None:
    req = {"model": "smollm2", "prompt": prompt, "max_tokens": 40, "temperature": 1.0, "top_p": 1.0,
           "seed": seed, "logprobs": k}
    plain = client.post(url + "/v1/completions", json=req).json()
    by_id = client.post(url + "/v1/completions", json={**req, "return_tokens_as_token_ids": True,
                                                       "return_token_ids": True}).json()
    lp_s, lp_i = plain["choices"][0]["logprobs"], by_id["choices"][0]["logprobs"]
    gen = _ids(lp_i["tokens"])
    if len(lp_s["tokens"]) != len(gen) or lp_s["token_logprobs"] != lp_i["token_logprobs"]:
        return None  # the two samples differ: the seed did not reproduce the same sequence
    merged = [j for j, (a, b) in enumerate(zip(lp_s["top_logprobs"], lp_i["top_logprobs"], strict=True))
              if len(a) < len(b)]
    if not merged:
        return None
    prompt_ids = [int(t) for t in by_id["prompt_token_ids"]] if by_id.get("prompt_token_ids") else None
    if prompt_ids is None:
        prompt_ids = client.post(url + "/tokenize", json={"model": "smollm2", "prompt": prompt}).json()["tokens"]
    lp = scorer.score(prompt_ids, gen)
    entropy = -(np.exp(lp) * lp).sum(axis=1)
    sampled = lp[np.arange(len(gen)), gen]
    align = float(np.abs(sampled - np.asarray(lp_i["token_logprobs"])).max())
    if align > 1e-3:
        raise SystemExit(f"teacher-forced logprobs differ from vLLM's by {align}: not the same weights or prompt")
    return {"request": req, "response": plain,
            "exact": {"exact_entropy_nats": [round(float(x), 7) for x in entropy], "token_ids": gen,
                      "vocab_size": int(lp.shape[1]), "merged_positions": merged,
                      "max_abs_diff_sampled": align,
                      "note": "response: string keys as a client gets them; merged_positions: where the "
                              "token-id form of the same sample had more entries"}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vllm", default="http://127.0.0.1:8011")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--keep", type=int, default=3)
    ap.add_argument("--k", type=int, default=K, help="logprobs per position (a small K puts the sampled token "
                    "below the top K more often)")
    args = ap.parse_args(argv)
    scorer = Scorer(MODEL_DIR)
    args.out.mkdir(parents=True, exist_ok=True)
    kept = 0
    with httpx.Client(timeout=300.0) as client:
        for i, prompt in enumerate(PROMPTS):
            for seed in range(args.seeds):
                rec = record(client, args.vllm.rstrip("/"), prompt, seed, scorer, args.k)
                if rec is None:
                    continue
                path = args.out / f"merged_k{args.k}_{i}_{seed}.json"
                path.write_text(json.dumps(rec, ensure_ascii=False, indent=1) + "\n")
                kept += 1
                print(f"{path}: merged positions {rec['exact']['merged_positions']}", flush=True)
                break
            if kept >= args.keep:
                break
    print(f"{kept} responses with merged positions written to {args.out}")


if __name__ == "__main__":
    main()
