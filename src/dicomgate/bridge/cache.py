"""The retrieve cache: instances fetched from an upstream PACS for WADO-RS, kept a while.

A viewer asks for a study's metadata, then its frames, then maybe rendered images: each
request would otherwise retrieve the same instances again. Every retrieve (study, series or
instance) becomes one :class:`CacheEntry`: a folder of Part 10 files under
``<storage.path>/cache/<node>/<study>/<n>/`` that fills while the C-GET runs. Readers
iterate over an entry while it grows (the first instance goes to the HTTP client before
the last one arrived), and a later request for the same resource, or for a part of a
completed study or series, is answered from it.

An entry is reused for ``cache_seconds`` after it completed (0: never reused). Entries are
evicted oldest-used first when the files exceed ``cache_bytes``; an entry is deleted only
when no request reads it and none used it for ``LINGER`` seconds (responses read their
files after the handler returned). A failed retrieve is never reused. The cache is not
durable: the folder is emptied at start-up.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dicomgate.bridge.dimse_upstream import UpstreamFailed, UpstreamNotFound
from dicomgate.dicomweb.catalog import StoredRef
from dicomgate.errors import DicomgateError

__all__ = ["LINGER", "CacheEntry", "Lease", "RetrieveCache"]

log = logging.getLogger(__name__)

LINGER = 30.0  # seconds an unused entry is kept after its last reader, whatever its age
Key = tuple[str, str | None, str | None]  # (study, series, SOP instance)


@dataclass(eq=False)
class CacheEntry:
    """One retrieve's instances, growing while they arrive."""

    key: Key
    folder: Path  # absolute
    relfolder: str  # under the store root (StoredRef.relpath prefix)
    refs: list[StoredRef] = field(default_factory=list)
    done: bool = False
    error: DicomgateError | None = None
    size: int = 0  # bytes on disk
    completed_at: float = 0.0
    last_used: float = field(default_factory=time.monotonic)
    readers: int = 0


class Lease:
    """A reader of one entry (optionally only the instances of a part of it)."""

    def __init__(
        self, cache: RetrieveCache, entry: CacheEntry, wanted: Callable[[StoredRef], bool]
    ) -> None:
        self._cache = cache
        self.entry = entry
        self._wanted = wanted
        self._closed = False

    def __iter__(self) -> Iterator[StoredRef]:
        return self.iterate()

    def iterate(self) -> Iterator[StoredRef]:
        """The instances as they arrive (blocking); raises the retrieve's error at its end."""
        position = 0
        cond = self._cache.cond
        while True:
            with cond:
                while position >= len(self.entry.refs) and not self.entry.done:
                    if not cond.wait(self._cache.wait_seconds):
                        raise UpstreamFailed(
                            f"no instance from the upstream within {self._cache.wait_seconds:g} s",
                            timed_out=True,
                        )
                self.entry.last_used = time.monotonic()
                if position < len(self.entry.refs):
                    ref = self.entry.refs[position]
                    position += 1
                elif self.entry.error is not None:
                    raise self.entry.error
                else:
                    return
            if self._wanted(ref):
                yield ref

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._cache.cond:
            self.entry.readers -= 1
            self.entry.last_used = time.monotonic()
        self._cache.purge()


Fetch = Callable[[CacheEntry, Callable[[StoredRef], None]], None]


class RetrieveCache:
    """Entries by resource; thread-safe; fetches run on their own threads."""

    def __init__(
        self,
        root: Path,
        relroot: str,
        seconds: float,
        max_bytes: int,
        wait_seconds: float,
        linger: float = LINGER,
    ) -> None:
        self.root = root  # absolute folder of this node's cache
        self.relroot = relroot  # the same, relative to the store root
        self.seconds = seconds
        self.max_bytes = max_bytes
        self.wait_seconds = wait_seconds  # the longest a reader waits for the next instance
        self.linger = linger
        self.cond = threading.Condition()
        self.fetches = 0  # retrieves sent upstream (a cache miss each)
        self._entries: OrderedDict[Key, CacheEntry] = OrderedDict()
        self._retired: list[CacheEntry] = []
        self._counter = itertools.count(1)
        shutil.rmtree(root, ignore_errors=True)  # not durable: left-overs of a previous run
        root.mkdir(parents=True, exist_ok=True)

    @property
    def size(self) -> int:
        with self.cond:
            return sum(e.size for e in self._entries.values()) + sum(e.size for e in self._retired)

    def _fresh(self, entry: CacheEntry, now: float) -> bool:
        if entry.error is not None:
            return False
        return not entry.done or now - entry.completed_at <= self.seconds

    def open(self, key: Key, fetch: Fetch) -> Lease:
        """A lease on the entry for ``key``: an existing fresh one (or a completed broader
        one holding the resource), else a new one whose ``fetch`` starts now."""
        study, series, sop = key

        def wanted(ref: StoredRef) -> bool:
            return (series is None or ref.series_uid == series) and (
                sop is None or ref.sop_instance_uid == sop
            )

        self.purge()
        with self.cond:
            now = time.monotonic()
            for candidate in ((study, None, None), (study, series, None), key):
                entry = self._entries.get(candidate)
                if entry is None or not self._fresh(entry, now):
                    continue
                if candidate != key and not (entry.done and any(map(wanted, entry.refs))):
                    continue
                entry.readers += 1
                entry.last_used = now
                self._entries.move_to_end(candidate)
                return Lease(self, entry, wanted)
            stale = self._entries.pop(key, None)
            if stale is not None:
                self._retired.append(stale)
            n = next(self._counter)
            relfolder = f"{self.relroot}/{study}/{n}"
            entry = CacheEntry(key, self.root / study / str(n), relfolder, readers=1)
            self._entries[key] = entry
            self.fetches += 1
        entry.folder.mkdir(parents=True, exist_ok=True)
        thread = threading.Thread(
            target=self._run, args=(entry, fetch), name="bridge-fetch", daemon=True
        )
        thread.start()
        return Lease(self, entry, wanted)

    def _run(self, entry: CacheEntry, fetch: Fetch) -> None:
        def add(ref: StoredRef) -> None:
            with self.cond:
                entry.refs.append(ref)
                entry.size += ref.size
                self.cond.notify_all()

        error: DicomgateError | None = None
        try:
            fetch(entry, add)
        except (UpstreamFailed, UpstreamNotFound) as exc:
            error = exc
        except Exception as exc:  # a bug or our disk: the readers get a 502 naming it
            log.exception("retrieve from the upstream failed", extra={"event": "bridge.fetch_bug"})
            error = UpstreamFailed(f"retrieve failed: {exc}")
        with self.cond:
            entry.error = error
            entry.done = True
            entry.completed_at = time.monotonic()
            if error is not None and self._entries.get(entry.key) is entry:
                del self._entries[entry.key]
                self._retired.append(entry)
            self.cond.notify_all()
        self.purge()

    def purge(self) -> None:
        """Retire expired entries and, over ``max_bytes``, the least recently used; delete
        the folders of retired entries nobody reads."""
        doomed: list[CacheEntry] = []
        with self.cond:
            now = time.monotonic()
            for key, entry in list(self._entries.items()):
                if entry.done and now - entry.completed_at > self.seconds:
                    del self._entries[key]
                    self._retired.append(entry)
            total = sum(e.size for e in self._entries.values()) + sum(e.size for e in self._retired)
            for key, entry in list(self._entries.items()):  # least recently used first
                if total <= self.max_bytes:
                    break
                if entry.done:
                    del self._entries[key]
                    self._retired.append(entry)
                    total -= entry.size  # gone once its last reader is done
            for entry in list(self._retired):
                if entry.done and entry.readers <= 0 and now - entry.last_used >= self.linger:
                    self._retired.remove(entry)
                    doomed.append(entry)
        for entry in doomed:
            with contextlib.suppress(OSError):
                shutil.rmtree(entry.folder)
