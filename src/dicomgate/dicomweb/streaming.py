"""Streaming ``multipart/related`` response bodies for WADO-RS (PS3.18 8.6.1.2, RFC 2387).

The same framing as our STOW-RS client writes (:mod:`dicomgate.egress.dicomweb`):
``--boundary CRLF Content-Type CRLF CRLF body`` per part, a CRLF before each next
delimiter, ``--boundary--`` at the end. File bodies are read in ``CHUNK_SIZE`` pieces on a
worker thread, so memory stays flat whatever the object size (DESIGN rule 2).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TypeVar

__all__ = ["CHUNK_SIZE", "Multipart", "file_chunks", "iterate_in_thread"]

CHUNK_SIZE = 1 << 20
_T = TypeVar("_T")
_DONE = object()


class Multipart:
    """Framing of one multipart/related body whose parts are of ``media_type``."""

    def __init__(self, media_type: str) -> None:
        self.media_type = media_type
        self.boundary = f"dicomgate-{uuid.uuid4().hex}"
        self._parts = 0

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="{self.media_type}"; boundary={self.boundary}'

    def part(self, content_type: str) -> bytes:
        """The delimiter and headers that open the next part."""
        lead = "\r\n" if self._parts else ""
        self._parts += 1
        return f"{lead}--{self.boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode("ascii")

    def close(self) -> bytes:
        """The close delimiter."""
        lead = "\r\n" if self._parts else ""
        return f"{lead}--{self.boundary}--\r\n".encode("ascii")


def _read_whole_or_open(path: Path, chunk: int) -> tuple[bytes, object | None]:
    """Read ``path`` at once when it fits one chunk; else return its open file."""
    fh = open(path, "rb")  # noqa: SIM115 - closed here or by file_chunks
    try:
        data = fh.read(chunk)
        if len(data) < chunk:
            fh.close()
            return data, None
        return data, fh
    except BaseException:
        fh.close()
        raise


async def file_chunks(path: Path, chunk: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
    """The bytes of ``path``: one thread hop for a file up to ``chunk``, then per chunk."""
    data, fh = await asyncio.to_thread(_read_whole_or_open, path, chunk)
    if data:
        yield data
    if fh is None:
        return
    try:
        while True:
            data = await asyncio.to_thread(fh.read, chunk)  # type: ignore[attr-defined]
            if not data:
                return
            yield data
    finally:
        fh.close()  # type: ignore[attr-defined]


async def iterate_in_thread(make: Callable[[], Iterator[_T]]) -> AsyncIterator[_T]:
    """Run a blocking iterator on worker threads, one item per hop."""
    iterator = await asyncio.to_thread(make)
    while True:
        item = await asyncio.to_thread(next, iterator, _DONE)
        if item is _DONE:
            return
        yield item  # type: ignore[misc]
