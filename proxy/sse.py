"""An incremental Server-Sent Events decoder that keeps each event's exact bytes.

Lines end only at ``\\r\\n``, ``\\r`` or ``\\n`` (the WHATWG rule). ``str.splitlines`` and httpx's
``aiter_lines`` also split on U+2028, U+0085 and friends, which real tokens contain; this decoder works on bytes,
where those characters are multi-byte sequences that never contain CR or LF, so they pass through intact.

``decode(chunk)`` returns the events completed by ``chunk``; ``flush()`` at end of stream returns an event that
was terminated by end-of-file only (no blank line), and ``pending`` tells whether bytes of an unfinished line or
event are left (a stream cut mid-event).
"""

from __future__ import annotations

__all__ = ["SSEDecoder", "SSEEvent"]

_CR = 13
_LF = 10


class SSEEvent:
    """One event: ``raw`` is the exact bytes received (terminator included), ``data`` the joined data lines."""

    __slots__ = ("raw", "data", "event", "comments")

    def __init__(self, raw: bytes, data: bytes | None, event: bytes | None, comments: int) -> None:
        self.raw = raw
        self.data = data
        self.event = event
        self.comments = comments

    def __repr__(self) -> str:
        return f"SSEEvent(data={self.data!r}, event={self.event!r}, comments={self.comments})"


class SSEDecoder:
    def __init__(self) -> None:
        self._buf = bytearray()
        self._raw = bytearray()
        self._data: list[bytes] = []
        self._event: bytes | None = None
        self._comments = 0
        self._fields = 0

    @property
    def pending(self) -> bool:
        """True when an unterminated line or an event without its blank line is still held."""
        return bool(self._buf) or bool(self._raw)

    def decode(self, chunk: bytes) -> list[SSEEvent]:
        if not self._buf and not self._raw and chunk.endswith(b"\n\n") and b"\r" not in chunk:
            # The usual upstream write: whole "data: ...\n\n" events and nothing else. Same events as the line
            # loop below, without it (one event per upstream write is the common case of a vLLM stream).
            parts = chunk[:-2].split(b"\n\n")
            if all(p[:6] == b"data: " and b"\n" not in p for p in parts):
                return [SSEEvent(p + b"\n\n", p[6:], None, 0) for p in parts]
        buf = self._buf
        buf += chunk
        events: list[SSEEvent] = []
        pos = 0
        n = len(buf)
        while pos < n:
            j = buf.find(b"\n", pos)
            i = buf.find(b"\r", pos, j if j >= 0 else n)
            if i < 0:
                i = j
            if i < 0:
                break
            if buf[i] == _CR:
                if i + 1 >= n:
                    break  # a lone CR at the end: wait to see whether LF follows
                end = i + 2 if buf[i + 1] == _LF else i + 1
            else:
                end = i + 1
            self._line(bytes(buf[pos:i]), buf, pos, end, events)
            pos = end
        if pos:
            del buf[:pos]
        return events

    def flush(self) -> list[SSEEvent]:
        """End of stream: finish a last line without terminator; return an event that lacked its blank line."""
        events: list[SSEEvent] = []
        if self._buf:
            buf = self._buf
            line = bytes(buf[:-1]) if buf.endswith(b"\r") else bytes(buf)
            self._line(line, buf, 0, len(buf), events)
            buf.clear()
        if self._fields or self._comments:
            events.append(self._dispatch())
        return events

    def _line(self, line: bytes, buf: bytearray, start: int, end: int, events: list[SSEEvent]) -> None:
        self._raw += buf[start:end]
        if not line:
            if self._fields or self._comments:
                events.append(self._dispatch())
            else:
                self._raw.clear()  # a stray blank line carries nothing
            return
        if line[0] == 0x3A:  # ":" comment, e.g. ": keep-alive"
            self._comments += 1
            return
        colon = line.find(b":")
        if colon < 0:
            name, value = line, b""
        else:
            name = line[:colon]
            value = line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        self._fields += 1
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value

    def _dispatch(self) -> SSEEvent:
        data = b"\n".join(self._data) if self._data else None
        ev = SSEEvent(bytes(self._raw), data, self._event, self._comments)
        self._raw.clear()
        self._data = []
        self._event = None
        self._comments = 0
        self._fields = 0
        return ev
