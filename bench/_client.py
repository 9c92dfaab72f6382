"""A lean HTTP/1.1 load client (asyncio streams + httptools) that timestamps every SSE event on arrival.

httpx costs about as much per request as the proxy under test; a benchmark client must stay well below what it
measures, and it must see when each event arrives (not when a line iterator hands it over). One
:class:`Connection` is one keep-alive socket, used by one task at a time.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httptools
import orjson


@dataclass
class Response:
    status: int = 0
    started: float = 0.0
    finished: float = 0.0
    body: bytearray = field(default_factory=bytearray)
    event_times: list[float] = field(default_factory=list)  # arrival of each "\n\n"-terminated event
    keep_alive: bool = True

    @property
    def latency(self) -> float:
        return self.finished - self.started

    def events(self) -> list[Any]:
        """Parsed ``data:`` payloads ("[DONE]" as a string), in order, one per entry of ``event_times``."""
        out: list[Any] = []
        for block in bytes(self.body).split(b"\n\n")[: len(self.event_times)]:
            data = b"".join(ln[6:] for ln in block.split(b"\n") if ln.startswith(b"data: "))
            out.append(None if not data else "[DONE]" if data == b"[DONE]" else orjson.loads(data))
        return out


class _Sink:
    def __init__(self, resp: Response) -> None:
        self.resp, self.now, self.done, self.prev = resp, 0.0, False, b""

    def on_body(self, data: bytes) -> None:
        r = self.resp
        r.body += data
        # count event terminators, including one split across two reads
        n = data.count(b"\n\n") + (1 if self.prev == b"\n" and data[:1] == b"\n" else 0)
        r.event_times.extend([self.now] * n)
        self.prev = data[-1:]

    def on_message_complete(self) -> None:
        self.done = True


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                      timeout: float = 60.0) -> Response:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        assert self.reader is not None
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = (f"{method} {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n{extra}\r\n").encode()
        resp = Response()
        sink = _Sink(resp)
        parser = httptools.HttpResponseParser(sink)
        resp.started = time.perf_counter()
        self.writer.write(head + body)
        try:
            async with asyncio.timeout(timeout):
                while not sink.done:
                    data = await self.reader.read(1 << 18)
                    if not data:
                        raise ConnectionError("server closed the connection mid-response")
                    sink.now = time.perf_counter()
                    parser.feed_data(data)
        except BaseException:
            await self.close()
            raise
        resp.finished = time.perf_counter()
        resp.status = parser.get_status_code()
        resp.keep_alive = parser.should_keep_alive()
        if not resp.keep_alive:
            await self.close()
        return resp
