"""The ASGI application: thin routes over :class:`~proxy.service.ProxyService` and the pass-through.

Components (metrics, audit, probe) plug in through ``install(app, settings, hub, registry)``; their routes are
added before the ``/v1/{path}`` catch-all, and the async context managers they return live as long as the app.
"""

from __future__ import annotations

import hmac
import importlib
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import httpx
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from monitors.summary import SummaryThresholds

from .annotate import Annotator
from .errors import BadRequest, ProxyError, Unauthorized, error_body, error_response
from .observe import ObserverHub
from .openapi import CHAT_BODY, COMPLETIONS_BODY
from .service import ProxyService, read_body
from .settings import Settings
from .upstream import Upstream, map_exception, request_headers, response_headers
from .workers.env import worker_env

log = logging.getLogger("entropy_proxy")

# Optional components, each a module with install(); a missing module is skipped (it is not installed yet).
# proxy.background runs the shared background sampler; the parts that sample through it come after it.
COMPONENTS = ("proxy.metrics", "proxy.audit", "proxy.baselines", "proxy.probe", "proxy.semantic", "proxy.background",
              "proxy.canary", "proxy.otel")
# vLLM's routes outside /v1 that clients call through the proxy's URL, passed through unchanged (CONTRACT §9);
# value: whether api_keys apply (health checks and the version carry none, as with vLLM's own --api-key).
VLLM_ROUTES = {"/tokenize": True, "/detokenize": True, "/version": False, "/health": False, "/ping": False}
PAPER_FORKING_THRESHOLD = 0.672  # Wang et al. 2025: 80th percentile on Qwen3-8B; used until a window exists
MAX_DISCOVERED_MODELS = 32


async def _discover_models(app: FastAPI, upstream: Upstream, settings: Settings) -> None:
    """Without a configured ``models`` allow-list, label metrics with the models the upstream serves.

    The upstream's own list is bounded and not client-controlled, so labels stay bounded; retried until it answers.
    """
    for _ in range(360):
        try:
            r = await upstream.client.get("/v1/models", headers=request_headers((), settings, annotated=False),
                                          timeout=5.0)
            data = r.json().get("data") if r.status_code == 200 else None
            if isinstance(data, list):
                ids = [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
                ids = ids[:MAX_DISCOVERED_MODELS]
                for name in ("metrics", "monitoring"):
                    target = getattr(app.state, name, None)
                    if target is not None:
                        target.allowed = type(target.allowed)(ids)
                log.info("metric labels for models: %s", ", ".join(ids) or "(none)")
                return
        except (httpx.HTTPError, ValueError, AttributeError):
            pass
        await anyio.sleep(10)


def _check_key(request: Request, keys: list[str]) -> None:
    if not keys:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    ok = False
    for k in keys:  # compare against every key, so timing says nothing about which one nearly matched
        ok |= hmac.compare_digest(given.encode(), k.encode())
    if not ok:
        raise Unauthorized("Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.")


def _thresholds(s: Settings) -> SummaryThresholds:
    t = s.thresholds
    return SummaryThresholds(
        confident_mean=t.confident_mean, uncertain_mean=t.uncertain_mean, low_confidence_prob=t.low_confidence_prob,
        forking_heavy_fraction=t.forking_heavy_fraction, tail_mass=t.tail_mass,
    )


def create_app(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    components: tuple[str, ...] = COMPONENTS,
) -> FastAPI:
    registry = registry if registry is not None else CollectorRegistry()
    hub = ObserverHub()
    contexts: list[Any] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.upstream = upstream = Upstream(settings, transport=transport)
        app.state.service = ProxyService(upstream, hub, annotator)
        try:
            async with AsyncExitStack() as stack:
                for cm in contexts:
                    await stack.enter_async_context(cm)
                async with anyio.create_task_group() as tg:
                    if not settings.models:
                        tg.start_soon(_discover_models, app, upstream, settings)
                    try:
                        yield
                    finally:
                        tg.cancel_scope.cancel()
        finally:
            await upstream.aclose()

    app = FastAPI(
        title="entropy-proxy",
        version="0.2.0",
        description="OpenAI-compatible proxy for vLLM that annotates every response with per-token entropy.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.hub = hub
    app.state.registry = registry
    # Background work (samplers, baseline writer) runs in the leader only: worker 0 of serve --workers N.
    app.state.is_leader = worker_env().is_leader

    def forking_threshold(model: str) -> float:
        fixed = settings.thresholds.forking
        if fixed != "adaptive":
            return float(fixed)
        monitoring = getattr(app.state, "monitoring", None)
        if monitoring is not None:
            return float(monitoring.current_forking_threshold(model))
        return PAPER_FORKING_THRESHOLD

    annotator = Annotator(_thresholds(settings), settings.vocab_size, forking_threshold, settings.vocab_size_for)

    @app.exception_handler(ProxyError)
    async def _proxy_error(request: Request, exc: ProxyError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        return error_response(BadRequest(str(first.get("msg", "invalid request")), param=".".join(loc) or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found" if exc.status_code == 404 else "invalid_request"
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, kind), exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("The proxy failed to handle this request.", "api_error", None,
                                       "internal_error"), 500)

    @app.post("/v1/chat/completions", openapi_extra=CHAT_BODY, summary="Chat completion, annotated with entropy")
    async def chat(request: Request) -> Response:
        _check_key(request, settings.api_keys)
        return await app.state.service.handle(request, "chat")

    @app.post("/v1/completions", openapi_extra=COMPLETIONS_BODY, summary="Completion, annotated with entropy")
    async def completions(request: Request) -> Response:
        _check_key(request, settings.api_keys)
        return await app.state.service.handle(request, "completions")

    # The two annotated routes are matched first by plain Starlette routes with the same handlers: FastAPI's route
    # (dependency solving, body handling) and the scan of the routes before them cost about 0.15 ms a request on
    # an idle core, and these handlers take the Request and nothing else. The FastAPI routes above stay for the
    # OpenAPI document; requests never reach them.
    app.router.routes[0:0] = [
        Route("/v1/chat/completions", chat, methods=["POST"], include_in_schema=False),
        Route("/v1/completions", completions, methods=["POST"], include_in_schema=False),
    ]

    @app.get("/healthz", summary="200 while the proxy runs")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="200 only while the upstream answers")
    async def readyz() -> Response:
        client: httpx.AsyncClient = app.state.upstream.client
        try:
            with anyio.fail_after(min(5.0, settings.timeout_s)):
                r = await client.get("/v1/models", headers=request_headers((), settings, annotated=False))
            ok = r.status_code < 500
        except (httpx.HTTPError, TimeoutError):
            ok = False
        if ok:
            return JSONResponse({"status": "ready"})
        return JSONResponse(error_body("The upstream does not answer.", "api_error", None, "upstream_unavailable"),
                            503)

    for name in components:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        cm = module.install(app, settings, hub, registry)
        if cm is not None:
            contexts.append(cm)

    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                   include_in_schema=False)
    async def passthrough(request: Request, path: str) -> Response:
        _check_key(request, settings.api_keys)
        return await _pass_through(request, app.state.upstream, settings)

    for route, keyed in VLLM_ROUTES.items():
        app.add_api_route(route, _vllm_route(app, settings, keyed), methods=["GET", "POST", "HEAD"],
                          include_in_schema=False)

    return app


def _vllm_route(app: FastAPI, settings: Settings, keyed: bool) -> Any:
    async def route(request: Request) -> Response:
        if keyed:
            _check_key(request, settings.api_keys)
        return await _pass_through(request, app.state.upstream, settings)

    return route


async def _pass_through(request: Request, upstream: Upstream, settings: Settings) -> Response:
    """Any other ``/v1/*`` request: forwarded as it came, the answer streamed back with status and headers."""
    has_body = request.method not in ("GET", "HEAD", "OPTIONS")
    body = await read_body(request, settings.max_body_bytes) if has_body else None
    url = httpx.URL(path=request.url.path, query=request.url.query.encode())
    req = upstream.client.build_request(
        request.method, url, content=body, headers=request_headers(request.headers.items(), settings, annotated=False)
    )
    try:
        resp = await upstream.client.send(req, stream=True)
    except httpx.HTTPError as e:
        raise map_exception(e) from None

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in resp.aiter_raw():
                yield chunk
        except httpx.HTTPError as e:
            log.warning("pass-through body from upstream failed midway: %s", type(e).__name__)
        finally:
            with anyio.CancelScope(shield=True):
                await resp.aclose()

    return StreamingResponse(relay(), status_code=resp.status_code,
                             headers=response_headers(resp.headers, keep_length=True))
