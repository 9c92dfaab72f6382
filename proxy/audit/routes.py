"""``POST /v1/feedback`` and ``GET /audit`` (CONTRACT §3, §7).

Feedback body: ``{"id": str, "correct": bool, "score": float | null, "note": str | null, "reference": str | null}``;
unknown fields are ignored. 200 with the stored label, 404 ``not_found`` for an id the audit trail does not know,
400 with the OpenAI error shape for anything malformed. Repeated feedback for an id replaces the earlier label.

``reference`` is a correct answer written by someone else (at most ``MAX_REFERENCE_BYTES`` of UTF-8). It is not
stored: it goes to the recognition probe (``app.state.probe.submit_reference``), which re-scores it as off-policy
text in the background and records the result in the audit trail. The answer then says ``reference_queued``:
false when the probe is off, does not know the response any more, or its queue is full.

Who may call them is :class:`proxy.access.Access`: with ``admin_keys`` the page needs an admin key and feedback an
admin or client key; with ``api_keys`` only, a client key; with neither, loopback clients only unless
``audit.public`` is set. The page also accepts HTTP Basic with the key as password, so a browser can log in.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from monitors.calibration import calibration
from proxy.access import BASIC_REALM, Access
from proxy.audit.page import FLAGS, LABEL_CHOICES, render_page
from proxy.audit.report import Filters, build_report
from proxy.audit.store import AuditStore
from proxy.audit.writer import AuditWriter
from proxy.errors import BadRequest, BodyTooLarge, NotFound, ProxyError, Unauthorized, error_response

log = logging.getLogger("entropy_proxy.audit")

MAX_REFERENCE_BYTES = 64 * 1024
MAX_FEEDBACK_BYTES = 8 * MAX_REFERENCE_BYTES  # room for a reference written with JSON escapes
MAX_NOTE_CHARS = 4096
PENDING_WAIT_S = 2.0

# Published at /openapi.json; the route reads and checks the body itself (parse_feedback).
FEEDBACK_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object",
    "required": ["id", "correct"],
    "additionalProperties": True,
    "properties": {
        "id": {"type": "string", "minLength": 1, "maxLength": 255, "description": "the response's id"},
        "correct": {"type": "boolean"},
        "score": {"type": "number", "nullable": True},
        "note": {"type": "string", "maxLength": MAX_NOTE_CHARS, "nullable": True},
        "reference": {"type": "string", "minLength": 1, "nullable": True, "description":
                      "a correct answer the model did not write, at most 64 KiB of UTF-8: the recognition probe "
                      "re-scores it as off-policy text (not stored)"},
    },
}}}}}


def parse_feedback(raw: bytes) -> dict[str, Any]:
    """Validate a feedback body; raises :class:`BadRequest` naming the offending field."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    rid = body.get("id")
    if not isinstance(rid, str) or not rid.strip():
        raise BadRequest("'id' is required and must be a non-empty string", param="id")
    if len(rid) > 255:
        raise BadRequest("'id' is longer than 255 characters", param="id")
    if "correct" not in body:
        raise BadRequest("'correct' is required (true or false)", param="correct")
    if not isinstance(body["correct"], bool):
        raise BadRequest("'correct' must be a boolean", param="correct")
    score = body.get("score")
    if score is not None:
        if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
            raise BadRequest("'score' must be a finite number or null", param="score")
        score = float(score)
    note = body.get("note")
    if note is not None:
        if not isinstance(note, str):
            raise BadRequest("'note' must be a string or null", param="note")
        if len(note) > MAX_NOTE_CHARS:
            raise BadRequest(f"'note' is longer than {MAX_NOTE_CHARS} characters", param="note")
    reference = body.get("reference")
    if reference is not None:
        if not isinstance(reference, str):
            raise BadRequest("'reference' must be a string or null", param="reference")
        if not reference.strip():
            raise BadRequest("'reference' must not be empty", param="reference")
        if len(reference.encode("utf-8", "surrogatepass")) > MAX_REFERENCE_BYTES:
            raise BadRequest(f"'reference' is longer than {MAX_REFERENCE_BYTES} bytes of UTF-8", param="reference")
    return {"id": rid, "correct": body["correct"], "score": score, "note": note, "reference": reference}


def _submit_reference(request: Request, rid: str, text: str) -> bool:
    """Hand a reference answer to the recognition probe, if one is installed; True when it was queued."""
    probe = getattr(request.app.state, "probe", None)
    if probe is None:
        return False
    try:
        return bool(probe.submit_reference(rid, text))
    except Exception:  # noqa: BLE001 - the label is stored; the probe must not turn that into an error
        log.exception("probe.submit_reference failed")
        return False


def _metrics(request: Request) -> Any:
    return getattr(request.app.state, "metrics", None)


async def _update_metrics(
    request: Request, store: AuditStore, rows: list[dict[str, Any]], fb: dict[str, Any], window: int
) -> None:
    """Counters for the new label (``feedback`` also counts confident-wrong), then the calibration gauges."""
    m = _metrics(request)
    if m is None:
        return
    model = rows[0]["model"]
    m.feedback(
        model,
        fb["correct"],
        confident=any("confident" in r["flags"] for r in rows),
        mean_entropy=rows[0]["mean_entropy"],
        score=fb["score"],
        key=rows[0]["response_id"],
    )
    pairs = await store.labelled(model=model, limit=window)
    cal = calibration([q for q, _ in pairs], [1.0 if ok else 0.0 for _, ok in pairs])
    for measure, value in (("ece", cal.ece), ("brier", cal.brier), ("auroc", cal.auroc)):
        if value is not None:
            m.set_calibration(model, measure, value)


def make_router(writer: AuditWriter, access: Access, window: int = 2000) -> APIRouter:
    router = APIRouter()
    store = writer.store

    @router.post("/v1/feedback", openapi_extra=FEEDBACK_BODY, summary="Label an earlier response (CONTRACT §7)")
    async def post_feedback(request: Request) -> Response:
        try:
            access.check_label(request)
            raw = await request.body()
            if len(raw) > MAX_FEEDBACK_BYTES:
                raise BodyTooLarge(f"feedback body over {MAX_FEEDBACK_BYTES} bytes")
            fb = parse_feedback(raw)
            rid = fb["id"]
            try:
                # Asked before the read: the writer may commit the row and forget it between the two.
                was_pending = writer.is_pending(rid)
                rows = await store.get(rid)
                if not rows and (was_pending or writer.promote(rid) or writer.is_pending(rid)):
                    # The response is still on its way to the store: let the writer catch up.
                    await writer.flush(PENDING_WAIT_S)
                    rows = await store.get(rid)
                if not rows:
                    raise NotFound(f"no recorded response with id {rid!r}", param="id")
                prev = await store.set_feedback(rid, fb["correct"], fb["score"], fb["note"])
            except ProxyError:
                raise
            except Exception as e:  # noqa: BLE001 - the store is down: say so, in the OpenAI shape
                log.warning("feedback store failed: %s", type(e).__name__)
                return error_response(_StoreUnavailable("the audit store is unavailable"))
            if prev is None or bool(prev["correct"]) != fb["correct"]:
                try:
                    await _update_metrics(request, store, rows, fb, window)
                except Exception:  # noqa: BLE001 - metrics never fail a stored label
                    log.exception("feedback metrics failed")
        except ProxyError as err:
            return error_response(err)
        out = {
            "id": rid,
            "object": "feedback",
            "correct": fb["correct"],
            "score": fb["score"],
            "note": fb["note"],
            "replaced": prev is not None,
            "choices": len(rows),
        }
        if fb["reference"] is not None:
            out["reference_queued"] = _submit_reference(request, rid, fb["reference"])
        return JSONResponse(out)

    @router.get("/audit", response_class=HTMLResponse)
    async def audit_page(request: Request) -> Response:
        try:
            access.check_read(request, allow_basic=True)
        except Unauthorized as err:
            return error_response(err, headers={"WWW-Authenticate": BASIC_REALM})
        except ProxyError as err:
            return error_response(err)
        qp = request.query_params
        flag = qp.get("flag") or None
        label = qp.get("label") or None
        try:
            if flag is not None and flag not in FLAGS:
                raise BadRequest(f"'flag' must be one of {', '.join(FLAGS)}", param="flag")
            if label is not None and label not in LABEL_CHOICES:
                raise BadRequest(f"'label' must be one of {', '.join(LABEL_CHOICES)}", param="label")
            try:
                limit = max(1, min(500, int(qp.get("limit", "50"))))
            except ValueError:
                raise BadRequest("'limit' must be an integer", param="limit") from None
        except BadRequest as err:
            return error_response(err)
        filters = Filters(model=qp.get("model") or None, flag=flag, label=label, limit=limit)
        await writer.flush(PENDING_WAIT_S)  # responses still in the writer's batching window show too
        try:
            report = await build_report(store, filters, window=window, states=_states(request))
        except Exception as e:  # noqa: BLE001
            log.warning("audit page: store failed: %s", type(e).__name__)
            return error_response(_StoreUnavailable("the audit store is unavailable"))
        return HTMLResponse(render_page(report))

    return router


def _states(request: Request) -> dict[str, dict[str, Any]] | None:
    """Per model: the monitors' live ``state`` and ``diagnosis`` (``app.state.monitoring``), if installed."""
    monitoring = getattr(request.app.state, "monitoring", None)
    if monitoring is None:
        return None
    try:
        models = monitoring.status().get("models")
    except Exception:  # noqa: BLE001 - the page shows the store even when the monitors fail
        log.exception("audit page: monitoring status failed")
        return None
    return {str(m): v for m, v in models.items() if isinstance(v, dict)} if isinstance(models, dict) else None


class _StoreUnavailable(ProxyError):
    status = 503
    type = "api_error"
    code = "audit_store_unavailable"
