"""Reference scorer: exact full-vocabulary entropy of real vLLM responses, written as fresh estimator fixtures.

Run from the repository root with the vLLM environment (it has torch and transformers)::

    .venv-vllm/bin/python -m bench.exact_entropy [--vllm URL] [--out bench/data/exact]

Without ``--vllm`` a local vLLM is started for the run (``proxy.localvllm.LocalVLLM``; one vLLM at a time on
a small machine, so pass the URL of one already running). Each prompt below is sent to the chat API with
``logprobs: true, top_logprobs: 20, return_token_ids: true, return_tokens_as_token_ids: true`` (every token,
including the top-20 entries, comes back as ``token_id:N``) at temperature 1.0 or 0.7, ``top_p: 1``. The
prompt ids vLLM reports and the generated ids are then teacher-forced through the same weights with
``transformers`` (float32, CPU, no grad); the logits at position ``len(prompt) + j - 1`` give the model's
temperature-1 distribution over the whole vocabulary for generated token ``j`` (vLLM's default
``raw_logprobs`` are the same distribution whatever the sampling temperature). Per position the fixtures keep
only what an estimator sees and what it is scored against: vLLM's 20 logprobs in vLLM's order, the column of
the sampled token, the exact entropy (nats) and the exact sampled logprob.

Alignment is checked, not assumed: every one of vLLM's top-20 logprobs is compared by token id with
transformers' value (float32 on both sides agrees to about 1e-4), and the run stops if any differs by more
than ``--tolerance``. A few requests are also resent with ``top_logprobs`` 5 and 10 and the same seed, to check
that truncating a K=20 list as :func:`truncate_like_vllm` does reproduces what vLLM itself sends.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "data" / "exact"
MODEL_DIR = REPO / ".cache" / "models" / "smollm2-135m-instruct"
K = 20

# (category, prompt). Varied on purpose: near-deterministic answers (facts, code, JSON) and open ones
# (stories, brainstorming) give very different tail masses.
PROMPTS: list[tuple[str, str]] = [
    ("fact", "What is the capital of Australia?"),
    ("fact", "Who wrote the novel Pride and Prejudice?"),
    ("fact", "How many planets are in the solar system? Name them."),
    ("fact", "What is photosynthesis? Explain in two sentences."),
    ("fact", "When did the Second World War end?"),
    ("fact", "What is the boiling point of water at sea level in Fahrenheit?"),
    ("fact", "Explain what DNA stands for and what it does."),
    ("fact", "What causes the seasons on Earth?"),
    ("fact", "Who painted the Mona Lisa?"),
    ("fact", "What is the largest ocean on Earth?"),
    ("fact", "Describe how a rainbow forms."),
    ("fact", "What is the difference between weather and climate?"),
    ("code", "Write a Python function that checks whether a number is prime."),
    ("code", "Write a JavaScript function that reverses a string."),
    ("code", "Show a SQL query that counts the rows of a table named orders per customer."),
    ("code", "Write a bash one-liner that counts the lines of all .py files in a directory."),
    ("code", "Write a Python class for a stack with push, pop and peek."),
    ("code", "Explain what a Python list comprehension is, with an example."),
    ("code", "Write a function in C that returns the maximum of an array of ints."),
    ("code", "How do I read a CSV file with pandas?"),
    ("code", "Write a recursive Python function for the Fibonacci numbers."),
    ("code", "What does the git rebase command do?"),
    ("code", "Write a regular expression that matches an email address."),
    ("code", "Fix this Python code: for i in range(10) print(i)"),
    ("list", "List five fruits that are red."),
    ("list", "Give me a packing list for a weekend camping trip."),
    ("list", "Name ten animals that live in Africa."),
    ("list", "List the days of the week in order."),
    ("list", "What are three tips for better sleep?"),
    ("list", "List some popular programming languages."),
    ("list", "Give four ideas for a birthday party theme."),
    ("list", "Name the primary colors."),
    ("list", "List the steps to make a cup of tea."),
    ("list", "What are the main parts of a computer?"),
    ("story", "Write a short story about a dragon who is afraid of fire."),
    ("story", "Tell me a story about a lost kitten finding its way home."),
    ("story", "Write a poem about the ocean."),
    ("story", "Write a haiku about autumn leaves."),
    ("story", "Begin a mystery story set in an old library."),
    ("story", "Write a limerick about a cat."),
    ("story", "Describe a futuristic city in the year 3000."),
    ("story", "Write a bedtime story about a sleepy bear."),
    ("story", "Write a dialogue between a robot and a child."),
    ("story", "Invent a new holiday and describe how people celebrate it."),
    ("story", "Write the opening paragraph of a fantasy novel."),
    ("math", "What is 17 times 23?"),
    ("math", "Solve for x: 3x + 7 = 22."),
    ("math", "What is the square root of 144?"),
    ("math", "If a train travels 60 miles per hour for 3 hours, how far does it go?"),
    ("math", "Explain the Pythagorean theorem."),
    ("math", "What is 15 percent of 80?"),
    ("math", "Is 91 a prime number? Explain."),
    ("math", "Convert 5 kilometers to miles."),
    ("math", "What is the derivative of x squared?"),
    ("math", "A shop sells pens at 3 dollars each. How much do 7 pens cost?"),
    ("json", "Return a JSON object with the fields name, age and city for a fictional person."),
    ("json", "Give me a JSON array of three books with title and author."),
    ("json", "Write a JSON configuration for a web server with host, port and debug fields."),
    ("json", "Represent a shopping cart with two items as JSON."),
    ("json", "Output only JSON: the current weather with temperature and condition."),
    ("json", "Convert this to JSON: Alice is 30 and lives in Paris."),
    ("translate", "Translate to French: Good morning, how are you?"),
    ("translate", "Translate to Spanish: I would like a cup of coffee."),
    ("translate", "Translate to German: The weather is nice today."),
    ("translate", "How do you say thank you in Japanese?"),
    ("translate", "Translate to Italian: Where is the train station?"),
    ("translate", "What does the French word bonjour mean?"),
    ("advice", "How can I improve my public speaking skills?"),
    ("advice", "Give me advice for my first day at a new job."),
    ("advice", "How do I stay motivated when studying?"),
    ("advice", "What should I consider when buying a used car?"),
    ("advice", "How can I save money on groceries?"),
    ("advice", "Suggest a healthy breakfast."),
    ("chat", "Hi! How are you today?"),
    ("chat", "Tell me a joke."),
    ("chat", "What is your favorite color and why?"),
    ("chat", "Can you recommend a good movie?"),
    ("chat", "What would you do with a million dollars?"),
    ("chat", "Say something nice."),
    ("rewrite", "Summarize in one sentence: The meeting was moved from Monday to Wednesday because the manager "
                "was travelling, and everyone should bring their quarterly reports."),
    ("rewrite", "Rewrite this more formally: hey, can u send me the file asap?"),
    ("rewrite", "Make this sentence shorter: In the event that it rains, we will not go outside to play."),
    ("rewrite", "Correct the grammar: She don't like apples and they goes to school."),
    ("rewrite", "Give a title for an article about electric cars."),
    ("classify", "Is the following review positive or negative? The food was cold and the waiter was rude."),
    ("classify", "Which is heavier, a kilogram of feathers or a kilogram of iron?"),
    ("classify", "Is a tomato a fruit or a vegetable?"),
    ("classify", "Answer yes or no: is the sun a star?"),
]
_MAX_TOKENS = (48, 64, 96)


def build_requests(model: str = "smollm2") -> list[dict[str, Any]]:
    """One temperature-1.0 request per prompt, plus a temperature-0.7 one for every third prompt."""
    reqs: list[dict[str, Any]] = []
    for i, (_, prompt) in enumerate(PROMPTS):
        temps = (1.0, 0.7) if i % 3 == 0 else (1.0,)
        for temp in temps:
            reqs.append({
                "model": model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": _MAX_TOKENS[i % len(_MAX_TOKENS)], "temperature": temp, "top_p": 1.0,
                "seed": 1000 + 10 * i + (temp < 1.0), "logprobs": True, "top_logprobs": K,
            })
    return reqs


def truncate_like_vllm(logprobs: list[float], sampled_col: int, k: int) -> list[float]:
    """What vLLM sends at ``top_logprobs: k``, from its list at a larger K: the sampled token first, then the
    other entries in rank order (largest logprob first), ``k`` entries in all."""
    rest = sorted((lp for i, lp in enumerate(logprobs) if i != sampled_col), reverse=True)
    return [logprobs[sampled_col], *rest[: k - 1]]


def _token_id(token: str) -> int:
    if not token.startswith("token_id:"):
        raise ValueError(f"expected a 'token_id:N' token (return_tokens_as_token_ids), got {token!r}")
    return int(token[len("token_id:"):])


def ask(client: httpx.Client, base_url: str, req: dict[str, Any]) -> dict[str, Any]:
    """Send one chat request; return prompt ids, generated ids, top lists (ids and logprobs) and the text."""
    body = {**req, "return_token_ids": True, "return_tokens_as_token_ids": True}
    resp = client.post(base_url.rstrip("/") + "/v1/chat/completions", json=body)
    resp.raise_for_status()
    data = resp.json()
    choice = data["choices"][0]
    content = choice["logprobs"]["content"]
    gen_ids = [int(t) for t in choice["token_ids"]]
    if [_token_id(e["token"]) for e in content] != gen_ids:
        raise ValueError("logprobs tokens and token_ids disagree")
    top_ids = [[_token_id(t["token"]) for t in e["top_logprobs"]] for e in content]
    top_lps = [[float(t["logprob"]) for t in e["top_logprobs"]] for e in content]
    cols = [ids.index(g) for ids, g in zip(top_ids, gen_ids, strict=True)]
    return {
        "prompt_token_ids": [int(t) for t in data["prompt_token_ids"]], "token_ids": gen_ids,
        "top_ids": top_ids, "top_logprobs": top_lps, "sampled_col": cols,
        "finish_reason": choice["finish_reason"], "text": choice["message"]["content"],
        "fingerprint": data.get("system_fingerprint"),
    }


class Scorer:
    """Teacher-forces prompt + completion ids through the Hugging Face weights (float32, CPU)."""

    def __init__(self, model_dir: Path, threads: int = 1) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self._torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def score(self, prompt_ids: list[int], gen_ids: list[int]) -> np.ndarray:
        """Full-vocabulary log-probabilities (float64 from float32 logits), shape (len(gen_ids), V)."""
        torch = self._torch
        ids = torch.tensor([prompt_ids + gen_ids[:-1]], dtype=torch.long)
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[0, len(prompt_ids) - 1:]
        lp: np.ndarray = torch.log_softmax(logits.double(), dim=-1).numpy()
        return lp


def exact_record(scorer: Scorer, got: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """Exact entropies and sampled logprobs for one response, plus the alignment check against vLLM's values."""
    lp = scorer.score(got["prompt_token_ids"], got["token_ids"])
    if lp.shape[0] != len(got["token_ids"]):
        raise ValueError("teacher-forced positions do not match the generated tokens")
    entropy = -(np.exp(lp) * lp).sum(axis=1)
    rows = np.arange(lp.shape[0])
    sampled = lp[rows, got["token_ids"]]
    top_ids = np.asarray(got["top_ids"])
    top_vllm = np.asarray(got["top_logprobs"])
    diff = np.abs(lp[rows[:, None], top_ids] - top_vllm)
    # vLLM's entries other than the sampled token must be the true top ranks (up to float ties).
    kth = -np.partition(-lp, K - 1, axis=1)[:, K - 1]
    others = np.ones_like(top_vllm, dtype=bool)
    others[rows, got["sampled_col"]] = False
    rank_gap = np.where(others, kth[:, None] - lp[rows[:, None], top_ids], -np.inf).max(axis=1)
    check = {
        "max_abs_diff_sampled": float(np.abs(sampled - top_vllm[rows, got["sampled_col"]]).max()),
        "max_abs_diff_top": float(diff.max()),
        "max_rank_gap": float(rank_gap.max()),
    }
    rec = {
        "top_logprobs": [[round(x, 6) for x in r] for r in got["top_logprobs"]],
        "sampled_col": got["sampled_col"],
        "exact_entropy_nats": [round(float(x), 7) for x in entropy],
        "exact_sampled_logprob": [round(float(x), 7) for x in sampled],
        "vocab_size": int(lp.shape[1]),
    }
    return rec, check


def check_truncation(client: httpx.Client, base_url: str, reqs: list[dict[str, Any]]) -> dict[str, Any]:
    """Resend requests at K = 5 and 10 with the same seed; compare with truncating their K=20 lists."""
    out: dict[str, Any] = {"responses": 0, "positions": 0, "same_tokens": 0, "max_abs_diff": 0.0, "order_ok": True}
    for req in reqs:
        full = ask(client, base_url, req)
        for k in (5, 10):
            small = ask(client, base_url, {**req, "top_logprobs": k})
            out["responses"] += 1
            n = 0
            for j, (a, b) in enumerate(zip(full["token_ids"], small["token_ids"], strict=False)):
                if a != b:
                    break  # float noise in batched CPU sampling can fork the two runs; compare up to there
                want = truncate_like_vllm(full["top_logprobs"][j], full["sampled_col"][j], k)
                have = small["top_logprobs"][j]
                out["order_ok"] &= small["sampled_col"][j] == 0 and len(have) == k
                out["max_abs_diff"] = max(out["max_abs_diff"], max(abs(x - y) for x, y in zip(want, have,
                                                                                               strict=True)))
                n += 1
            out["positions"] += n
            out["same_tokens"] += n == len(full["token_ids"]) == len(small["token_ids"])
    return out


def _versions(fingerprint: str | None) -> dict[str, str]:
    import torch
    import transformers

    return {
        "vllm": str(fingerprint), "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "machine": platform.platform(),
    }


def _gather(
    client: httpx.Client, base_url: str, reqs: list[dict[str, Any]], concurrency: int, cache: Path | None
) -> list[dict[str, Any]]:
    """Answers to ``reqs``; with ``cache`` each answer is appended as it arrives and reused on a rerun (the
    requests are seeded, so a rerun against the same server would get the same tokens anyway)."""
    done: dict[str, dict[str, Any]] = {}
    if cache is not None and cache.exists():
        for line in cache.read_text().splitlines():
            item = json.loads(line)
            done[item["key"]] = item["answer"]
    lock = threading.Lock()

    def one(req: dict[str, Any]) -> dict[str, Any]:
        key = json.dumps(req, sort_keys=True)
        if key in done:
            return done[key]
        got = ask(client, base_url, req)
        if cache is not None:
            with lock, cache.open("a") as fh:
                fh.write(json.dumps({"key": key, "answer": got}) + "\n")
        return got

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, reqs))


def run(
    base_url: str, out_dir: Path, concurrency: int, tolerance: float, threads: int, cache: Path | None = None
) -> dict[str, Any]:
    reqs = build_requests()
    t0 = time.time()
    with httpx.Client(timeout=httpx.Timeout(600.0)) as client:
        answers = _gather(client, base_url, reqs, concurrency, cache)
        t_gen = time.time() - t0
        print(f"{len(answers)} responses, {sum(len(a['token_ids']) for a in answers)} positions "
              f"in {t_gen:.0f} s", file=sys.stderr)
        trunc = check_truncation(client, base_url, reqs[:: max(1, len(reqs) // 6)][:6])
    scorer = Scorer(MODEL_DIR, threads)
    records, worst = [], {"max_abs_diff_sampled": 0.0, "max_abs_diff_top": 0.0, "max_rank_gap": -math.inf}
    for i, (req, got) in enumerate(zip(reqs, answers, strict=True)):
        rec, check = exact_record(scorer, got)
        if check["max_abs_diff_top"] > tolerance:
            raise SystemExit(f"request {i}: vLLM and transformers disagree by {check['max_abs_diff_top']:.3g} "
                             f"(> {tolerance}): misaligned positions or a dtype mismatch")
        worst = {k: max(worst[k], v) for k, v in check.items()}
        prompt_idx = next(j for j, (_, p) in enumerate(PROMPTS) if p == req["messages"][0]["content"])
        records.append({
            "id": f"p{prompt_idx:03d}-t{req['temperature']:.1f}", "prompt_id": prompt_idx,
            "category": PROMPTS[prompt_idx][0], "request": req, "prompt_token_ids": got["prompt_token_ids"],
            "token_ids": got["token_ids"], "finish_reason": got["finish_reason"], "text": got["text"], **rec,
        })
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "responses.jsonl").open("w") as fh:
        for rec in records:
            fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
    meta = {
        "model_dir": str(MODEL_DIR.relative_to(REPO)), "top_logprobs": K,
        "responses": len(records), "positions": sum(len(r["token_ids"]) for r in records),
        "alignment": worst, "truncation_check": trunc, "generation_seconds": round(t_gen, 1),
        "versions": _versions(answers[0]["fingerprint"]),
        "note": "exact_* from transformers teacher-forcing (float32 logits, log-softmax in float64); "
                "top_logprobs are vLLM's (raw_logprobs, float32), rounded to 1e-6",
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--vllm", help="base URL of a running vLLM serving SmolLM2 in float32 (else start one)")
    ap.add_argument("--out", type=Path, default=OUT, help="output directory (responses.jsonl, meta.json)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--tolerance", type=float, default=1e-3, help="max |vLLM - transformers| logprob allowed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for teacher-forcing")
    ap.add_argument("--cache", type=Path, help="append raw answers here and reuse them on a rerun")
    args = ap.parse_args(argv)
    if args.vllm:
        meta = run(args.vllm, args.out, args.concurrency, args.tolerance, args.threads, args.cache)
    else:
        from proxy.localvllm import LocalVLLM

        with LocalVLLM() as vllm:
            meta = run(vllm.base_url, args.out, args.concurrency, args.tolerance, args.threads, args.cache)
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
