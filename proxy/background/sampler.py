"""The one background sampler: upstream requests the proxy makes on its own behalf, under a token budget per purpose.

Purposes (``"canary"``, ``"semantic"``) each get ``max_tokens_per_hour``. The budget is a *sliding* hour: a
ledger of (time, tokens) charges, and a request is sent only when the tokens charged in the last 3,600 s, plus
the reservations of requests still in flight, plus this request's worst case fit in the budget. The worst case
is ``max_tokens * n`` plus the prompt: the prompt's actual token count when the same messages were sent before
(canary prompts repeat every round), else its UTF-8 byte count (an upper bound for byte-level BPE tokenizers)
plus an allowance for the chat template. After the answer, the reservation is released and the *actual*
``usage.total_tokens`` is charged; an answer without ``usage`` is charged its worst case, and so is a timeout or a
dropped connection (the upstream may have generated). So, as long as the upstream honours ``max_tokens``, the
tokens charged in any hour never exceed the budget.

Never raises into the caller for upstream trouble: :meth:`BackgroundSampler.chat` returns ``None`` and counts
``refused`` (budget) or ``errors`` (network, status, malformed JSON). :meth:`BackgroundSampler.spawn` runs a
coroutine in the sampler's task group, at most ``queue_size`` at once (a bounded queue: ``False`` when full, and
the coroutine is closed unrun); upstream requests are bounded by ``concurrency`` whatever is spawned.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import orjson
from anyio.abc import TaskGroup

from ..settings import Settings
from ..upstream import error_message, max_allowed, request_headers

log = logging.getLogger("entropy_proxy.background")

HOUR = 3600.0
DEFAULT_MAX_TOKENS = 256  # put into a body that names no max_tokens: the worst case must be finite
TEMPLATE_ALLOWANCE = 96  # tokens a chat template may add around the messages (SmolLM2's default system prompt: ~30)
PER_MESSAGE_ALLOWANCE = 8
QUEUE_SIZE = 32
PROMPT_CACHE = 512


@dataclass
class _Purpose:
    budget: int
    ledger: deque[tuple[float, int]] = field(default_factory=deque)  # (time, tokens charged)
    reserved: int = 0  # worst cases of requests in flight
    tokens_total: int = 0
    requests: int = 0
    refused: int = 0
    errors: int = 0
    spawned: int = 0
    dropped: int = 0  # spawn() refused: queue full or not running

    def used(self, now: float) -> int:
        while self.ledger and self.ledger[0][0] <= now - HOUR:
            self.ledger.popleft()
        return sum(t for _, t in self.ledger)


def _max_tokens(body: dict[str, Any]) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    body["max_tokens"] = DEFAULT_MAX_TOKENS
    return DEFAULT_MAX_TOKENS


def _prompt_key(body: dict[str, Any]) -> str:
    raw = orjson.dumps([body.get("model"), body.get("messages")], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha1(raw).hexdigest()


def _prompt_bound(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return TEMPLATE_ALLOWANCE
    n = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else m
        text = content if isinstance(content, str) else orjson.dumps(content).decode()
        n += len(text.encode("utf-8")) + PER_MESSAGE_ALLOWANCE
    return n + TEMPLATE_ALLOWANCE


class BackgroundSampler:
    """Upstream chat requests for background purposes, each under its own sliding-hour token budget.

    ``client`` is the upstream's ``httpx.AsyncClient`` or a getter for it (the app creates its client in the
    lifespan, after components are installed). ``k``: the logprobs count to force (default ``settings.top_k``).
    """

    def __init__(
        self, client: httpx.AsyncClient | Callable[[], httpx.AsyncClient], settings: Settings, *,
        concurrency: int = 1, k: Callable[[], int] | None = None, clock: Callable[[], float] = time.monotonic,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self._client = client if callable(client) and not isinstance(client, httpx.AsyncClient) else (lambda: client)
        self.settings = settings
        self.concurrency = max(1, concurrency)
        self._k = k or (lambda: settings.top_k)
        self._k_max: int | None = None
        self.clock = clock
        self.queue_size = queue_size
        self.purposes: dict[str, _Purpose] = {}
        self._prompt_tokens: dict[str, int] = {}
        self._limiter = anyio.CapacityLimiter(self.concurrency)
        self._tg: TaskGroup | None = None
        self.pending = 0  # spawned coroutines queued or running
        self.running_now = False
        self.collected = False  # its Prometheus collector is registered

    # -- purposes and budgets --------------------------------------------------------------------------------------
    def add_purpose(self, purpose: str, max_tokens_per_hour: int) -> None:
        """Register (or re-budget) a purpose; its name becomes a metric label, so purposes are fixed in code."""
        p = self.purposes.get(purpose)
        if p is None:
            self.purposes[purpose] = _Purpose(budget=max(0, int(max_tokens_per_hour)))
        else:
            p.budget = max(0, int(max_tokens_per_hour))

    def worst_case(self, body: dict[str, Any]) -> int:
        """Tokens a request can cost at most: ``max_tokens * n`` plus the prompt (see the module docstring)."""
        n = body.get("n")
        n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
        prompt = self._prompt_tokens.get(_prompt_key(body))
        return _max_tokens(body) * n + (prompt if prompt is not None else _prompt_bound(body))

    def _reserve(self, purpose: str, worst: int) -> bool:
        p = self.purposes[purpose]
        if p.used(self.clock()) + p.reserved + worst > p.budget:
            p.refused += 1
            return False
        p.reserved += worst
        return True

    def _charge(self, p: _Purpose, tokens: int) -> None:
        if tokens > 0:
            p.ledger.append((self.clock(), tokens))
            p.tokens_total += tokens

    def logprobs_k(self) -> int:
        """The logprobs count to ask for: the proxy's K, or the upstream's limit once learnt."""
        return self._k() if self._k_max is None else min(self._k(), self._k_max)

    # -- requests --------------------------------------------------------------------------------------------------
    async def chat(self, purpose: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """POST ``body`` to the upstream's ``/v1/chat/completions`` under ``purpose``'s budget.

        Logprobs are forced to the proxy's K unless the body sets ``logprobs`` itself. Returns the parsed JSON, or
        ``None`` when the budget cannot cover the worst case (counted ``refused``) or the upstream failed (counted
        ``errors``). Never raises for upstream trouble; an unknown purpose is a programming error (KeyError).
        """
        p = self.purposes[purpose]
        body = dict(body)
        body.setdefault("stream", False)
        if "logprobs" not in body:
            body["logprobs"] = True
            body["top_logprobs"] = self.logprobs_k()
        worst = self.worst_case(body)  # also fixes max_tokens in the body when it named none
        if not self._reserve(purpose, worst):
            return None
        charged = 0
        try:
            async with self._limiter:
                p.requests += 1
                data, charged = await self._send(body, worst)
            if data is None:
                p.errors += 1
            return data
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as e:
            charged = _spent(e, worst)
            p.errors += 1
            log.debug("background %s request failed: %r", purpose, e)
            return None
        except httpx.HTTPError as e:
            p.errors += 1
            log.debug("background %s request failed: %r", purpose, e)
            return None
        finally:
            p.reserved -= worst
            self._charge(p, charged)

    async def post(self, purpose: str, path: str, body: dict[str, Any], worst: int) -> dict[str, Any] | None:
        """POST ``body`` to another upstream route (``/tokenize``, ``/v1/completions`` for re-scoring) under
        ``purpose``'s budget, ``worst`` tokens reserved (0 for a route that generates nothing). Charged the
        answer's ``usage.total_tokens`` when it has one, else ``worst``. Same error contract as :meth:`chat`."""
        p = self.purposes[purpose]
        if not self._reserve(purpose, worst):
            return None
        charged = 0
        headers = {**request_headers((), self.settings, annotated=False), "Content-Type": "application/json"}
        try:
            async with self._limiter:
                p.requests += 1
                r = await self._client().post(path, content=orjson.dumps(body), headers=headers)
            data = _loads(r.content) if r.status_code == 200 else None
            if not isinstance(data, dict):
                p.errors += 1
                log.debug("background %s %s answered %s: %s", purpose, path, r.status_code, r.content[:200])
                charged = worst if r.status_code == 200 else 0
                return None
            usage = data.get("usage")
            total = usage.get("total_tokens") if isinstance(usage, dict) else None
            charged = total if isinstance(total, int) and total >= 0 else worst
            return data
        except httpx.HTTPError as e:
            charged = _spent(e, worst)
            p.errors += 1
            log.debug("background %s %s failed: %r", purpose, path, e)
            return None
        finally:
            p.reserved -= worst
            self._charge(p, charged)

    async def _send(self, body: dict[str, Any], worst: int) -> tuple[dict[str, Any] | None, int]:
        headers = {**request_headers((), self.settings, annotated=False), "Content-Type": "application/json"}
        for _ in range(2):
            r = await self._client().post("/v1/chat/completions", content=orjson.dumps(body), headers=headers)
            if r.status_code in (400, 422) and body.get("top_logprobs"):
                n = max_allowed(error_message(_loads(r.content)))
                if n is not None and 0 <= n < int(body["top_logprobs"]):
                    self._k_max = body["top_logprobs"] = n  # the upstream's --max-logprobs; use it from now on
                    continue
            if r.status_code != 200:
                log.debug("background request answered %s: %s", r.status_code, r.content[:200])
                return None, 0  # refused before generating
            data = _loads(r.content)
            if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
                return None, worst
            usage = data.get("usage")
            total = usage.get("total_tokens") if isinstance(usage, dict) else None
            prompt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
            if isinstance(prompt, int) and prompt >= 0:
                if len(self._prompt_tokens) >= PROMPT_CACHE:
                    self._prompt_tokens.pop(next(iter(self._prompt_tokens)))
                self._prompt_tokens[_prompt_key(body)] = prompt
            return data, (total if isinstance(total, int) and total >= 0 else worst)
        return None, 0

    # -- spawned work ----------------------------------------------------------------------------------------------
    def spawn(self, purpose: str, coro: Coroutine[Any, Any, Any]) -> bool:
        """Run ``coro`` in the sampler's task group; ``False`` (and the coroutine closed) when not running or when
        ``queue_size`` spawned coroutines are already queued or running. Its exceptions are logged and counted."""
        p = self.purposes.get(purpose)
        if self._tg is None or p is None or self.pending >= self.queue_size:
            if p is not None:
                p.dropped += 1
            coro.close()
            return False
        p.spawned += 1
        self.pending += 1
        self._tg.start_soon(self._guard, p, purpose, coro)
        return True

    async def _guard(self, p: _Purpose, purpose: str, coro: Coroutine[Any, Any, Any]) -> None:
        try:
            await coro
        except Exception:  # noqa: BLE001 - background work must never take the proxy down
            p.errors += 1
            log.exception("background %s task failed", purpose)
        finally:
            self.pending -= 1

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[BackgroundSampler]:
        async with anyio.create_task_group() as tg:
            self._tg, self.running_now = tg, True
            try:
                yield self
            finally:
                self._tg, self.running_now = None, False
                tg.cancel_scope.cancel()

    async def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until no spawned coroutine is queued or running (tests, shutdown); False on timeout."""
        with anyio.move_on_after(timeout):
            while self.pending > 0:
                await anyio.sleep(0.02)
            return True
        return False

    # -- readings --------------------------------------------------------------------------------------------------
    def tokens_last_hour(self, purpose: str) -> int:
        return self.purposes[purpose].used(self.clock())

    def stats(self) -> dict[str, dict[str, Any]]:
        now = self.clock()
        return {
            name: {
                "tokens_last_hour": p.used(now), "budget": p.budget, "reserved": p.reserved,
                "tokens_total": p.tokens_total, "requests": p.requests, "refused": p.refused, "errors": p.errors,
                "spawned": p.spawned, "dropped": p.dropped,
            }
            for name, p in list(self.purposes.items())
        }

    def status(self) -> dict[str, Any]:
        return {"running": self.running_now, "concurrency": self.concurrency, "pending": self.pending,
                "purposes": self.stats()}


def _spent(e: httpx.HTTPError, worst: int) -> int:
    """Tokens to charge for a request that failed in transport: none when it never reached the upstream, else
    the worst case (the upstream may have generated before the connection went or the timeout struck)."""
    if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
        return 0
    return worst if isinstance(e, (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)) else 0


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None

