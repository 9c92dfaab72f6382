"""A vLLM-shaped upstream that replays recorded K=20 positions as fast as the machine allows.

The proxy, not a slow CPU model, is what a benchmark must measure: this server answers
``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming one token per chunk, or not; ``n``
choices) with real positions recorded from vLLM 0.32 (``tests/fixtures/vllm``), cycled to ``--tokens`` tokens.
It follows vLLM where a client can tell: the ``top_logprobs`` list is the sampled token first, then rank order,
trimmed to the request's K (legacy completions: the sampled token plus the top K, as a dict); K over
``--max-logprobs`` answers vLLM's 400, or when streaming its 200 stream carrying one error event;
``stream_options.include_usage`` adds the usage chunk; ``max_tokens`` shortens the answer. ``POST /tokenize`` (a
stand-in tokenizer, one id per character) and ``prompt_logprobs`` re-scoring serve the recognition probe.

Bodies are serialised once per request shape (orjson) and only the id (same length) is swapped per response;
HTTP is a raw asyncio protocol over httptools, measured 1.7x less server CPU than uvicorn+starlette for the same bodies
(docs/benchmarks.md). ``--entropy low`` synthesises peaked distributions (p(top1) = 0.99) over the recorded
tokens, for collapse tests; ``POST /_replay/config`` changes ``entropy``, ``tokens`` or ``token_delay_ms`` at
run time. Base URLs are given without ``/v1``.

    python -m bench.replay_upstream --port 8011 --tokens 128 [--token-delay-ms 2] [--entropy low]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from bench._http import HttpServer, Reply

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "vllm"
FINGERPRINT = "vllm-0.32.0-2d1a91bc"
PROMPT_TOKENS = 34
_ID_DIGITS = 16
SSE_TYPE = b"text/event-stream; charset=utf-8"
JSON_TYPE = b"application/json"


def load_positions(fixtures: Path = FIXTURES) -> list[dict[str, Any]]:
    """Every recorded K=20 chat position (``{token, logprob, bytes, top_logprobs}``), sampled token first."""
    out: list[dict[str, Any]] = []
    for name in ("chat_k20_long.json", "chat_k20.json"):
        body = orjson.loads((fixtures / name).read_bytes())
        out += body["choices"][0]["logprobs"]["content"]
    for line in (fixtures / "chat_stream_k20.sse").read_bytes().split(b"\n"):
        if line.startswith(b"data: {"):
            for c in orjson.loads(line[6:]).get("choices", []):
                out += (c.get("logprobs") or {}).get("content") or []
    return out


def peaked(pos: dict[str, Any]) -> dict[str, Any]:
    """The same tokens with a low-entropy distribution: the sampled token at p=0.99, the rest decaying."""
    tops = [dict(t) for t in pos["top_logprobs"]]
    tops[0]["logprob"] = math.log(0.99)
    for i, t in enumerate(tops[1:], start=1):
        t["logprob"] = math.log(0.005) - 0.5 * i  # sum of the rest ~0.0077: a valid distribution
    return {**pos, "logprob": tops[0]["logprob"], "top_logprobs": tops}


def _rank_of_sampled(tops: list[dict[str, Any]]) -> int:
    return 1 + sum(1 for t in tops[1:] if t["logprob"] > tops[0]["logprob"])


class RequestError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def body(self, compact: bool = True) -> bytes:
        err = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}
        # vLLM writes the 400 body with pydantic (compact) and the in-stream event with json.dumps (spaced).
        return orjson.dumps(err) if compact else json.dumps(err).encode()


class Replayer:
    """Request body in, pre-serialised vLLM-shaped reply out. Pure: no I/O, usable without a server."""

    def __init__(self, tokens: int = 128, model: str = "smollm2", max_logprobs: int = 20,
                 entropy: str = "normal", token_delay_ms: float = 0.0, fixtures: Path = FIXTURES) -> None:
        normal = load_positions(fixtures)
        self.pools = {"normal": normal, "low": [peaked(p) for p in normal]}
        if entropy not in self.pools:
            raise ValueError(f"entropy must be one of {sorted(self.pools)}")
        self.tokens, self.model, self.max_logprobs = tokens, model, max_logprobs
        self.entropy, self.token_delay_ms = entropy, token_delay_ms
        self.created = int(time.time())
        self._ids = itertools.count(1)
        self._cache: dict[tuple[Any, ...], list[bytes]] = {}
        self.requests = 0
        self.generated_tokens = 0
        self.status_counts: dict[int, int] = {}

    # ------------------------------------------------------------------ routing
    def handle(self, method: str, path: str, body: bytes) -> Reply:
        self.requests += 1
        path = path.split("?", 1)[0]
        if method == "GET" and path == "/v1/models":
            reply = Reply(200, JSON_TYPE, [self.models_body()])
        elif method == "GET" and path in ("/metrics", "/health"):
            reply = Reply(200, b"text/plain; version=0.0.4", [self.metrics_body() if path == "/metrics" else b""])
        elif method == "POST" and path == "/v1/completions" and b'"prompt_logprobs"' in body:
            reply = self.prompt_scoring(body)
        elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            reply = self.completion(path.endswith("chat/completions"), body)
        elif method == "POST" and path == "/tokenize":
            reply = self.tokenize(body)
        elif method == "POST" and path == "/_replay/config":
            reply = self.configure(body)
        else:
            err = RequestError(404, f"Not Found: {method} {path}", "NotFoundError", None)
            reply = Reply(404, JSON_TYPE, [err.body()])
        self.status_counts[reply.status] = self.status_counts.get(reply.status, 0) + 1
        return reply

    def models_body(self) -> bytes:
        card = {"id": self.model, "object": "model", "created": self.created, "owned_by": "vllm",
                "root": self.model, "parent": None, "max_model_len": 2048, "permission": []}
        return orjson.dumps({"object": "list", "data": [card]})

    def metrics_body(self) -> bytes:
        lbl = f'{{model_name="{self.model}"}}'
        lines = [
            "# TYPE vllm:generation_tokens_total counter", f"vllm:generation_tokens_total{lbl} {self.generated_tokens}",
            "# TYPE vllm:request_success_total counter",
            f"vllm:request_success_total{lbl} {self.status_counts.get(200, 0)}",
            "# TYPE vllm:num_requests_running gauge", f"vllm:num_requests_running{lbl} 0",
        ]
        return ("\n".join(lines) + "\n").encode()

    def configure(self, body: bytes) -> Reply:
        try:
            cfg = orjson.loads(body or b"{}")
            if cfg.get("entropy", self.entropy) not in self.pools:
                raise ValueError("entropy")
            self.entropy = cfg.get("entropy", self.entropy)
            self.tokens = int(cfg.get("tokens", self.tokens))
            self.token_delay_ms = float(cfg.get("token_delay_ms", self.token_delay_ms))
        except (ValueError, TypeError, AttributeError) as exc:
            return Reply(400, JSON_TYPE, [RequestError(400, str(exc), "BadRequestError", None).body()])
        state = {"entropy": self.entropy, "tokens": self.tokens, "token_delay_ms": self.token_delay_ms}
        return Reply(200, JSON_TYPE, [orjson.dumps(state)])

    # ------------------------------------------------------------------ re-scoring (the recognition probe's calls)
    @staticmethod
    def _token_ids(text: str) -> list[int]:
        """A stand-in tokenizer, one id per character (ids 100..49099): the probe needs ids, not a real split."""
        return [100 + ord(c) % 49_000 for c in text]

    def tokenize(self, raw: bytes) -> Reply:
        """vLLM's ``POST /tokenize`` for a ``prompt`` or chat ``messages`` (ChatML-rendered)."""
        req = orjson.loads(raw or b"{}")
        if "messages" in req:
            text = "".join(f"<|im_start|>{m.get('role')}\n{m.get('content')}<|im_end|>\n" for m in req["messages"])
            if req.get("add_generation_prompt"):
                text += "<|im_start|>assistant\n"
        else:
            text = str(req.get("prompt", ""))
        ids = self._token_ids(text)
        return Reply(200, JSON_TYPE, [orjson.dumps({"count": len(ids), "max_model_len": 2048, "tokens": ids,
                                                    "token_strs": None})])

    def prompt_scoring(self, raw: bytes) -> Reply:
        """``/v1/completions`` with ``prompt_logprobs: K`` over a list of ids: vLLM's per-position
        ``{id: {logprob, rank, decoded_token}}`` (the actual token always included), from the recorded
        positions of the current pool, so re-scored entropy follows the ``entropy`` setting as generation does."""
        req = orjson.loads(raw)
        k, ids = int(req["prompt_logprobs"]), list(req.get("prompt") or [])
        if k > self.max_logprobs:
            err = RequestError(400, f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                               f"{self.max_logprobs}", "BadRequestError", "prompt_logprobs")
            return Reply(400, JSON_TYPE, [err.body()])
        pool = self.pools[self.entropy]
        plp: list[Any] = [None]
        for j, actual in enumerate(ids[1:], start=1):
            tops = sorted(pool[j % len(pool)]["top_logprobs"], key=lambda t: -t["logprob"])[:k]
            # alternatives get ids above the stand-in tokenizer's range; the actual token is listed as well
            entry = {str(60_000 + r): {"logprob": t["logprob"], "rank": r + 1, "decoded_token": t["token"]}
                     for r, t in enumerate(tops)}
            entry[str(actual)] = {"logprob": tops[-1]["logprob"] - 1.0, "rank": k + 1, "decoded_token": "?"}
            plp.append(entry)
        body = {"id": f"cmpl-{next(self._ids)}", "object": "text_completion", "created": int(time.time()),
                "model": req.get("model", self.model),
                "choices": [{"index": 0, "text": "x", "logprobs": None, "finish_reason": "length",
                             "prompt_logprobs": plp}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}}
        return Reply(200, JSON_TYPE, [orjson.dumps(body)])

    # ------------------------------------------------------------------ completions
    def completion(self, chat: bool, raw: bytes) -> Reply:
        try:
            req = orjson.loads(raw)
            if not isinstance(req, dict):
                raise orjson.JSONDecodeError("not an object", "", 0)
        except orjson.JSONDecodeError as exc:
            err = RequestError(400, f"1 validation error:\n  JSON decode error: {exc}", "Bad Request", "body")
            return Reply(400, JSON_TYPE, [err.body()])
        try:
            shape = self._shape(chat, req)
        except RequestError as err:
            return Reply(err.status, JSON_TYPE, [err.body()])
        stream, k, n, tokens, usage = shape
        delay = self.token_delay_ms / 1000.0
        if k is not None and self.max_logprobs != -1 and (k > self.max_logprobs or k < 0):
            err = RequestError(400, f"Requested sample logprobs of {k}, which is greater than max allowed: "
                               f"{self.max_logprobs} (parameter=logprobs, value={k})", "BadRequestError", "logprobs")
            if not stream:
                return Reply(400, JSON_TYPE, [err.body()])
            return Reply(200, SSE_TYPE, [b"data: " + err.body(compact=False) + b"\n\n", b"data: [DONE]\n\n"],
                         stream=True)
        key = (chat, stream, k, n, tokens, usage, self.entropy)
        parts = self._cache.get(key)
        if parts is None:
            if len(self._cache) > 512:
                self._cache.clear()
            parts = self._cache[key] = self._render(chat, stream, k, n, tokens, usage)
        placeholder = self._id(chat, 0)
        new_id = self._id(chat, next(self._ids))
        self.generated_tokens += n * tokens
        if stream and delay > 0:
            # One part per event, the upstream pacing them; the role chunk(s) come at once, like vLLM's.
            return Reply(200, SSE_TYPE, [p.replace(placeholder, new_id) for p in parts], stream=True,
                         delay_s=delay, head_parts=n if chat else 0, paced=n * tokens, group=n)
        body = b"".join(parts).replace(placeholder, new_id)
        return Reply(200, SSE_TYPE if stream else JSON_TYPE, [body], stream=stream,
                     pre_delay_s=0.0 if stream else delay * tokens)

    def _shape(self, chat: bool, req: dict[str, Any]) -> tuple[bool, int | None, int, int, bool]:
        model = req.get("model")
        if model != self.model:
            raise RequestError(404, f"The model `{model}` does not exist. Valid aliases: {self.model}.",
                               "NotFoundError", "model")
        top = req.get("top_logprobs")
        lp = req.get("logprobs")
        if chat:
            if top is not None and (top == -1 or top > 0) and not lp:
                raise RequestError(400, "when using `top_logprobs`, `logprobs` must be set to true.",
                                   "BadRequestError", "top_logprobs")
            k = (top or 0) if lp else None
        else:
            k = None if lp is None or lp is False else int(lp)
        limit = req.get("max_completion_tokens") or req.get("max_tokens") or self.tokens
        tokens = max(1, min(int(limit), self.tokens))
        usage = bool((req.get("stream_options") or {}).get("include_usage"))
        return bool(req.get("stream")), k, max(1, int(req.get("n") or 1)), tokens, usage

    @staticmethod
    def _id(chat: bool, n: int) -> bytes:
        return (("chatcmpl-" if chat else "cmpl-") + format(n, f"0{_ID_DIGITS}x")).encode()

    def _positions(self, choice: int, tokens: int) -> list[dict[str, Any]]:
        pool = self.pools[self.entropy]
        start = choice * 37  # distinct choices for n > 1
        return [pool[(start + j) % len(pool)] for j in range(tokens)]

    @staticmethod
    def _chat_entry(pos: dict[str, Any], k: int) -> dict[str, Any]:
        return {"token": pos["token"], "logprob": pos["logprob"], "bytes": pos["bytes"],
                "top_logprobs": pos["top_logprobs"][:k]}

    @staticmethod
    def _legacy_top(pos: dict[str, Any], k: int) -> dict[str, float]:
        # vLLM's completions: the sampled token plus the top k (k+1 entries when it ranks below k).
        tops = pos["top_logprobs"]
        take = k if _rank_of_sampled(tops) <= k else k + 1
        return {t["token"]: t["logprob"] for t in tops[:take]}

    def _legacy_logprobs(self, positions: list[dict[str, Any]], k: int, offset: int = 0) -> dict[str, Any]:
        offsets, at = [], offset
        for p in positions:
            offsets.append(at)
            at += len(p["token"])
        return {"text_offset": offsets, "token_logprobs": [p["logprob"] for p in positions],
                "tokens": [p["token"] for p in positions],
                "top_logprobs": [self._legacy_top(p, k) for p in positions]}

    def _render(self, chat: bool, stream: bool, k: int | None, n: int, tokens: int, usage: bool) -> list[bytes]:
        rid = self._id(chat, 0).decode()
        per_choice = [self._positions(i, tokens) for i in range(n)]
        use = {"prompt_tokens": PROMPT_TOKENS, "total_tokens": PROMPT_TOKENS + n * tokens,
               "completion_tokens": n * tokens}
        if not stream:
            return [orjson.dumps(self._full_body(chat, rid, k, per_choice, use))]
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": rid, "object": obj, "created": self.created, "model": self.model}
        events: list[bytes] = []
        if chat:
            for i in range(n):
                role = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}
                events.append(orjson.dumps({**head, "choices": [role], "prompt_token_ids": None, "prompt_text": None}))
        offsets = [0] * n
        for j in range(tokens):
            for i, positions in enumerate(per_choice):
                pos, last = positions[j], j == tokens - 1
                fin = {"finish_reason": "length", "stop_reason": None} if last else {"finish_reason": None}
                if chat:
                    lp = None if k is None else {"content": [self._chat_entry(pos, k)]}
                    choice = {"index": i, "delta": {"content": pos["token"]}, "logprobs": lp, **fin,
                              "token_ids": None}
                else:
                    lp = None if k is None else self._legacy_logprobs([pos], k, offsets[i])
                    choice = {"index": i, "text": pos["token"], "logprobs": lp, "finish_reason": None,
                              "stop_reason": None, "prompt_token_ids": None, "token_ids": None}
                    choice.update(fin)
                    offsets[i] += len(pos["token"])
                chunk: dict[str, Any] = {**head, "choices": [choice]}
                if last and not usage:
                    chunk["system_fingerprint"] = FINGERPRINT
                events.append(orjson.dumps(chunk))
        if usage:
            events.append(orjson.dumps({**head, "choices": [], "usage": use, "system_fingerprint": FINGERPRINT}))
        return [b"data: " + e + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]

    def _full_body(self, chat: bool, rid: str, k: int | None, per_choice: list[list[dict[str, Any]]],
                   use: dict[str, int]) -> dict[str, Any]:
        choices: list[dict[str, Any]] = []
        for i, positions in enumerate(per_choice):
            text = "".join(p["token"] for p in positions)
            if chat:
                lp = None if k is None else {"content": [self._chat_entry(p, k) for p in positions]}
                msg = {"role": "assistant", "content": text, "refusal": None, "annotations": None, "audio": None,
                       "function_call": None, "reasoning": None}
                choices.append({"index": i, "message": msg, "logprobs": lp, "finish_reason": "length",
                                "stop_reason": None, "token_ids": None, "routed_experts": None})
            else:
                lp = None if k is None else self._legacy_logprobs(positions, k)
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": "length",
                                "stop_reason": None, "token_ids": None, "prompt_logprobs": None,
                                "prompt_token_ids": None, "routed_experts": None})
        body: dict[str, Any] = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                                "created": self.created, "model": self.model, "choices": choices,
                                "service_tier": None, "system_fingerprint": FINGERPRINT,
                                "usage": {**use, "prompt_tokens_details": None, "completion_tokens_details": None}}
        if chat:
            body.update(prompt_logprobs=None, prompt_token_ids=None, prompt_text=None)
        body.update(kv_transfer_params=None, ec_transfer_params=None, metrics=None)
        return body


def start_replay_upstream(host: str = "127.0.0.1", port: int = 0,
                          **opts: Any) -> tuple[str, Callable[[], None]]:
    """Serve a :class:`Replayer` from a daemon thread; returns ``(base_url, stop)``. ``stop.replayer`` is it."""
    replayer = Replayer(**opts)
    server = HttpServer(replayer.handle)
    url = server.start_in_thread(host, port)

    def stop() -> None:
        server.stop()

    stop.replayer = replayer  # type: ignore[attr-defined]
    return url, stop


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.replay_upstream", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--tokens", type=int, default=128, help="tokens per response (cycled recorded positions)")
    ap.add_argument("--token-delay-ms", type=float, default=0.0, help="pause between stream chunks")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--max-logprobs", type=int, default=20, help="like vLLM's --max-logprobs (-1: no limit)")
    ap.add_argument("--entropy", choices=("normal", "low"), default="normal")
    args = ap.parse_args(argv)
    replayer = Replayer(tokens=args.tokens, model=args.model, max_logprobs=args.max_logprobs,
                        entropy=args.entropy, token_delay_ms=args.token_delay_ms)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    print(f"replay upstream on http://{args.host}:{args.port} ({len(replayer.pools['normal'])} positions)",
          flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(HttpServer(replayer.handle).serve_forever(args.host, args.port))


if __name__ == "__main__":
    main()
