"""A fake OTLP/HTTP trace receiver on 127.0.0.1 for the export tests: decodes what the SDK sends, can hold
every request until released (a slow collector), and tells the test when a request has arrived."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


class Collector:
    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.requests = 0
        self.arrived = threading.Event()  # set on the first request
        self.release = threading.Event()  # while clear and hold is True, requests wait (a slow collector)
        self.hold = False
        self.changed = threading.Condition()

    def receive(self, body: bytes) -> None:
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        with self.changed:
            self.requests += 1
            self.arrived.set()
            self.changed.notify_all()
        if self.hold:
            self.release.wait()
        out = []
        for rs in req.resource_spans:
            resource = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append({
                        "name": s.name, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(), "kind": s.kind,
                        "start": s.start_time_unix_nano, "end": s.end_time_unix_nano,
                        "attributes": attributes(s.attributes), "resource": resource,
                        "status": s.status.code,
                        "events": [{"name": e.name, "attributes": attributes(e.attributes)} for e in s.events],
                        "links": [{"trace_id": ln.trace_id.hex(), "span_id": ln.span_id.hex()} for ln in s.links],
                    })
        with self.changed:
            self.spans.extend(out)
            self.changed.notify_all()

    def wait_for(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until ``count`` spans arrived (an event with a generous deadline, not a timing claim)."""
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.spans) >= count, timeout):
                raise AssertionError(f"{len(self.spans)} spans arrived, expected {count}")
            return list(self.spans)


@contextmanager
def run_collector(port: int = 0) -> Iterator[tuple[Collector, str]]:
    """Yields the collector and its base URL (for OTEL_EXPORTER_OTLP_ENDPOINT)."""
    collector = Collector()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            collector.receive(body)
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield collector, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        collector.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
