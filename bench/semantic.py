"""Semantic entropy against token-level scores on a labelled question set, answered by a real vLLM.

Run from the repository root (the ``semantic`` extra installed, a vLLM serving SmolLM2 on 127.0.0.1:8011)::

    .venv/bin/python -m bench.semantic [--url http://127.0.0.1:8011] [--model smollm2] [--concurrency 3]
                                       [--answers bench/data/semantic_answers.jsonl] [--analyse-only]

Two phases:

1. **collect** (skipped for questions already in the cache file ``--answers``): per question of
   ``bench/data/semantic_questions.jsonl``, one greedy answer (temperature 0, top_logprobs 20: the response the
   client gets, and its token scores) and ten sampled answers (temperature 1, ``n=10``, the sampled tokens'
   logprobs), ``max_tokens`` 24 each. The cache keeps text, logprobs and usage, so the analysis re-runs without
   the model.
2. **analyse**: the greedy answer is right when its normalised text contains the gold answer (or an alias) as a
   whole phrase; for arithmetic, when its last number equals the gold number. Scores for "this answer is wrong",
   each reported as AUROC (wrong = positive class) with a 95% bootstrap interval over questions (2,000
   resamples): mean token entropy, 1 - confidence (geometric-mean token probability), 1 - minimum token
   probability, semantic entropy over the first 5 and all 10 samples (likelihood-weighted and discrete).
   Meaning clusters come from all-MiniLM-L6-v2 embeddings (the packaged model) with a cosine threshold, or from
   normalised-string identity (the no-model baseline); the threshold and the combination (a logistic regression
   on standardised scores) are chosen inside 5-fold cross-validation: each question's score comes from a model
   fitted on the other folds, so no choice sees the answers it is judged on.
   Cost: extra tokens per sampled response (prompt + completion of the ``n`` samples, from vLLM's ``usage``) and
   CPU seconds of embedding + clustering per response.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from monitors.calibration import auroc
from monitors.entropy import estimate_positions
from monitors.semantic import discrete_semantic_entropy, mean_logprob, normalise, semantic_entropy
from proxy.semantic.clusterer import Clusterer, SemanticResult
from proxy.semantic.model import DEFAULT_THRESHOLD

DATA = Path(__file__).resolve().parent / "data"
QUESTIONS = DATA / "semantic_questions.jsonl"
ANSWERS = DATA / "semantic_answers.jsonl"
SUFFIX = " Answer in a few words."
MAX_TOKENS = 24
SAMPLES = 10
TOP_K = 20
VOCAB_SIZE = 49_152  # SmolLM2's vocabulary
THRESHOLDS = (0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
BOOTSTRAP = 2000
FOLDS = 5


# -- collect ----------------------------------------------------------------------------------------------------------
def load_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _messages(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question + SUFFIX}]


def _tokens(choice: dict[str, Any], top: bool) -> dict[str, Any]:
    content = (choice.get("logprobs") or {}).get("content") or []
    out: dict[str, Any] = {"text": choice["message"]["content"] or "",
                           "logprobs": [round(float(t["logprob"]), 5) for t in content]}
    if top:
        out["tokens"] = [t["token"] for t in content]
        out["top"] = [[round(float(a["logprob"]), 5) for a in t.get("top_logprobs") or []] for t in content]
    return out


async def _post(client: httpx.AsyncClient, body: dict[str, Any], tries: int = 5) -> dict[str, Any]:
    """POST with retries: the vLLM is shared and may restart or shed load; a question that keeps failing is
    skipped by the caller (and asked again on the next run, since it is not cached)."""
    for i in range(tries):
        try:
            r = await client.post("/v1/chat/completions", json=body)
            if r.status_code == 200:
                data: dict[str, Any] = r.json()
                return data
            err: Exception = RuntimeError(f"status {r.status_code}: {r.text[:200]}")
        except httpx.HTTPError as e:
            err = e
        await asyncio.sleep(5.0 * (i + 1))
    raise err


async def _ask(client: httpx.AsyncClient, model: str, q: dict[str, Any]) -> dict[str, Any]:
    base = {"model": model, "messages": _messages(q["question"]), "max_tokens": MAX_TOKENS, "logprobs": True}
    t0 = time.perf_counter()
    gj = await _post(client, {**base, "temperature": 0.0, "top_logprobs": TOP_K})
    t1 = time.perf_counter()
    sj = await _post(client, {**base, "temperature": 1.0, "n": SAMPLES, "top_logprobs": 0})
    t2 = time.perf_counter()
    return {
        "id": q["id"],
        "greedy": _tokens(gj["choices"][0], top=True),
        "greedy_usage": gj.get("usage"),
        "greedy_s": round(t1 - t0, 3),
        "samples": [_tokens(c, top=False) for c in sorted(sj["choices"], key=lambda c: c["index"])],
        "samples_usage": sj.get("usage"),
        "samples_s": round(t2 - t1, 3),
    }


async def collect(url: str, model: str, concurrency: int, path: Path, questions: list[dict[str, Any]]) -> None:
    done = {r["id"] for r in load_jsonl(path)}
    todo = [q for q in questions if q["id"] not in done]
    if not todo:
        return
    print(f"collect: {len(todo)} questions to ask ({len(done)} cached) at {url}", flush=True)
    sem = asyncio.Semaphore(concurrency)
    n = 0
    timeout = httpx.Timeout(300.0, connect=10.0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        with path.open("a") as out:

            async def one(q: dict[str, Any]) -> None:
                nonlocal n
                async with sem:
                    try:
                        rec = await _ask(client, model, q)
                    except Exception as e:  # noqa: BLE001 - skipped now, asked again on the next run
                        print(f"  {q['id']} skipped: {e!r}", flush=True)
                        return
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                out.flush()
                n += 1
                if n % 20 == 0:
                    print(f"  {n}/{len(todo)}", flush=True)

            await asyncio.gather(*(one(q) for q in todo))


# -- correctness and scores -----------------------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")


def is_correct(q: dict[str, Any], answer: str) -> bool:
    if q["kind"] in ("add", "mul"):
        nums = _NUMBER.findall(answer.replace(",", ""))
        return bool(nums) and nums[-1] == q["gold"]
    text = f" {normalise(answer)} "
    return any(f" {normalise(g)} " in text for g in [q["gold"], *q.get("aliases", [])] if normalise(g))


def token_scores(greedy: dict[str, Any]) -> dict[str, float]:
    """The proxy's token-level view of the greedy answer: mean entropy, confidence, minimum token probability."""
    lps = np.asarray(greedy["logprobs"], dtype=np.float64)
    if lps.size == 0:
        return {"mean_entropy": 0.0, "confidence": 1.0, "min_prob": 1.0}
    width = max(len(r) for r in greedy["top"]) or 1
    rows = np.full((len(greedy["top"]), width), np.nan)
    for i, r in enumerate(greedy["top"]):
        rows[i, : len(r)] = r
    est = estimate_positions(rows, VOCAB_SIZE)
    return {
        "mean_entropy": float(np.mean(est.point)),
        "confidence": float(np.exp(np.mean(np.maximum(lps, -9999.0)))),
        "min_prob": float(np.exp(np.min(lps))),
    }


class Embedder:
    """all-MiniLM-L6-v2 from the ``semantic`` extra, loaded the way the proxy loads it."""

    def __init__(self) -> None:
        from proxy.semantic.model import load_embedder

        self.model = load_embedder(threads=1)  # as the proxy runs it: one thread beside the event loop
        self.cache: dict[str, np.ndarray] = {}

    def sims(self, texts: list[str]) -> np.ndarray:
        e = self.embed(texts)
        return np.asarray(e @ e.T)

    def sims_uncached(self, texts: list[str]) -> np.ndarray:
        e = np.asarray(self.model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                                         show_progress_bar=False), dtype=np.float64)
        return np.asarray(e @ e.T)

    def embed(self, texts: list[str]) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if new:
            vecs = self.model.encode(new, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                     show_progress_bar=False)
            self.cache.update(zip(new, np.asarray(vecs, dtype=np.float64), strict=True))
        return np.stack([self.cache[t] for t in texts])


def semantic_scores(samples: list[dict[str, Any]], sims: None, threshold: None) -> dict[str, float]:
    """The no-model baseline: answers mean the same exactly when their normalised texts are identical."""
    keys: dict[str, int] = {}
    ids = [keys.setdefault(normalise(x["text"]), len(keys)) for x in samples]
    lps = [mean_logprob(x["logprobs"]) for x in samples]
    return {"se": semantic_entropy(ids, lps), "dse": discrete_semantic_entropy(ids)}


def _extra_tokens(r: dict[str, Any], n: int) -> int:
    """Tokens the first ``n`` samples cost: the prompt once (one request with ``n``) plus their completions."""
    usage = r["samples_usage"] or {}
    return int(usage.get("prompt_tokens", 0)) + sum(len(x["logprobs"]) for x in r["samples"][:n])


# -- statistics -------------------------------------------------------------------------------------------------------
def auroc_wrong(score: np.ndarray, wrong: np.ndarray) -> float:
    """AUROC of ``score`` for telling wrong answers (positives) from right ones; 0.5 is chance."""
    a = auroc(_unit(score), wrong.astype(np.float64))
    return float("nan") if a is None else a


def _unit(x: np.ndarray) -> np.ndarray:
    """A monotone map into [0, 1] (calibration.auroc validates its input as a probability); ranks survive."""
    x = np.asarray(x, dtype=np.float64)
    return 0.5 + np.arctan(x) / math.pi


def bootstrap_ci(score: np.ndarray, wrong: np.ndarray, rng: np.random.Generator, n: int = BOOTSTRAP
                 ) -> tuple[float, float]:
    vals = []
    idx = np.arange(score.size)
    for _ in range(n):
        b = rng.choice(idx, size=idx.size, replace=True)
        a = auroc(_unit(score[b]), wrong[b].astype(np.float64))
        if a is not None:
            vals.append(a)
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(lo), float(hi)


def _logistic_fit(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iters: int = 200) -> np.ndarray:
    """Ridge-penalised logistic regression by Newton's method; returns weights with the bias first."""
    xb = np.hstack([np.ones((x.shape[0], 1)), x])
    w = np.zeros(xb.shape[1])
    pen = np.full(xb.shape[1], l2)
    pen[0] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(xb @ w)))
        grad = xb.T @ (p - y) + pen * w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(pen)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return w


def folds(n: int, k: int = FOLDS, seed: int = 0) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return [perm[i::k] for i in range(k)]


def cv_combination(features: np.ndarray, wrong: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    """Out-of-fold scores of a logistic regression on standardised features."""
    out = np.zeros(features.shape[0])
    for test in parts:
        train = np.setdiff1d(np.arange(features.shape[0]), test)
        mu, sd = features[train].mean(0), features[train].std(0) + 1e-12
        w = _logistic_fit((features[train] - mu) / sd, wrong[train].astype(np.float64))
        out[test] = np.hstack([np.ones((test.size, 1)), (features[test] - mu) / sd]) @ w
    return out


def cv_threshold(per_threshold: dict[float, np.ndarray], wrong: np.ndarray, parts: list[np.ndarray]
                 ) -> tuple[np.ndarray, list[float]]:
    """Out-of-fold scores where each fold uses the threshold with the best AUROC on the other folds."""
    out = np.zeros(wrong.size)
    chosen = []
    for test in parts:
        train = np.setdiff1d(np.arange(wrong.size), test)
        best = max(per_threshold, key=lambda t: auroc_wrong(per_threshold[t][train], wrong[train]))
        chosen.append(best)
        out[test] = per_threshold[best][test]
    return out, chosen


# -- analyse ----------------------------------------------------------------------------------------------------------
def analyse(questions: list[dict[str, Any]], answers: list[dict[str, Any]], seed: int = 0,
            n_boot: int = BOOTSTRAP) -> dict[str, Any]:
    by_id = {a["id"]: a for a in answers}
    qs = [q for q in questions if q["id"] in by_id]
    recs = [by_id[q["id"]] for q in qs]
    wrong = np.array([not is_correct(q, r["greedy"]["text"]) for q, r in zip(qs, recs, strict=True)])
    tok = [token_scores(r["greedy"]) for r in recs]

    scores: dict[str, np.ndarray] = {
        "mean token entropy": np.array([t["mean_entropy"] for t in tok]),
        "1 - confidence": np.array([1.0 - t["confidence"] for t in tok]),
        "1 - min token probability": np.array([1.0 - t["min_prob"] for t in tok]),
    }

    embedder = Embedder()
    parts = folds(len(qs), seed=seed)
    cpu: dict[int, list[float]] = {5: [], 10: []}
    chosen: dict[str, list[float]] = {}
    sweep: dict[str, dict[float, float]] = {}
    for n in (5, 10):
        for variant, guard in (("embeddings + number guard", True), ("embeddings", False)):
            per_t: dict[float, list[SemanticResult]] = {t: [] for t in THRESHOLDS}
            for r in recs:
                samples = [(x["text"], x["logprobs"]) for x in r["samples"][:n]]
                for t in THRESHOLDS:
                    per_t[t].append(Clusterer(t, similarity=embedder.sims, guard_numbers=guard).run(
                        samples, r["greedy"]["text"]))
            for form, attr in (("SE", "entropy"), ("discrete SE", "discrete")):
                arr = {t: np.array([getattr(x, attr) for x in v]) for t, v in per_t.items()}
                key = f"{form}, {n} samples, {variant} (CV threshold)"
                scores[key], chosen[key] = cv_threshold(arr, wrong, parts)
                sweep[key] = {t: auroc_wrong(a, wrong) for t, a in arr.items()}
        lexical = [semantic_scores(r["samples"][:n], None, None) for r in recs]
        scores[f"SE, {n} samples, exact string match"] = np.array([x["se"] for x in lexical])
        scores[f"discrete SE, {n} samples, exact string match"] = np.array([x["dse"] for x in lexical])
        # CPU per response as the proxy runs it (its default threshold, number guard, embeddings not cached).
        proxy = Clusterer(DEFAULT_THRESHOLD, similarity=embedder.sims_uncached)
        for r in recs:
            samples = [(x["text"], x["logprobs"]) for x in r["samples"][:n]]
            cpu[n].append(proxy.run(samples, r["greedy"]["text"]).cpu_s)
    se = {n: f"SE, {n} samples, embeddings + number guard (CV threshold)" for n in (5, 10)}
    base = ["mean token entropy", "1 - confidence", "1 - min token probability"]
    for n in (10, 5):
        feats = np.column_stack([scores[k] for k in base] + [scores[se[n]]])
        scores[f"combination: logistic(token scores + SE {n}), 5-fold CV"] = cv_combination(feats, wrong, parts)
    scores["combination: logistic(token scores only), 5-fold CV"] = cv_combination(
        np.column_stack([scores[k] for k in base]), wrong, parts)

    rng = np.random.default_rng(seed)
    table = []
    for name, s in scores.items():
        a = auroc_wrong(s, wrong)
        lo, hi = bootstrap_ci(s, wrong, rng, n_boot)
        table.append({"score": name, "auroc": a, "ci": [lo, hi]})

    per_kind = {}
    for kind in sorted({q["kind"] for q in qs}):
        m = np.array([q["kind"] == kind for q in qs])
        per_kind[kind] = {"n": int(m.sum()), "wrong": int(wrong[m].sum())}
    return {
        "questions": len(qs),
        "wrong": int(wrong.sum()),
        "per_kind": per_kind,
        "table": table,
        "threshold_sweep": sweep,
        "chosen_thresholds": chosen,
        "cost": {
            "extra_tokens_5_mean": float(np.mean([_extra_tokens(r, 5) for r in recs])),
            "extra_tokens_10_mean": float(np.mean([_extra_tokens(r, 10) for r in recs])),
            "extra_tokens_10_reported": float(np.mean([(r["samples_usage"] or {}).get("total_tokens", 0)
                                                       for r in recs])),
            "cpu_s_per_response_5": float(np.mean(cpu[5])),
            "cpu_s_per_response_10": float(np.mean(cpu[10])),
            "cpu_s_per_response_10_p90": float(np.percentile(cpu[10], 90)),
            "greedy_s_mean": float(np.mean([r["greedy_s"] for r in recs])),
            "samples_s_mean": float(np.mean([r["samples_s"] for r in recs])),
        },
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"{result['questions']} questions, {result['wrong']} greedy answers wrong "
        + "(" + ", ".join(f"{k}: {v['wrong']}/{v['n']}" for k, v in result["per_kind"].items()) + ")",
        "",
        "| score (higher = more likely wrong) | AUROC | 95% bootstrap interval |",
        "| --- | --- | --- |",
    ]
    for row in result["table"]:
        lines.append(f"| {row['score']} | {row['auroc']:.3f} | {row['ci'][0]:.3f} – {row['ci'][1]:.3f} |")
    lines.append("")
    lines.append("AUROC on the whole set by cosine threshold (for reading only: the table's threshold is chosen per "
                 "fold on the other folds):")
    for key, sw in result["threshold_sweep"].items():
        lines.append(f"- {key.replace(' (CV threshold)', '')}: " + ", ".join(f"{t}: {a:.3f}" for t, a in sw.items()))
    lines.append("Thresholds chosen per fold: " + "; ".join(
        f"{k.replace(' (CV threshold)', '')}: {v}" for k, v in result["chosen_thresholds"].items()))
    c = result["cost"]
    lines.append(
        f"Cost per sampled response: {c['extra_tokens_5_mean']:.0f} extra tokens with 5 samples, "
        f"{c['extra_tokens_10_mean']:.0f} with 10 (the prompt once, as one request with n; vLLM's usage reported "
        f"{c['extra_tokens_10_reported']:.0f}); clustering CPU {c['cpu_s_per_response_5'] * 1000:.0f} ms (5 samples), "
        f"{c['cpu_s_per_response_10'] * 1000:.0f} ms (10 samples, p90 {c['cpu_s_per_response_10_p90'] * 1000:.0f} ms), "
        f"one torch thread; upstream time {c['greedy_s_mean']:.2f} s for the answer, {c['samples_s_mean']:.2f} s "
        "for the 10 samples (the shared vLLM, 3 questions at a time)."
    )
    return "\n".join(lines)


LATENCY_MODES = (("off", 0.0), ("10% sampled", 0.1), ("every request sampled", 1.0))


def latency(rounds: int = 2, requests: int = 100, samples: int = 10) -> dict[str, Any]:
    """Client latency through the proxy with shadow sampling off, on for 10% of requests, and on for all of them.

    Upstream: ``bench.replay_upstream`` (recorded vLLM positions, 24 tokens, 2 ms per token) so that the proxy's
    own path is what differs; the shadow samples (``samples`` each) go to the same upstream and are clustered in
    the proxy's worker thread while the next client requests run. Rounds cycle through the modes to spread the
    shared machine's noise over all of them.
    """
    import subprocess
    import sys

    from bench._targets import _spawn, cpu_seconds, free_port, workdir

    wd = workdir()
    up_port = free_port()
    up = _spawn("upstream", [sys.executable, "-m", "bench.replay_upstream", "--port", str(up_port), "--tokens", "24",
                             "--token-delay-ms", "2"], "/v1/models", up_port, wd)
    lat: dict[str, list[float]] = {m: [] for m, _ in LATENCY_MODES}
    cpu = {m: 0.0 for m, _ in LATENCY_MODES}
    status: dict[str, Any] = {}
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of Peru?"}],
            "max_tokens": 24}
    try:
        for i in range(rounds * len(LATENCY_MODES)):
            mode, rate = LATENCY_MODES[i % len(LATENCY_MODES)]
            port = free_port()
            env = {"ENTROPY_PROXY_AUDIT__URL": f"sqlite:///{wd}/audit-{i}.db", "ENTROPY_PROXY_LOG_LEVEL": "warning",
                   "ENTROPY_PROXY_SEMANTIC__SAMPLE_RATE": str(rate), "ENTROPY_PROXY_SEMANTIC__SAMPLES": str(samples),
                   "ENTROPY_PROXY_SEMANTIC__MAX_TOKENS_PER_HOUR": "100000000"}
            proxy = _spawn(f"proxy-{i}", [sys.executable, "-m", "proxy.cli", "serve", "--upstream",
                                          f"http://127.0.0.1:{up_port}", "--port", str(port)], "/readyz", port, wd, env)
            try:
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
                    for _ in range(5):
                        c.post("/v1/chat/completions", json=body).raise_for_status()
                    if rate > 0:  # warm up until the embedding model is loaded and has clustered once
                        deadline = time.monotonic() + 180
                        while (c.get("/v1/entropy/status").json().get("semantic") or {}).get("results", 0) < 1:
                            if time.monotonic() > deadline:
                                raise RuntimeError("shadow sampling produced no results")
                            c.post("/v1/chat/completions", json=body).raise_for_status()
                            time.sleep(0.2)
                    cpu0 = cpu_seconds(proxy.pid)
                    for _ in range(requests):
                        t0 = time.perf_counter()
                        c.post("/v1/chat/completions", json=body).raise_for_status()
                        lat[mode].append(time.perf_counter() - t0)
                    cpu[mode] += cpu_seconds(proxy.pid) - cpu0
                    if rate > 0:
                        status[mode] = c.get("/v1/entropy/status").json()["semantic"]
            finally:
                proxy.stop()
    finally:
        up.stop()
        subprocess.run(["rm", "-rf", str(wd)], check=False)
    out: dict[str, Any] = {"samples": samples, "modes": {}}
    for mode, rate in LATENCY_MODES:
        a = np.asarray(lat[mode]) * 1000
        out["modes"][mode] = {"rate": rate, "n": int(a.size), "mean": float(a.mean()), "cpu_s": cpu[mode],
                              **{f"p{q}": float(np.percentile(a, q)) for q in (50, 95, 99)},
                              "status": status.get(mode)}
    return out


def latency_markdown(r: dict[str, Any]) -> str:
    rows = [f"| shadow sampling ({r['samples']} samples) | requests | p50 ms | p95 ms | p99 ms | mean ms | "
            "proxy CPU s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for mode, m in r["modes"].items():
        rows.append(f"| {mode} | {m['n']} | {m['p50']:.1f} | {m['p95']:.1f} | {m['p99']:.1f} | {m['mean']:.1f} | "
                    f"{m['cpu_s']:.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default=os.environ.get("ENTROPY_PROXY_TEST_VLLM_URL", "http://127.0.0.1:8011"))
    p.add_argument("--model", default="smollm2")
    p.add_argument("--concurrency", type=int, default=3, help="questions at a time (each sampled request is n=10)")
    p.add_argument("--questions", type=Path, default=QUESTIONS)
    p.add_argument("--answers", type=Path, default=ANSWERS)
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--analyse-only", action="store_true", help="use the cached answers, ask the model nothing")
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON")
    p.add_argument("--latency", action="store_true",
                   help="only the client-latency comparison (replay upstream, shadow sampling off vs on)")
    args = p.parse_args(argv)
    if args.latency:
        lat = latency()
        print(latency_markdown(lat))
        if args.json:
            args.json.write_text(json.dumps(lat, indent=2))
        return
    questions = load_jsonl(args.questions)[: args.limit]
    if not args.analyse_only:
        asyncio.run(collect(args.url, args.model, args.concurrency, args.answers, questions))
    t0 = time.perf_counter()
    result = analyse(questions, load_jsonl(args.answers))
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    result["analyse_s"] = round(time.perf_counter() - t0, 1)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
