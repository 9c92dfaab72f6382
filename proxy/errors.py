"""The proxy's exception tree, mapped to OpenAI-shaped error bodies in one place.

    ProxyError                      any failure the proxy answers itself
    ├── BadRequest           400    malformed JSON, wrong field types, invalid values   (invalid_request_error)
    ├── Unauthorized         401    missing or unknown API key                          (invalid_request_error)
    ├── NotFound             404    unknown id (feedback)                               (invalid_request_error)
    ├── BodyTooLarge         413    request body over ``max_body_bytes``                (invalid_request_error)
    └── UpstreamError               the upstream failed us
        ├── UpstreamUnavailable  502   connection refused / reset / protocol error       (code upstream_unavailable)
        ├── UpstreamTimeout      504   connect or read timeout                           (code upstream_timeout)
        └── UpstreamBadResponse  502   an answer the proxy cannot parse                   (code upstream_bad_response)

Upstream HTTP errors (4xx/5xx with a body) are not exceptions: their status and body pass through unchanged.
Every body has the shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


class ProxyError(Exception):
    status = 500
    type = "api_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class BodyTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UpstreamError(ProxyError):
    status = 502
    type = "api_error"
    code = "upstream_error"
    kind = "unavailable"  # label value for entropy_proxy_upstream_errors_total{kind}


class UpstreamUnavailable(UpstreamError):
    code = "upstream_unavailable"
    kind = "unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
    kind = "timeout"


class UpstreamBadResponse(UpstreamError):
    code = "upstream_bad_response"
    kind = "bad_response"


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(err: ProxyError, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(err.body()), status_code=err.status, media_type="application/json", headers=headers)


def sse_error_event(err: ProxyError) -> bytes:
    """The one error event that ends a stream that failed midway (followed by ``data: [DONE]``)."""
    return b"data: " + orjson.dumps(err.body()) + b"\n\n"
