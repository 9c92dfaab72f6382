"""Record the benchmark's traffic once from a real vLLM: ``python -m bench.alerts record``.

Prompt classes at temperature 1.0 (what a healthy service answers) and three collapsed variants of the same
prompts: a low temperature (also used as the "sharper revision"), a system prompt that forces one template,
and greedy decoding (the same answer to the same prompt, over and over). Each response keeps what the replay
needs and nothing else: its text, and per generated token the sampled token and the top-20 (token, logprob),
tokens interned in one table, logprobs rounded to 1e-4. Written gzipped (``bench/data/alerts-recording.json.gz``).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from pathlib import Path
from typing import Any

import httpx

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "data" / "alerts-recording.json.gz"
MAX_TOKENS = 80
TOP_K = 20

PROMPTS: dict[str, list[str]] = {
    "code": ["Write a Python function that reverses a string.", "Show a SQL query that counts rows per day.",
             "Write a bash loop over the files in a folder.", "Write a JavaScript function that sums an array.",
             "Show how to read a JSON file in Python.", "Write a Python class for a stack.",
             "Write a regular expression for an email address.", "Write a Python function for factorial."],
    "list": ["List five fruits.", "Give me a packing list for a beach day.", "List three uses of a brick.",
             "Name four planets and one fact about each.", "List the steps to make tea.",
             "Give five tips for better sleep.", "List some common garden birds.", "Name three rivers in Europe."],
    "story": ["Tell a short story about a robot who learns to paint.", "Write a fable about a fox and a crow.",
              "Tell a bedtime story about a sleepy dragon.", "Write a short poem about the sea.",
              "Describe a rainy day in a small town.", "Tell a story about a lost key.",
              "Write a haiku about autumn.", "Invent a myth about why the moon changes shape."],
    "factual": ["What is photosynthesis?", "Why is the sky blue?", "What does a CPU do?",
                "Who was Ada Lovelace?", "How do vaccines work?", "What is inflation?",
                "What causes the seasons?", "What is the capital of Australia?"],
    "math": ["What is 17 times 23?", "Solve 2x + 6 = 14.", "What is the derivative of x squared?",
             "Is 91 a prime number?", "What is 15% of 80?", "Convert 3/8 to a decimal.",
             "What is the area of a circle of radius 3?", "Add 345 and 789."],
}
TEMPLATE_SYSTEM = ("You are a terse assistant. Whatever the user asks, reply with exactly one line in this form "
                   "and nothing else: 'ANSWER: <at most ten words>'.")
# Repetitive tasks (counting, reciting sequences) decoded greedily: SmolLM2 then answers with near-certainty at
# most tokens, forks included: what the proxy sees from a collapsed policy (at temperature 1 it wanders off the
# sequence). Each prompt of the classes above maps to one.
ENUMERATIONS = ["Count from 1 to 30, separated by spaces.", "Count from 1 to 40, separated by commas.",
                "List the days of the week, one per line.", "Write the alphabet in capital letters.",
                "Count down from 20 to 1.", "List the months of the year, separated by commas.",
                "Write the even numbers from 2 to 40.", "Count from 10 to 40, separated by spaces."]
# variant -> (temperature, system prompt, samples per prompt)
VARIANTS: dict[str, tuple[float, str | None, int]] = {
    "normal": (1.0, None, 5),
    "low_temp": (0.2, None, 2),
    "template": (1.0, TEMPLATE_SYSTEM, 2),
    "greedy": (0.0, None, 1),
    "repeat": (0.0, None, 1),
}


def _enumeration_for(prompt: str) -> str:
    flat = [p for ps in PROMPTS.values() for p in ps]
    return ENUMERATIONS[flat.index(prompt) % len(ENUMERATIONS)] if prompt in flat else ENUMERATIONS[0]


# Format collapse, replayed: SmolLM2-135M does not follow TEMPLATE_SYSTEM (its answers keep the mix of formats
# of the plain prompts), so the replay answers this variant's requests only with recorded temperature-1 answers
# that are fenced code blocks: a policy that answers everything in one format. Not recorded separately.
ONE_FORMAT = "one_format"
ONE_FORMAT_PREFIX = "Answer with a code block only. "


def request_body(model: str, variant: str, prompt: str) -> dict[str, Any]:
    """The chat request a client sends for ``prompt`` in ``variant`` (the replay looks answers up by it)."""
    if variant == ONE_FORMAT:
        return {"model": model, "messages": [{"role": "user", "content": ONE_FORMAT_PREFIX + prompt}],
                "temperature": 1.0, "max_tokens": MAX_TOKENS}
    temperature, system, _ = VARIANTS[variant]
    if variant == "repeat":
        prompt = _enumeration_for(prompt)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return {"model": model, "messages": messages, "temperature": temperature, "max_tokens": MAX_TOKENS}


class _Interner:
    def __init__(self) -> None:
        self.table: list[str] = []
        self.index: dict[str, int] = {}

    def __call__(self, s: str) -> int:
        i = self.index.get(s)
        if i is None:
            i = self.index[s] = len(self.table)
            self.table.append(s)
        return i


def _compact(choice: dict[str, Any], intern: _Interner) -> dict[str, Any]:
    positions = []
    for pos in choice["logprobs"]["content"]:
        tops = pos["top_logprobs"]
        entry: list[Any] = [intern(pos["token"]), round(pos["logprob"], 4),
                            [intern(t["token"]) for t in tops], [round(t["logprob"], 4) for t in tops]]
        if pos.get("bytes") is not None and bytes(pos["bytes"]) != pos["token"].encode():
            entry.append(pos["bytes"])
        positions.append(entry)
    return {"text": choice["message"]["content"], "finish": choice["finish_reason"], "positions": positions}


async def record(upstream: str, model: str, out: Path, concurrency: int = 6,
                 only: list[str] | None = None) -> dict[str, Any]:
    """Record every variant (or, with ``only``, those variants into the existing recording at ``out``)."""
    intern = _Interner()
    answers: dict[str, list[dict[str, Any]]] = {}
    done_before, tokens = 0, 0
    if only:
        old = load(out)
        for s in old["tokens"]:
            intern(s)
        answers = {k: v for k, v in old["answers"].items() if k.split("|")[0] not in only}
        done_before = sum(len(v) for v in answers.values())
        tokens = sum(len(a["positions"]) for v in answers.values() for a in v)
    jobs = [(variant, cls, prompt) for variant, (_, _, n) in VARIANTS.items() if not only or variant in only
            for cls, prompts in PROMPTS.items() for prompt in prompts for _ in range(n)]
    sem = asyncio.Semaphore(concurrency)
    t0 = time.monotonic()

    async def one(client: httpx.AsyncClient, variant: str, cls: str, prompt: str) -> None:
        nonlocal tokens
        body = {**request_body(model, variant, prompt), "logprobs": True, "top_logprobs": TOP_K}
        async with sem:
            r = await client.post(f"{upstream}/v1/chat/completions", json=body)
        r.raise_for_status()
        choice = r.json()["choices"][0]
        compact = _compact(choice, intern)
        tokens += len(compact["positions"])
        answers.setdefault(f"{variant}|{cls}|{prompt}", []).append(compact)
        done = sum(len(v) for v in answers.values())
        if done % 50 == 0:  # a checkpoint: a long recording on a shared server keeps what it has
            _write(out, model, intern, answers, done, tokens, t0)
            print(f"recorded {done}/{len(jobs)} responses, {tokens} tokens, {time.monotonic() - t0:.0f} s",
                  flush=True)

    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(one(client, *job) for job in jobs))
    return _write(out, model, intern, answers, done_before + len(jobs), tokens, t0)


def _write(out: Path, model: str, intern: _Interner, answers: dict[str, list[dict[str, Any]]], responses: int,
           tokens: int, t0: float) -> dict[str, Any]:
    meta = {"upstream_model": model, "max_tokens": MAX_TOKENS, "top_k": TOP_K, "variants":
            {k: {"temperature": v[0], "system": v[1], "samples": v[2]} for k, v in VARIANTS.items()},
            "recorded_s": round(time.monotonic() - t0, 1), "responses": responses, "tokens": tokens,
            "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    doc = {"meta": meta, "prompts": PROMPTS, "tokens": intern.table, "answers": answers}
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(out, "wt", encoding="utf-8", compresslevel=9) as f:
        json.dump(doc, f, separators=(",", ":"), ensure_ascii=False)
    return meta


def load(path: Path = DEFAULT_OUT) -> dict[str, Any]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)
