"""The SDK set-up: a TracerProvider of the proxy's own (never the global one: FastAPI switches on its own
request telemetry as soon as a global provider exists), a batch span processor with a bounded queue, and the
OTLP/HTTP exporter, all configured by the standard ``OTEL_*`` environment variables.

Loss is counted, never waited for: a span that finds the queue full is dropped (``queue_full``), a batch the
exporter could not deliver is dropped (``export_failed``), spans still queued when a stop's time ran out are
dropped (``shutdown``) — all in ``entropy_proxy_otel_dropped_total{reason}``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from urllib.parse import urlsplit

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry, Counter

from .spans import Tracing

log = logging.getLogger("entropy_proxy.otel")

NS = "entropy_proxy_otel"
DEFAULT_SERVICE_NAME = "entropy-proxy"


class Counters:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.exported = Counter(f"{NS}_exported_spans", "Spans the OTLP exporter delivered.", registry=registry)
        self.dropped = Counter(f"{NS}_dropped", "Spans lost before delivery, by reason (queue_full: the batch "
                               "queue was full; export_failed: the exporter could not deliver the batch; "
                               "shutdown: still queued when a stop's time ran out).", ["reason"], registry=registry)
        for reason in ("queue_full", "export_failed", "shutdown"):
            self.dropped.labels(reason)


class CountingExporter(SpanExporter):
    """Delegates to the OTLP exporter and counts what it delivered and what it lost."""

    def __init__(self, inner: SpanExporter, counters: Counters) -> None:
        self.inner = inner
        self.counters = counters

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:  # noqa: BLE001 - an exporter bug must not kill the worker thread
            log.exception("span export raised")
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.counters.exported.inc(len(spans))
        else:
            self.counters.dropped.labels("export_failed").inc(len(spans))
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """The SDK's batch processor (bounded queue, export on its own thread) with its drops counted: the SDK
    drops the oldest span when the queue is full and only logs it."""

    def __init__(self, exporter: SpanExporter, counters: Counters) -> None:
        super().__init__(exporter)
        self.counters = counters
        self._bp = self._batch_processor
        self.max_queue_size = int(self._bp._max_queue_size)  # noqa: SLF001

    def queued(self) -> int:
        return len(self._bp._queue)  # noqa: SLF001

    def on_end(self, span: ReadableSpan) -> None:
        if not (span.context and span.context.trace_flags.sampled):
            return
        if self._bp._shutdown:  # noqa: SLF001
            self.counters.dropped.labels("shutdown").inc()
            return
        if self.queued() >= self.max_queue_size:
            self.counters.dropped.labels("queue_full").inc()
        self._bp.emit(span)

    def shutdown(self, timeout_millis: int = 30000) -> None:
        if self._bp._shutdown:  # noqa: SLF001 - the lifespan's stop, then the provider's atexit hook
            return
        self._bp.shutdown(timeout_millis=timeout_millis)
        left = self.queued()
        if left:
            self.counters.dropped.labels("shutdown").inc(left)
            log.warning("%d spans were still queued when the exporter's time ran out", left)


def _resource() -> Resource:
    resource = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return resource


def build(upstream_url: str, registry: CollectorRegistry) -> Tracing:
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol and protocol != "http/protobuf":
        log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s: the proxy exports OTLP over HTTP (http/protobuf) only", protocol)
    # The SDK logs every dropped span at WARNING from the request path; the drops are counted instead.
    logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)
    counters = Counters(registry)
    processor = CountingBatchSpanProcessor(CountingExporter(OTLPSpanExporter(), counters), counters)
    provider = TracerProvider(resource=_resource())  # sampler: OTEL_TRACES_SAMPLER(_ARG)
    provider.add_span_processor(processor)
    u = urlsplit(upstream_url)
    port = u.port or (443 if u.scheme == "https" else 80)
    return Tracing(provider, processor, (u.hostname or "", port))
