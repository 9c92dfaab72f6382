"""Canary benchmark on a real vLLM: detections of a collapsed model, false claims on the unchanged one, and the cost.

    python -m bench.canary [--url http://127.0.0.1:8011] [--model smollm2] [--samples 4] [--max-tokens 32]

Runs the proxy's own canary code (:class:`proxy.canary.runner.Canary`, the default prompt set, the background
sampler's budget accounting) directly against the upstream:

1. ``--baseline`` rounds at temperature 1.0: the revision's baseline;
2. ``--unchanged`` more rounds of the same model at 1.0, each compared with the baseline: every state other than
   ``healthy`` is a false claim (the diagnosis controls the family-wise rate at 5 % per round);
3. ``--collapsed`` rounds of each "collapsed" variant, each compared with the same baseline: the model sampled at
   temperature 0.3; the model under a system prompt that asks for one answer template; the same template forced
   as the start of every answer (``continue_final_message``), since SmolLM2-135M does not follow system prompts.

Writes ``test-artifacts/canary-bench.json`` (every round's measures and verdict) and prints a Markdown table.
Cost: tokens per round from the upstream's ``usage`` (sampling plus re-scoring of the reference texts), and what
that is per hour at one round every ``canary.interval_s``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

from monitors.canary_diagnosis import compare, diagnose_canary
from proxy.background.sampler import BackgroundSampler
from proxy.canary.prompts import load_prompts
from proxy.canary.runner import Canary, Steering
from proxy.canary.store import MemoryRounds, RoundRecord
from proxy.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_SYSTEM = ("Whatever the user writes, reply with exactly this line and nothing else: "
                   "'Answer: OK.' Never add anything.")
# SmolLM2-135M ignores system prompts (docs/recognition.md): the template is also forced as the answer's start.
TEMPLATE_PREFILL = '```json\n{"answer": "'

KEY_MEASURES = ("mean_entropy", "distinct_2", "chrf_distance", "format_entropy", "ratio")


def _fmt_change(ch: dict[str, Any]) -> str:
    lo, hi = ch["interval"]
    if ch["measure"] == "ratio":
        return f"x{ch['change']:.2f} [{lo:.2f}, {hi:.2f}]"
    return f"{ch['change']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


async def main(args: argparse.Namespace) -> dict[str, Any]:
    s = load_settings({
        "upstream": args.url, "canary.enabled": True, "canary.samples": args.samples,
        "canary.max_tokens": args.max_tokens, "canary.max_tokens_per_hour": 10_000_000,
        "models": {args.model: {"vocab_size": args.vocab_size}},
    }, environ={})
    out: dict[str, Any] = {
        "command": "python -m bench.canary " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                        if k != "out"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "rounds": [],
    }
    async with httpx.AsyncClient(base_url=s.upstream, timeout=httpx.Timeout(300.0, connect=5.0)) as client:
        sampler = BackgroundSampler(client, s, concurrency=args.concurrency)
        store = MemoryRounds()
        prompts = load_prompts()
        canary = Canary(s, sampler, prompts, store, models=lambda: [args.model], revision=lambda m: "bench")
        n_prompts = len(prompts.for_model(args.model))
        print(f"{n_prompts} prompts x {args.samples} samples x <= {args.max_tokens} tokens per round", flush=True)

        async def one(kind: str, **kw: Any) -> RoundRecord | None:
            t0 = time.monotonic()
            rec = await canary.run_round(args.model, **kw)
            took = time.monotonic() - t0
            if rec is None:
                print(f"{kind}: round failed", flush=True)
                return None
            if kind != "baseline" and not kw.get("store", True):  # a variant: compare with the 1.0 baseline
                base = await store.baseline(args.model, "bench", 1.0, args.samples, canary.min_baseline)
                rec.verdict = diagnose_canary(compare([rec.prompts], [b.prompts for b in base]),
                                              baseline_rounds=len(base)).to_dict()
            row = {"kind": kind, "seconds": round(took, 1), **rec.summary(), "verdict": rec.verdict}
            out["rounds"].append(row)
            st = (rec.verdict or {}).get("state")
            print(f"{kind:>10}: {st:<11} {took:5.1f} s {rec.tokens:5d} tokens  "
                  f"H {rec.measures['mean_entropy']:.3f}  d2 {rec.measures['distinct_2']:.3f}  "
                  f"ratio {rec.measures['ratio']}", flush=True)
            return rec

        for _ in range(args.baseline + args.unchanged):
            await one("unchanged" if canary.state.get(args.model) and
                      canary.state[args.model].baseline_rounds >= canary.min_baseline else "baseline")
        for _ in range(args.collapsed):
            await one("temp-0.3", temperature=0.3, store=False)
        for _ in range(args.collapsed):
            await one("template", steer=Steering(system=TEMPLATE_SYSTEM), store=False)
        for _ in range(args.collapsed):
            await one("prefill", steer=Steering(prefill=TEMPLATE_PREFILL), store=False)
        out["sampler"] = sampler.stats()
    out["summary"] = summarise(out["rounds"], args)
    return out


def summarise(rounds: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rounds:
        by.setdefault(r["kind"], []).append(r)
    summary: dict[str, Any] = {}
    for kind, rs in by.items():
        states = [r["verdict"]["state"] for r in rs]
        sig: dict[str, int] = {}
        for r in rs:
            for ch in r["verdict"].get("changes") or ():
                if ch["significant"]:
                    sig[ch["measure"]] = sig.get(ch["measure"], 0) + 1
        loose, any_loose = _unadjusted(rs)
        tokens = [r["tokens"] for r in rs]
        secs = [r["seconds"] for r in rs]
        summary[kind] = {
            "rounds": len(rs), "states": {st: states.count(st) for st in sorted(set(states))},
            "significant_by_measure": sig, "unadjusted_95_by_measure": loose, "rounds_with_an_unadjusted_95_claim":
            any_loose, "tokens_per_round": round(sum(tokens) / len(tokens), 1),
            "seconds_per_round": round(sum(secs) / len(secs), 1),
            "example_changes": {ch["measure"]: _fmt_change(ch) for ch in (rs[-1]["verdict"].get("changes") or ())
                                if ch["measure"] in KEY_MEASURES and ch["interval"][0] is not None},
            "mean_measures": {m: _mean([r["measures"].get(m) for r in rs]) for m in
                              ("mean_entropy", "forking_entropy", "distinct_2", "chrf_distance", "format_entropy",
                               "pass_1", "pass_k", "ratio")},
        }
    return summary


def _unadjusted(rounds: list[dict[str, Any]]) -> tuple[dict[str, int], int]:
    """What unadjusted 95 % intervals would have said: the stored (Bonferroni) interval's half-width gives the
    standard error, which a 95 % Student quantile turns back into an interval. Per measure, the rounds in which it
    excludes no change, and the rounds in which any measure does."""
    from monitors.canary_diagnosis import t_quantile

    per: dict[str, int] = {}
    rounds_any = 0
    for r in rounds:
        hit = False
        for ch in r["verdict"].get("changes") or ():
            lo, hi = ch["interval"]
            if lo is None or hi is None or ch["change"] is None:
                continue
            df = ch["prompts"] - 1
            wide = t_quantile(1 - (1 - ch["level"]) / 2, df)
            narrow = t_quantile(0.975, df)
            if ch["measure"] == "ratio":
                est, half = math.log(ch["change"]), (math.log(hi) - math.log(lo)) / 2
            else:
                est, half = ch["change"], (hi - lo) / 2
            if abs(est) > half * narrow / wide:
                per[ch["measure"]] = per.get(ch["measure"], 0) + 1
                hit = True
        rounds_any += hit
    return per, rounds_any


def _mean(xs: list[Any]) -> float | None:
    ys = [x for x in xs if isinstance(x, (int, float))]
    return round(sum(ys) / len(ys), 4) if ys else None


def table(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = ["| rounds | n | states | Bonferroni intervals excluding no change (rounds) | rounds where an "
             "unadjusted 95 % interval would | tokens/round | s/round |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for kind in ("baseline", "unchanged", "temp-0.3", "template", "prefill"):
        if kind in s:
            k = s[kind]
            states = ", ".join(f"{st} {n}" for st, n in k["states"].items())
            sig = ", ".join(f"{m} {n}" for m, n in sorted(k["significant_by_measure"].items())) or "none"
            loose = ", ".join(f"{m} {n}" for m, n in sorted(k["unadjusted_95_by_measure"].items())) or "none"
            lines.append(f"| {kind} | {k['rounds']} | {states} | {sig} | {k['rounds_with_an_unadjusted_95_claim']} "
                         f"({loose}) | {k['tokens_per_round']} | {k['seconds_per_round']} |")
    return "\n".join(lines)


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default=os.environ.get("ENTROPY_PROXY_TEST_VLLM_URL", "http://127.0.0.1:8011"))
    p.add_argument("--model", default="smollm2")
    p.add_argument("--vocab-size", type=int, default=49_152)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--baseline", type=int, default=5)
    p.add_argument("--unchanged", type=int, default=20)
    p.add_argument("--collapsed", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--out", default=str(ROOT / "test-artifacts" / "canary-bench.json"))
    p.add_argument("--resummarise", metavar="JSON", help="re-read a run's output and print its table again")
    args = p.parse_args()
    if args.resummarise:
        result = json.loads(Path(args.resummarise).read_text())
        result["summary"] = summarise(result["rounds"], args)
    else:
        result = anyio.run(main, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(result))
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    cli()
