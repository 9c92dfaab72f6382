"""The proxy's exception tree, mapped to OpenAI-shaped error bodies in one place.

    ProxyError                      any failure the proxy answers itself
    ├── BadRequest           400    malformed JSON, wrong field types, invalid values   (invalid_request_error)
    ├── Unauthorized         401    missing or unknown API key                          (invalid_request_error)
    ├── NotFound             404    unknown id (feedback)                               (invalid_request_error)
    ├── RequestTimeout       408    the request body did not arrive in time             (invalid_request_error)
    ├── BodyTooLarge         413    request body over ``max_body_bytes``                (invalid_request_error)
    ├── ClientClosedRequest  499    the client went away (nginx's code; only ever seen in metrics and logs)
    └── UpstreamError               the upstream failed us
        ├── UpstreamUnavailable  502   connection refused / reset / protocol error       (code upstream_unavailable)
        ├── UpstreamTimeout      504   connect or read timeout                           (code upstream_timeout)
        └── UpstreamBadResponse  502   an answer the proxy cannot parse                   (code upstream_bad_response)

Upstream HTTP errors (4xx/5xx with a body) are not exceptions: their status and body pass through unchanged when
they already have the OpenAI shape; other engines' shapes (TGI's ``{"error": str, "error_type": str}``, FastAPI's
``{"detail": ...}``, an HTML page from a load balancer) are rewritten into it by :func:`normalise_error_body`.
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


class RequestTimeout(ProxyError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class ClientClosedRequest(ProxyError):
    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"


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


_KEYS = ("message", "type", "param", "code")
MAX_FOREIGN_MESSAGE = 1000


def normalise_error_body(content: bytes, status: int) -> bytes | None:
    """An upstream error body in the OpenAI shape: None when it already is (pass it on byte for byte), else the
    rewritten body. The upstream's message is kept (cut to 1,000 characters); nothing else is invented."""
    try:
        obj: Any = orjson.loads(content)
    except orjson.JSONDecodeError:
        obj = None
    default_type = "invalid_request_error" if status < 500 else "api_error"
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            if all(k in err for k in _KEYS):
                return None
            fixed = {**{k: None for k in _KEYS}, **err}  # e.g. llama.cpp: no "param"
            return orjson.dumps({**obj, "error": fixed})
        if isinstance(err, str):  # TGI: {"error": "...", "error_type": "validation"}
            kind = obj.get("error_type")
            type_ = "invalid_request_error" if kind == "validation" else default_type
            code = kind if isinstance(kind, str) else status
            return orjson.dumps(error_body(err[:MAX_FOREIGN_MESSAGE], type_, None, code))
        detail = obj.get("detail", obj.get("message"))
        if detail is not None:
            msg = detail if isinstance(detail, str) else orjson.dumps(detail).decode()
            return orjson.dumps(error_body(msg[:MAX_FOREIGN_MESSAGE], default_type, None, status))
    text = content.decode("utf-8", "replace").strip()[:MAX_FOREIGN_MESSAGE]
    msg = f"The upstream answered HTTP {status}" + (f": {text}" if text else " with an empty body.")
    return orjson.dumps(error_body(msg, default_type, None, status))


def error_response(err: ProxyError, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(err.body()), status_code=err.status, media_type="application/json", headers=headers)


def sse_error_event(err: ProxyError) -> bytes:
    """The one error event that ends a stream that failed midway (followed by ``data: [DONE]``)."""
    return b"data: " + orjson.dumps(err.body()) + b"\n\n"
