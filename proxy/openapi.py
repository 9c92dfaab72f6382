"""OpenAPI request-body schemas for the annotated routes (published at ``/openapi.json``).

The proxy reads request bodies itself (so unknown fields pass through untouched); these schemas describe the
fields it checks. ``additionalProperties`` stays open: vLLM accepts many extensions.
"""

from __future__ import annotations

from typing import Any

_COMMON: dict[str, Any] = {
    "model": {"type": "string"},
    "stream": {"type": "boolean", "nullable": True},
    "n": {"type": "integer", "minimum": 1, "nullable": True},
    "echo": {"type": "boolean", "nullable": True},
    "stream_options": {
        "type": "object", "nullable": True,
        "properties": {"include_usage": {"type": "boolean"}}, "additionalProperties": True,
    },
    "entropy_detail": {
        "type": "string", "enum": ["tokens", "summary"], "nullable": True,
        "description": "entropy-proxy: 'tokens' adds per_token entropies to the annotation (not forwarded)",
    },
}


def _body(props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    schema = {"type": "object", "properties": {**_COMMON, **props}, "required": required,
              "additionalProperties": True}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


CHAT_BODY = _body(
    {
        "messages": {"type": "array", "items": {"type": "object", "additionalProperties": True}},
        "logprobs": {"type": "boolean", "nullable": True},
        "top_logprobs": {"type": "integer", "minimum": -1, "nullable": True},
    },
    ["messages"],
)

COMPLETIONS_BODY = _body(
    {
        "prompt": {"oneOf": [{"type": "string"}, {"type": "array"}]},
        "logprobs": {"type": "integer", "minimum": -1, "nullable": True},
    },
    ["prompt"],
)
