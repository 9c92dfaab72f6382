"""A vLLM-shaped upstream that answers each chat request with a recorded answer to the same request.

The request's messages and temperature name the recorded variant and prompt (``record.request_body``); the
answers recorded for it are served in turn, as vLLM 0.32 wrote them (non-streaming chat, the sampled token and
the top 20 per position). ``GET /v1/models`` reports ``root`` = the revision, which ``POST /_replay/config
{"revision": ...}`` changes at run time: a deploy of a new model revision, as the proxies' revision lookup sees it.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from typing import Any

import orjson

from bench._http import HttpServer, Reply
from monitors.formats import classify_format

from .record import ONE_FORMAT, VARIANTS, request_body

JSON = b"application/json"
PLACEHOLDER = b"chatcmpl-" + b"0" * 16


def _key(messages: Any, temperature: Any) -> str:
    return json.dumps([messages, float(temperature if temperature is not None else 1.0)], sort_keys=True)


class RecordedUpstream:
    def __init__(self, recording: dict[str, Any], model: str = "smollm2", revision: str = "r1") -> None:
        self.model, self.revision = model, revision
        self.created = int(time.time())
        table = recording["tokens"]
        self.bodies: dict[str, list[bytes]] = {}
        for key, answers in recording["answers"].items():
            variant, _cls, prompt = key.split("|", 2)
            req = request_body(model, variant, prompt)
            self.bodies[_key(req["messages"], req["temperature"])] = [self._render(a, table) for a in answers]
        # The one-format variant: every prompt answered from the pool of recorded temperature-1 code blocks.
        pool = [self._render(a, table) for key, answers in recording["answers"].items()
                if VARIANTS[key.split("|", 1)[0]][0] == 1.0 for a in answers
                if classify_format(a["text"], a["finish"]) == "code"]
        for prompts in recording["prompts"].values():
            for prompt in prompts:
                req = request_body(model, ONE_FORMAT, prompt)
                self.bodies[_key(req["messages"], req["temperature"])] = pool
        self._turn: dict[str, itertools.cycle[bytes]] = {k: itertools.cycle(v) for k, v in self.bodies.items()}
        self._ids = itertools.count(1)
        self.served = 0

    def _render(self, answer: dict[str, Any], table: list[str]) -> bytes:
        content = []
        for pos in answer["positions"]:
            tok, lp, top_ids, top_lps = pos[0], pos[1], pos[2], pos[3]
            raw = pos[4] if len(pos) > 4 else list(table[tok].encode())
            tops = [{"token": table[i], "logprob": v, "bytes": list(table[i].encode())}
                    for i, v in zip(top_ids, top_lps, strict=True)]
            content.append({"token": table[tok], "logprob": lp, "bytes": raw, "top_logprobs": tops})
        n = len(content)
        body = {"id": PLACEHOLDER.decode(), "object": "chat.completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer["text"],
                                                     "refusal": None, "tool_calls": []},
                             "logprobs": {"content": content}, "finish_reason": answer["finish"],
                             "stop_reason": None}],
                "usage": {"prompt_tokens": 30, "total_tokens": 30 + n, "completion_tokens": n}}
        return orjson.dumps(body)

    def handle(self, method: str, path: str, body: bytes) -> Reply:
        path = path.split("?", 1)[0]
        if method == "GET" and path == "/v1/models":
            card = {"id": self.model, "object": "model", "created": self.created, "owned_by": "vllm",
                    "root": self.revision, "parent": None, "max_model_len": 2048}
            return Reply(200, JSON, [orjson.dumps({"object": "list", "data": [card]})])
        if method == "GET" and path in ("/health", "/metrics"):
            return Reply(200, b"text/plain", [b""])
        if method == "POST" and path == "/_replay/config":
            cfg = orjson.loads(body or b"{}")
            self.revision = str(cfg.get("revision", self.revision))
            return Reply(200, JSON, [orjson.dumps({"revision": self.revision})])
        if method == "POST" and path == "/v1/chat/completions":
            req = orjson.loads(body)
            turn = self._turn.get(_key(req.get("messages"), req.get("temperature")))
            if turn is None or req.get("model") != self.model:
                err = {"error": {"message": "no recorded answer for this request", "type": "NotFoundError",
                                 "param": None, "code": 404}}
                return Reply(404, JSON, [orjson.dumps(err)])
            self.served += 1
            rendered = next(turn).replace(PLACEHOLDER, f"chatcmpl-{next(self._ids):016x}".encode(), 1)
            return Reply(200, JSON, [rendered])
        return Reply(404, JSON, [b'{"error":{"message":"not found","type":"NotFoundError","param":null,"code":404}}'])


def start(recording: dict[str, Any], **kwargs: Any) -> tuple[str, RecordedUpstream, Callable[[], None]]:
    """Serve from a daemon thread; returns ``(base_url, upstream, stop)``."""
    upstream = RecordedUpstream(recording, **kwargs)
    server = HttpServer(upstream.handle)
    url = server.start_in_thread("127.0.0.1", 0)
    return url, upstream, server.stop


def variants() -> list[str]:
    return list(VARIANTS)
