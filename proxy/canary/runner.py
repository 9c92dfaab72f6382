"""The canary: every ``canary.interval_s``, each prompt sampled ``canary.samples`` times at ``canary.temperature``
through the background sampler (purpose ``canary``, budget ``canary.max_tokens_per_hour``), reduced to the
measures of :mod:`monitors.canary`, kept per (model, revision) and compared with the revision's baseline rounds.

- **Samples**: one chat request per prompt with ``n = samples`` and logprobs (the proxy's K); per-token entropy is
  the proxy's own estimator over the returned top-K. Forking is read at a fixed threshold (``thresholds.forking``
  when a number, else 0.672 nats, Wang et al.): an adaptive one would follow the very change it should show.
- **Foreign text**: each prompt's ``reference`` is re-scored under the model after the same messages (``/tokenize``
  and ``/v1/completions`` with ``prompt_logprobs``, as the recognition probe does) every round; its mean entropy
  is H_off. A prompt without a reference gives no ratio; no prompt with one: no ratio at all.
- **Budget**: a round starts only when the budget left in the sliding hour covers the whole round's worst case;
  every request is still checked on its own (a round cut short is stored as incomplete and never joins a
  baseline).
- **Baseline**: the first ``MIN_BASELINE`` complete rounds of the (model, revision) at the same temperature and
  sample count. Until a revision has its own, its rounds are compared with the baseline of the model's most
  recently sampled other revision (a post-training change shipped as a new revision); with none, ``unknown``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np

from monitors import recognition as rec
from monitors.canary import PromptRound, measure_prompt, pass_k_for, round_measures
from monitors.canary_diagnosis import MIN_BASELINE, CanaryVerdict, compare, diagnose_canary
from monitors.collapse import fit_entropy_performance
from monitors.entropy import estimate_positions

from ..background.sampler import BackgroundSampler
from ..logprobs import chat_positions
from ..settings import Settings
from .prompts import Prompt, PromptSet
from .store import RoundRecord, RoundStore, previous_baseline

log = logging.getLogger("entropy_proxy.canary")

PURPOSE = "canary"
PAPER_FORKING = 0.672
MAX_MODELS = 8
SCORE_ALLOWANCE = 8  # tokens beyond the prompt and text a re-scoring request may count
LAW_ROUNDS = 200  # canary rounds behind the entropy-performance fit (one point per round: mean entropy, pass@1)
MIN_LAW_ROUNDS = 4


@dataclass(slots=True)
class ModelState:
    revision: str | None = None
    last: RoundRecord | None = None
    verdict: dict[str, Any] | None = None
    baseline_rounds: int = 0
    baseline_measures: dict[str, float | None] = field(default_factory=dict)
    rounds: int = 0
    incomplete: int = 0
    law_points: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=LAW_ROUNDS))


@dataclass(frozen=True, slots=True)
class Steering:
    """Changes to the canary's prompts that benchmarks use to make a model "collapse" on purpose: a system
    message, or the start of every answer forced (``prefill``: the answer continues it, ``continue_final_message``)."""

    system: str | None = None
    prefill: str | None = None

    def messages(self, prompt: Prompt) -> list[dict[str, str]]:
        msgs = prompt.with_system(self.system)
        return [*msgs, {"role": "assistant", "content": self.prefill}] if self.prefill else msgs

    def chat_template(self) -> dict[str, Any]:
        if self.prefill:
            return {"add_generation_prompt": False, "continue_final_message": True}
        return {"add_generation_prompt": True}


NO_STEERING = Steering()


def fixed_forking(settings: Settings) -> float:
    f = settings.thresholds.forking
    return float(f) if f != "adaptive" else PAPER_FORKING


class Canary:
    """``models()``: the models to sample (labels of the allow-list); ``revision(model)``: its current revision."""

    def __init__(
        self, settings: Settings, sampler: BackgroundSampler, prompts: PromptSet, rounds: RoundStore, *,
        models: Callable[[], list[str]], revision: Callable[[str], str], min_baseline: int = MIN_BASELINE,
    ) -> None:
        self.settings = settings
        self.cfg = settings.canary
        self.sampler = sampler
        self.prompts = prompts
        self.rounds = rounds
        self.models = models
        self.revision = revision
        self.min_baseline = min_baseline
        self.threshold = fixed_forking(settings)
        self.state: dict[str, ModelState] = {}
        self.counts = {"rounds": 0, "incomplete": 0, "skipped_budget": 0, "failed": 0}
        self.round_done = anyio.Event()
        self.looping = False  # the loop runs (in the leader worker only)
        sampler.add_purpose(PURPOSE, self.cfg.max_tokens_per_hour)

    # -- one prompt ------------------------------------------------------------------------------------------------
    def _body(self, model: str, prompt: Prompt, temperature: float, samples: int, steer: Steering) -> dict[str, Any]:
        extra = steer.chat_template() if steer.prefill else {}
        return {"model": model, "messages": steer.messages(prompt), "n": samples, "temperature": temperature,
                "max_tokens": prompt.max_tokens or self.cfg.max_tokens, **extra}

    async def _sample(self, model: str, prompt: Prompt, temperature: float, samples: int,
                      steer: Steering) -> tuple[list[str], list[np.ndarray], list[str | None], int] | None:
        data = await self.sampler.chat(PURPOSE, self._body(model, prompt, temperature, samples, steer))
        if data is None:
            return None
        texts: list[str] = []
        hs: list[np.ndarray] = []
        fins: list[str | None] = []
        vocab = self.settings.vocab_size_for(model)
        for choice in data.get("choices") or ():
            msg = choice.get("message") if isinstance(choice, dict) else None
            text = msg.get("content") if isinstance(msg, dict) else None
            lp = choice.get("logprobs") if isinstance(choice, dict) else None
            pos = chat_positions(lp.get("content") if isinstance(lp, dict) else None)
            if not isinstance(text, str) or pos.count == 0:
                continue
            est = estimate_positions(pos.logprobs, vocab, sampled_col=pos.sampled_col)
            texts.append((steer.prefill or "") + text)  # formats and answers are judged on the whole answer
            hs.append(np.asarray(est.point, dtype=np.float64))
            fins.append(choice.get("finish_reason"))
        usage = data.get("usage")
        tokens = usage.get("total_tokens", 0) if isinstance(usage, dict) else 0
        return (texts, hs, fins, int(tokens)) if texts else None

    async def _tokenize(self, body: dict[str, Any]) -> list[int] | None:
        data = await self.sampler.post(PURPOSE, "/tokenize", body, 0)
        ids = data.get("tokens") if data else None
        return ids if isinstance(ids, list) and all(isinstance(i, int) for i in ids) else None

    async def reference_entropy(self, model: str, prompt: Prompt, steer: Steering = NO_STEERING) -> float | None:
        """Mean per-token entropy (nats) of the prompt's reference text under the model, after its messages."""
        if prompt.reference is None:
            return None
        prompt_ids = await self._tokenize({"model": model, "messages": steer.messages(prompt),
                                           **steer.chat_template()})
        ids = await self._tokenize({"model": model, "prompt": prompt.reference, "add_special_tokens": False})
        if not prompt_ids or not ids:
            return None
        body = {"model": model, "prompt": prompt_ids + ids, "max_tokens": 1, "temperature": 0,
                "prompt_logprobs": self.sampler.logprobs_k()}
        data = await self.sampler.post(PURPOSE, "/v1/completions", body, len(prompt_ids) + len(ids) + SCORE_ALLOWANCE)
        choices = data.get("choices") if data else None
        plp = choices[0].get("prompt_logprobs") if choices and isinstance(choices[0], dict) else None
        if not isinstance(plp, list) or len(plp) < len(prompt_ids) + len(ids):
            return None
        entries = [e if isinstance(e, dict) else None for e in plp[len(prompt_ids):len(prompt_ids) + len(ids)]]
        lp, col, actual = rec.rows_from_prompt_logprobs(entries, ids)
        h = rec.score_rows(lp, col, actual, self.settings.vocab_size_for(model)).mean_entropy
        return h if math.isfinite(h) else None

    async def _prompt_round(self, model: str, prompt: Prompt, temperature: float, samples: int,
                            steer: Steering) -> tuple[PromptRound, int] | None:
        got = await self._sample(model, prompt, temperature, samples, steer)
        if got is None:
            return None
        texts, hs, fins, tokens = got
        h_off = await self.reference_entropy(model, prompt, steer)
        correct = [bool(prompt.check(t, f)) for t, f in zip(texts, fins, strict=True)] if prompt.checkable else None
        pr = measure_prompt(prompt.id, prompt.kind, texts, hs, threshold=self.threshold, correct=correct,
                            h_off=h_off, finish_reasons=fins)
        return pr, tokens

    # -- one round -------------------------------------------------------------------------------------------------
    def round_worst_case(self, model: str, prompts: list[Prompt], temperature: float, samples: int,
                         steer: Steering = NO_STEERING) -> int:
        total = 0
        for p in prompts:
            body = self._body(model, p, temperature, samples, steer)
            total += self.sampler.worst_case(body)
            if p.reference is not None:  # re-scoring: prompt plus reference, bounded by their bytes
                total += self.sampler.worst_case({**body, "n": 1, "max_tokens": 1}) + len(
                    p.reference.encode()) + SCORE_ALLOWANCE
        return total

    def _diagnose(self, record: RoundRecord, baseline: list[RoundRecord]) -> CanaryVerdict:
        """The round against baseline rounds: paired intervals per measure, then the diagnosis."""
        changes = compare([record.prompts], [b.prompts for b in baseline], k=pass_k_for(record.samples))
        return diagnose_canary(changes, baseline_rounds=len(baseline), min_baseline=self.min_baseline)

    async def run_round(
        self, model: str, *, temperature: float | None = None, samples: int | None = None,
        steer: Steering = NO_STEERING, store: bool = True, revision: str | None = None,
    ) -> RoundRecord | None:
        """Sample every prompt of ``model`` once (``samples`` each) and keep the round; None when the budget
        cannot cover it. ``temperature``/``samples``/``steer`` override the configuration (benchmarks)."""
        temperature = self.cfg.temperature if temperature is None else temperature
        samples = samples or self.cfg.samples
        prompts = self.prompts.for_model(model)
        st = self.sampler.stats()[PURPOSE]
        need = self.round_worst_case(model, prompts, temperature, samples, steer)
        if st["tokens_last_hour"] + st["reserved"] + need > st["budget"]:
            self.counts["skipped_budget"] += 1
            log.info("canary round for %s skipped: needs up to %d tokens, %d of %d used in the last hour",
                     model, need, st["tokens_last_hour"], st["budget"])
            return None
        results: list[tuple[PromptRound, int] | None] = [None] * len(prompts)

        async def one(i: int, p: Prompt) -> None:
            results[i] = await self._prompt_round(model, p, temperature, samples, steer)

        async with anyio.create_task_group() as tg:
            for i, p in enumerate(prompts):
                tg.start_soon(one, i, p)
        done = [r for r in results if r is not None]
        if not done:  # the upstream answered nothing usable: nothing to keep
            self.counts["failed"] += 1
            return None
        rev = revision or self.revision(model)
        record = RoundRecord(
            model=model, revision=rev, temperature=temperature, samples=samples, prompts=[r[0] for r in done],
            tokens=sum(r[1] for r in done), complete=len(done) == len(prompts) and bool(prompts),
            measures=round_measures([r[0] for r in done], pass_k_for(samples)), created=time.time())
        baseline = await self.rounds.baseline(model, rev, temperature, samples, self.min_baseline)
        ms = self.state.setdefault(model, ModelState())
        if len(baseline) < self.min_baseline:
            joins = record.complete and store
            reason = (f"baseline round {len(baseline) + 1} of {self.min_baseline}" if joins
                      else f"baseline has {len(baseline)} of {self.min_baseline} rounds")
            record.verdict = {"state": "unknown", "reasons": [reason], "changes": []}
            prev = await previous_baseline(self.rounds, model, rev, temperature, samples, self.min_baseline)
            if prev is not None:  # a new revision: compared with the one before it until it has its own baseline
                other, rounds = prev
                v = self._diagnose(record, rounds)
                record.verdict = {**v.to_dict(), "against_revision": other, "reasons": [
                    f"{reason} of revision {rev}: compared with revision {other}'s baseline", *v.reasons]}
        else:
            record.verdict = self._diagnose(record, baseline).to_dict()
        if store:
            await self.rounds.add(record)
            ms.revision, ms.last, ms.verdict = rev, record, record.verdict
            ms.rounds += 1
            h, acc = record.measures.get("mean_entropy"), record.measures.get("pass_1")
            if record.complete and h is not None and acc is not None:
                ms.law_points.append((h, acc))
            ms.incomplete += 0 if record.complete else 1
            ms.baseline_rounds = min(self.min_baseline, len(baseline) + (1 if record.complete else 0))
            if baseline:
                ms.baseline_measures = _mean_measures([b.measures for b in baseline])
            self.counts["rounds"] += 1
            self.counts["incomplete"] += 0 if record.complete else 1
            self.round_done.set()
            self.round_done = anyio.Event()
        return record

    async def run_all(self) -> None:
        for model in self.models()[:MAX_MODELS]:
            try:
                await self.run_round(model)
            except Exception:  # noqa: BLE001 - the canary must never take the proxy down
                self.counts["failed"] += 1
                log.exception("canary round for %s failed", model)

    async def loop(self) -> None:
        while True:
            await self.run_all()
            await anyio.sleep(self.cfg.interval_s)

    async def wait_rounds(self, n: int, timeout: float = 300.0) -> bool:
        """Wait until ``n`` rounds have been stored (tests); False on timeout."""
        with anyio.move_on_after(timeout):
            while self.counts["rounds"] < n:
                await self.round_done.wait()
            return True
        return False

    # -- readings --------------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.cfg.enabled, "interval_s": self.cfg.interval_s, "samples": self.cfg.samples,
            "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens,
            "forking_threshold": self.threshold, "min_baseline_rounds": self.min_baseline,
            "budget": self.sampler.stats().get(PURPOSE), "counts": dict(self.counts),
            "models": {
                m: {"revision": s.revision, "rounds": s.rounds, "baseline_rounds": s.baseline_rounds,
                    "state": (s.verdict or {}).get("state", "unknown"), "verdict": s.verdict,
                    "last_round": s.last.summary() if s.last else None,
                    "baseline_measures": {k: (None if v is None else round(v, 5))
                                          for k, v in s.baseline_measures.items()},
                    "performance_law": _law(s)}
                for m, s in list(self.state.items())
            },
        }


def _law(s: ModelState) -> dict[str, Any] | None:
    """R = -a exp(H) + b over this process's canary rounds (mean entropy, pass@1), once the entropy varies."""
    if len(s.law_points) < MIN_LAW_ROUNDS:
        return None
    arr = np.asarray(s.law_points, dtype=np.float64)
    fit = fit_entropy_performance(arr[:, 0], arr[:, 1])
    if fit is None:
        return None
    return {"a": round(fit.a, 5), "b": round(fit.b, 5), "ceiling": round(fit.ceiling, 5), "rounds": fit.n,
            "r2": round(fit.r2, 4)}


def _mean_measures(rows: list[dict[str, float | None]]) -> dict[str, float | None]:
    keys = {k for r in rows for k in r}
    out: dict[str, float | None] = {}
    for k in keys:
        vals = [v for r in rows if (v := r.get(k)) is not None]
        out[k] = sum(vals) / len(vals) if vals else None
    return out
