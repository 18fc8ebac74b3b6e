"""A push parser for ``multipart/related`` bodies (RFC 2046 5.1, RFC 2387), streaming.

Feed it the body in chunks of any size; it returns events: :class:`PartStart` (the part's
headers), ``bytes`` (part data, in order) and :class:`PartEnd`. Memory is bounded by the
chunk size plus the boundary length: part data is handed on as it arrives, never
collected. :meth:`MultipartParser.close` checks the close delimiter was seen, so a
truncated body is an error, not a short last part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from email.message import Message

__all__ = [
    "MultipartError",
    "MultipartParser",
    "PartEnd",
    "PartStart",
    "parse_content_type",
]

_MAX_HEADER_BYTES = 16 * 1024
_MAX_PREAMBLE_BYTES = 64 * 1024


class MultipartError(ValueError):
    """The body is not a well-formed multipart body."""


@dataclass(frozen=True)
class PartStart:
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


@dataclass(frozen=True)
class PartEnd:
    pass


Event = PartStart | PartEnd | bytes

_PREAMBLE, _AFTER_BOUNDARY, _HEADERS, _BODY, _EPILOGUE = range(5)
# RFC 2046 5.1.1 allows 70 characters; real senders use more: Orthanc's STOW-RS client
# sends two UUIDs (73), and its uploads were refused with 400. Be liberal, within reason.
_BOUNDARY_MAX = 256


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """``'multipart/related; type="application/dicom"; boundary=x'`` ->
    ``('multipart/related', {'type': 'application/dicom', 'boundary': 'x'})``."""
    msg = Message()
    msg["content-type"] = value
    params = msg.get_params() or []
    if not params:
        return "", {}
    main = params[0][0].strip().lower()
    return main, {k.strip().lower(): str(v).strip() for k, v in params[1:]}


class MultipartParser:
    """Parses one multipart body delimited by ``boundary``."""

    def __init__(self, boundary: str) -> None:
        if not boundary or len(boundary) > _BOUNDARY_MAX:
            raise MultipartError(f"the boundary must be 1-{_BOUNDARY_MAX} characters")
        self._dash = b"--" + boundary.encode("latin-1")
        self._delimiter = b"\r\n" + self._dash
        self._buf = bytearray()
        self._state = _PREAMBLE
        self._seen_preamble = 0
        self.parts = 0

    @property
    def done(self) -> bool:
        return self._state == _EPILOGUE

    def feed(self, data: bytes) -> list[Event]:
        if self._state == _EPILOGUE:
            return []  # the epilogue is ignored (RFC 2046)
        self._buf += data
        events: list[Event] = []
        while True:
            if self._state == _PREAMBLE:
                if not self._preamble():
                    return events
            elif self._state == _AFTER_BOUNDARY:
                if not self._after_boundary():
                    return events
                if self._state == _EPILOGUE:
                    self._buf.clear()
                    return events
            elif self._state == _HEADERS:
                start = self._headers()
                if start is None:
                    return events
                events.append(start)
            elif not self._body(events):  # _BODY
                return events

    def close(self) -> None:
        """The body ended; raises :class:`MultipartError` unless it was complete."""
        if self._state != _EPILOGUE:
            if self.parts == 0 and self._state == _PREAMBLE:
                raise MultipartError("no part with the declared boundary")
            raise MultipartError("the body ends before the closing boundary (truncated)")

    # -- states -----------------------------------------------------------------------

    def _preamble(self) -> bool:
        buf = self._buf
        if buf.startswith(self._dash):
            del buf[: len(self._dash)]
            self._state = _AFTER_BOUNDARY
            return True
        at = buf.find(self._delimiter)
        if at < 0:
            keep = len(self._delimiter) - 1
            if len(buf) > keep:
                self._seen_preamble += len(buf) - keep
                del buf[: len(buf) - keep]
            if self._seen_preamble > _MAX_PREAMBLE_BYTES:
                raise MultipartError("no part with the declared boundary")
            return False
        del buf[: at + len(self._delimiter)]
        self._state = _AFTER_BOUNDARY
        return True

    def _after_boundary(self) -> bool:
        """After a delimiter: ``--`` closes; else optional white space, then CRLF."""
        buf = self._buf
        if len(buf) < 2:
            return False
        if buf[:2] == b"--":
            if self.parts == 0:
                raise MultipartError("the body has no parts")
            self._state = _EPILOGUE
            return True
        end = buf.find(b"\r\n")
        if end < 0:
            if len(buf) > 256:
                raise MultipartError("malformed boundary line")
            return False
        if buf[:end].strip(b" \t"):
            raise MultipartError("malformed boundary line")
        del buf[: end + 2]
        self._state = _HEADERS
        return True

    def _headers(self) -> PartStart | None:
        buf = self._buf
        if buf.startswith(b"\r\n"):  # a part without headers
            del buf[:2]
            end_block = b""
        else:
            at = buf.find(b"\r\n\r\n")
            if at < 0:
                if len(buf) > _MAX_HEADER_BYTES:
                    raise MultipartError("part headers too long")
                return None
            end_block = bytes(buf[:at])
            del buf[: at + 4]
        headers: dict[str, str] = {}
        for line in end_block.decode("latin-1").split("\r\n") if end_block else []:
            if line[:1] in (" ", "\t") and headers:  # obsolete folding
                last = next(reversed(headers))
                headers[last] += " " + line.strip()
                continue
            name, sep, value = line.partition(":")
            if not sep or not name.strip():
                raise MultipartError(f"malformed part header {line[:40]!r}")
            headers[name.strip().lower()] = value.strip()
        self.parts += 1
        self._state = _BODY
        return PartStart(headers)

    def _body(self, events: list[Event]) -> bool:
        buf = self._buf
        at = buf.find(self._delimiter)
        if at < 0:
            keep = len(self._delimiter) - 1
            if len(buf) > keep:
                events.append(bytes(buf[: len(buf) - keep]))
                del buf[: len(buf) - keep]
            return False
        if at:
            events.append(bytes(buf[:at]))
        del buf[: at + len(self._delimiter)]
        events.append(PartEnd())
        self._state = _AFTER_BOUNDARY
        return True
