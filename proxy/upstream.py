"""The one upstream connection pool, header forwarding, and learning the upstream's logprobs limit."""

from __future__ import annotations

import re
from collections.abc import Iterable

import httpx

from .errors import UpstreamBadResponse, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from .hotpath.h1 import H1Response, lean_client_for
from .settings import Settings

# The limit N in each engine's refusal of too many alternatives (docs/reliability.md, "Other engines"):
#   vLLM      "Requested sample logprobs of 21, which is greater than max allowed: 20 (parameter=logprobs, value=21)"
#   OpenAI    "Invalid 'top_logprobs': integer above maximum value. Expected a value <= 20, but got 21 instead."
#             (legacy completions: "... 'logprobs' ... less than or equal to 5")
#   TGI       "`top_n_tokens` must be >= 0 and <= 5. Given: 20"
#   Together  "5 is greater than the maximum of 1 - 'logprobs'"
_MAX_ALLOWED = re.compile(
    r"(?:greater than max allowed:|value <=|and <=|less than or equal to|greater than the maximum of)\s*(-?\d+)"
)
_ABOUT_LOGPROBS = re.compile(r"logprob|top_n_tokens", re.IGNORECASE)

HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
        "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length",
    }
)
# Headers of the proxy's own protocol, never forwarded upstream.
_OWN_REQUEST_HEADERS = frozenset({"x-entropy-detail"})


def max_allowed(message: object) -> int | None:
    """The limit N from an engine's 'too many logprobs' error message (see ``_MAX_ALLOWED``), if that is what
    this is: the message must be about logprobs, so an unrelated '<= 4096' (max_tokens) is not taken for it."""
    if isinstance(message, str) and _ABOUT_LOGPROBS.search(message):
        m = _MAX_ALLOWED.search(message)
        if m:
            return int(m.group(1))
    return None


def error_message(obj: object) -> object:
    """The message of an OpenAI-shaped (``{"error": {"message"}}``) or TGI-shaped (``{"error": str}``) body."""
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict):
            return err.get("message")
        return err
    return None


def request_headers(items: Iterable[tuple[str, str]], settings: Settings, annotated: bool) -> dict[str, str]:
    """Client headers to send upstream: all but hop-by-hop ones and the proxy's own."""
    out: dict[str, str] = {}
    for k, v in items:
        lk = k.lower()
        if lk in HOP_BY_HOP or lk in _OWN_REQUEST_HEADERS:
            continue
        if annotated and lk == "accept-encoding":
            continue  # the proxy must read annotated bodies: ask for them uncompressed
        if lk == "authorization" and (settings.upstream_api_key or settings.api_keys):
            continue  # the client's key was for the proxy; the upstream gets its own (below) or none
        out[k] = v
    if settings.upstream_api_key:
        out["Authorization"] = f"Bearer {settings.upstream_api_key}"
    if annotated:
        out["Accept-Encoding"] = "identity"
    return out


def response_headers(headers: httpx.Headers, *, keep_length: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in headers.multi_items():
        lk = k.lower()
        if lk in HOP_BY_HOP and not (keep_length and lk == "content-length"):
            continue
        if not keep_length and lk == "content-encoding":
            continue
        if lk in ("date", "server"):
            continue  # the proxy's server writes its own
        out[k] = v
    return out


def map_exception(exc: Exception) -> UpstreamError:
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"The upstream did not answer in time ({type(exc).__name__}).")
    if isinstance(exc, (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError,
                        httpx.NetworkError)):
        return UpstreamUnavailable(f"The upstream could not be reached ({type(exc).__name__}).")
    if isinstance(exc, UpstreamError):
        return exc
    return UpstreamBadResponse(f"The upstream request failed ({type(exc).__name__}).")


class Upstream:
    """Owns the long-lived ``httpx.AsyncClient`` and what the proxy has learnt about the upstream."""

    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self.client = httpx.AsyncClient(
            base_url=settings.upstream,
            timeout=httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=30),
            transport=transport,
            follow_redirects=False,
        )
        # The annotated routes' two calls go through the lean HTTP/1.1 client where it applies (plain http://, no
        # proxy from the environment, no injected transport); everything else through httpx.
        self.lean = None if transport is not None else lean_client_for(
            settings.upstream, timeout=settings.timeout_s, connect_timeout=settings.connect_timeout_s)
        # Learnt from the upstream's "greater than max allowed: N", per endpoint: OpenAI allows 20 alternatives
        # on chat but 5 on legacy completions.
        self.max_k: dict[str, int] = {}

    def k_for(self, endpoint: str) -> int:
        k = self.settings.top_k
        n = self.max_k.get(endpoint)
        return k if n is None or n < 0 else min(k, n)

    @property
    def k(self) -> int:
        return self.k_for("chat")

    def learn_max(self, n: int, endpoint: str = "chat") -> None:
        self.max_k[endpoint] = n

    async def post(self, path: str, content: bytes, headers: dict[str, str]) -> httpx.Response | H1Response:
        """POST and read the whole answer: ``status_code``, ``headers`` and ``content`` of the result."""
        if self.lean is None:
            return await self.client.post(path, content=content, headers=headers)
        resp = await self.lean.post(path, content, headers)
        try:
            await resp.aread()
        finally:
            await resp.aclose()
        return resp

    async def open_stream(self, path: str, content: bytes, headers: dict[str, str]) -> httpx.Response | H1Response:
        """POST and return once the status and headers are in; the body by ``aiter_raw()`` / ``aread()``, and the
        caller must ``aclose()`` the result."""
        if self.lean is None:
            return await self.client.send(
                self.client.build_request("POST", path, content=content, headers=headers), stream=True)
        return await self.lean.post(path, content, headers)

    async def aclose(self) -> None:
        if self.lean is not None:
            await self.lean.aclose()
        await self.client.aclose()
