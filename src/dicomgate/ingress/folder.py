"""Folder ingest: DICOM files dropped into a watched folder are ingested like C-STOREs.

A polling scanner (no inotify: it works the same on local disks, NFS and SMB shares) walks
the watch folder every ``poll_interval`` seconds. A file is taken once its size and
modification time have stayed the same for ``settle`` seconds. Each file is streamed into
a spool file behind our own Part 10 header, exactly as the DIMSE acceptor does, and handed
to the :class:`~dicomgate.ingest.Ingestor`; only when the ingestor answers "durable,
indexed, routed" is the source deleted or moved (DESIGN rule 1). Refused files go to
``rejected/`` with a reason file; a full store or an unavailable index leaves the file
where it is for the next scan.

Zip files are read member by member, straight from the archive (nothing is extracted to
disk). A DICOMDIR is not an instance: the files it references are ingested by the walk
like any other, and the DICOMDIR itself is deleted or moved once none of them is left.

Delivery of the source is at least once: after a crash between the commit and the delete
the file is read again, but an identical file that is already stored (same SOP Instance
UID, same bytes as stored) is not stored a second time, only removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import shutil
import stat
import time
import zipfile
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicomgate.errors import (
    DicomgateError,
    DuplicateRejected,
    InvalidInstance,
    StoreError,
    StoreFullError,
)
from dicomgate.ingest import IngestJob, Ingestor, InstanceMismatch
from dicomgate.ingress.models import IngestConfig
from dicomgate.ingress.sniff import HEAD_BYTES, NotDicom, Sniffed, is_zip, sniff
from dicomgate.observability.logging import uid_hash
from dicomgate.store.filestore import SpoolFile
from dicomgate.store.part10 import arrival_json, encode_file_meta
from dicomgate.store.scan import stored_transfer_syntax

__all__ = ["FolderWatcher", "candidate_names"]

log = logging.getLogger("dicomgate.ingress.folder")

_COPY_CHUNK = 1 << 20
_MAX_DICOMDIR_BYTES = 64 << 20  # a DICOMDIR is read whole to list its references
_IGNORED_SUFFIXES = (".part", ".tmp")
_NO_HARD_LINKS = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK}

Status = Literal["ingested", "already", "zip", "dicomdir", "not_dicom", "refused", "retry"]


@dataclass(frozen=True)
class Signature:
    """What must stay the same for a file to count as settled (and to be deleted)."""

    size: int
    mtime_ns: int
    inode: int


@dataclass(frozen=True)
class Result:
    """What became of one file or zip member."""

    status: Status
    reason: str = ""  # for not_dicom, refused, retry
    sop: str = ""  # SOP Instance UID, when known
    size: int = 0  # bytes read from the source
    full: bool = False  # retry because the store is full: stop this scan


@dataclass
class _Prepared:
    """A source copied into a spool file, ready for the ingestor."""

    spool: SpoolFile
    header_length: int
    sniffed: Sniffed
    size: int
    already: bool  # the same bytes are stored under this SOP Instance UID already
    transfer_syntax: str  # of the stored file's meta (stored_transfer_syntax)

    @property
    def declared_transfer_syntax(self) -> str:
        """The file's own syntax when the stored file says another; "" otherwise."""
        own = self.sniffed.transfer_syntax
        return own if own != self.transfer_syntax else ""


class _Stopping(Exception):
    """The watcher is stopping: a copy in progress is abandoned (the source stays)."""


def candidate_names(target: Path) -> Iterator[Path]:
    """``target``, then ``name-1.ext``, ``name-2.ext`` ...: names to try, never to overwrite."""
    yield target
    suffix = target.suffix
    if not (1 < len(suffix) <= 6 and any(c.isalpha() for c in suffix)):
        suffix = ""  # "IM0001", "1.2.840.1": no extension to keep
    stem = target.name[: len(target.name) - len(suffix)]
    for n in range(1, 100_000):
        yield target.with_name(f"{stem}-{n}{suffix}")
    raise OSError(errno.EEXIST, "no free name", str(target))


def _move_keeping(src: Path, target: Path) -> Path:
    """Move ``src`` to ``target`` or a free variant of it; never replaces a file.

    A hard link claims the name atomically (it fails if the name exists); across file
    systems, or where links are not supported, the file is copied (then flushed) instead.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for candidate in candidate_names(target):
        try:
            os.link(src, candidate, follow_symlinks=False)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            return _copy_keeping(src, target)
        os.unlink(src)
        return candidate
    raise AssertionError("unreachable")  # pragma: no cover


def _copy_keeping(src: Path, target: Path) -> Path:
    for candidate in candidate_names(target):
        try:
            with open(src, "rb") as fin, open(candidate, "xb") as fout:
                shutil.copyfileobj(fin, fout, _COPY_CHUNK)
                fout.flush()
                os.fsync(fout.fileno())
        except FileExistsError:
            continue
        os.unlink(src)
        return candidate
    raise AssertionError("unreachable")  # pragma: no cover


def _read_head(fh: IO[bytes]) -> bytes:
    parts: list[bytes] = []
    size = 0
    while size < HEAD_BYTES:
        chunk = fh.read(HEAD_BYTES - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _hidden(parts: tuple[str, ...] | list[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


class FolderWatcher:
    """Scans ``config.watch`` and feeds what it finds into an :class:`Ingestor`."""

    def __init__(
        self, config: IngestConfig, ingestor: Ingestor, called_ae: str, storage_path: Path
    ) -> None:
        if config.watch is None:
            raise ValueError("no watch folder configured")
        self.config = config
        self.ingestor = ingestor
        self.called_ae = called_ae
        self.watch = Path(os.path.abspath(config.watch))
        rejected = config.rejected_folder
        assert rejected is not None
        self.rejected = Path(os.path.abspath(rejected))
        self.move_to = Path(os.path.abspath(config.move_to)) if config.move_to else None
        self._storage = Path(os.path.abspath(storage_path))
        self._arrival = arrival_json(config.calling_ae, called_ae, "", "folder")
        self._seen: dict[Path, tuple[Signature, float]] = {}
        self._emptied: set[Path] = set()
        self._retry_logged: dict[Path, str] = {}
        self._stored: dict[Path, Signature] = {}  # stored, but the clean-up failed
        self._stop = asyncio.Event()
        self._stop_requested = False  # read by copying threads
        self._task: asyncio.Task[None] | None = None
        self.ingested_count = 0
        self.rejected_count = 0

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Check the folders and start scanning. Raises :class:`DicomgateError` naming the key."""
        await asyncio.to_thread(self._open_folders)
        self._task = asyncio.create_task(self._run(), name="dicomgate-folder-watch")
        log.info(
            "watching %s",
            self.watch,
            extra={
                "event": "folder.watching",
                "settle": self.config.settle,
                "after": "move" if self.move_to else "delete",
            },
        )

    async def stop(self) -> None:
        """Stop scanning; files already handed to the ingestor are finished first."""
        self._stop_requested = True
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        log.info(
            "folder watch stopped",
            extra={
                "event": "folder.stopped",
                "ingested": self.ingested_count,
                "rejected": self.rejected_count,
            },
        )

    def _open_folders(self) -> None:
        storage, watch = self._storage, self.watch
        if storage == watch or storage.is_relative_to(watch) or watch.is_relative_to(storage):
            raise DicomgateError(
                f"ingest.watch: {watch} overlaps storage.path {storage}; keep them apart"
            )
        if self.move_to is not None and self.move_to == self.rejected:
            raise DicomgateError("ingest.after: the move target must not be the rejected folder")
        for key, folder in (
            ("ingest.watch", watch),
            ("ingest.rejected", self.rejected),
            ("ingest.after", self.move_to),
        ):
            if folder is None:
                continue
            try:
                folder.mkdir(parents=True, exist_ok=True)
                os.listdir(folder)
                probe = folder / f".dicomgate-probe-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as exc:
                raise DicomgateError(
                    f"{key}: cannot use folder {folder}: {exc.strerror or exc}"
                ) from exc

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.poll()
            except Exception:  # a bug must not end folder ingest for good; the next scan retries
                log.exception("folder scan failed", extra={"event": "folder.error"})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.config.poll_interval)

    # -- one scan -----------------------------------------------------------------------

    async def poll(self) -> None:
        """One scan: take every settled file, then zips, then DICOMDIRs whose media is done."""
        found = await asyncio.to_thread(self._scan)
        ready = self._settled(found)
        zips: list[tuple[Path, Signature]] = []
        dicomdirs: list[tuple[Path, Signature]] = []
        pending = deque(ready)

        async def take_files() -> None:
            while pending and not self._stop_requested:
                path, sig = pending.popleft()
                status = await self._guarded(path, self._take_file(path, sig))
                if status == "zip":
                    zips.append((path, sig))
                elif status == "dicomdir":
                    dicomdirs.append((path, sig))
                elif status == "full":
                    pending.clear()  # no room: the rest waits for the next scan

        await asyncio.gather(*(take_files() for _ in range(self.config.concurrency)))
        for path, sig in sorted(zips):
            if self._stop_requested:
                return
            await self._guarded(path, self._take_zip(path, sig))
        for path, sig in sorted(dicomdirs):
            if self._stop_requested:
                return
            await self._guarded(path, self._take_dicomdir(path, sig))
        if self.config.remove_empty_folders and self._emptied:
            await asyncio.to_thread(self._prune)

    async def _guarded(self, path: Path, work: Awaitable[str]) -> str:
        try:
            return await work
        except Exception:
            log.exception(
                "folder ingest failed; the file stays for the next scan",
                extra={"event": "folder.error", "file": self._file_id(path)},
            )
            return "error"

    def _scan(self) -> dict[Path, Signature]:
        """Every candidate file under the watch folder with its signature (sorted walk)."""
        excluded = {self.rejected, self.move_to}
        found: dict[Path, Signature] = {}
        for dirpath, dirnames, filenames in os.walk(self.watch):
            here = Path(dirpath)
            dirnames[:] = sorted(
                d for d in dirnames if not d.startswith(".") and here / d not in excluded
            )
            for name in sorted(filenames):
                if name.startswith(".") or name.lower().endswith(_IGNORED_SUFFIXES):
                    continue
                path = here / name
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):  # not symlinks, pipes or sockets
                    found[path] = Signature(st.st_size, st.st_mtime_ns, st.st_ino)
        return found

    def _settled(self, found: dict[Path, Signature]) -> list[tuple[Path, Signature]]:
        """Files unchanged for ``settle`` seconds since first seen in this shape."""
        now = time.monotonic()
        seen: dict[Path, tuple[Signature, float]] = {}
        ready: list[tuple[Path, Signature]] = []
        for path, sig in found.items():
            previous = self._seen.get(path)
            first = previous[1] if previous is not None and previous[0] == sig else now
            seen[path] = (sig, first)
            if now - first >= self.config.settle:
                ready.append((path, sig))
        self._seen = seen
        self._retry_logged = {p: r for p, r in self._retry_logged.items() if p in seen}
        self._stored = {p: s for p, s in self._stored.items() if p in seen}
        return ready

    # -- one file -----------------------------------------------------------------------

    async def _take_file(self, path: Path, sig: Signature) -> str:
        if self._stored.get(path) == sig:  # do not read it again: only the clean-up is left
            result = Result("already")
        else:
            result = await self._ingest_source(lambda: open(path, "rb"), sig.size)  # noqa: SIM115
        if result.status in ("zip", "dicomdir"):
            return result.status
        if result.status == "retry":
            self._note_retry(path, result.reason)
            return "full" if result.full else "retry"
        if result.status in ("ingested", "already"):
            if await asyncio.to_thread(self._finish_source, path, sig):
                self._log_ingested(path, result)
            return result.status
        await asyncio.to_thread(self._reject, path, sig, result.reason)
        return result.status

    async def _ingest_source(self, open_source: Callable[[], IO[bytes]], size: int) -> Result:
        """Stream one file or zip member of ``size`` bytes into the store; what became of it."""
        prepared = await asyncio.to_thread(self._prepare, open_source, size)
        if isinstance(prepared, Result):
            return prepared
        sniffed = prepared.sniffed
        if prepared.already:
            prepared.spool.discard()
            return Result("already", sop=sniffed.sop_instance_uid, size=prepared.size)
        loop = asyncio.get_running_loop()
        job = IngestJob(
            spool=prepared.spool,
            data_offset=prepared.header_length,
            transfer_syntax=prepared.transfer_syntax,
            declared_transfer_syntax=prepared.declared_transfer_syntax,
            sop_class_uid=sniffed.sop_class_uid,
            sop_instance_uid=sniffed.sop_instance_uid,
            calling_ae=self.config.calling_ae,
            called_ae=self.called_ae,
            source_ip="",
            received_via="folder",
            loop=loop,
            future=loop.create_future(),
        )
        error = await self.ingestor.ingest(job)
        return self._result_of(error, sniffed.sop_instance_uid, prepared.size)

    @staticmethod
    def _result_of(error: DicomgateError | None, sop: str, size: int) -> Result:
        if error is None:
            return Result("ingested", sop=sop, size=size)
        if isinstance(error, InstanceMismatch):
            reason = "the data set's SOP Class or Instance UID differs from its file meta"
            return Result("refused", reason, sop, size)
        if isinstance(error, DuplicateRejected):
            reason = "duplicate: this SOP Instance UID is stored already (storage.duplicates)"
            return Result("refused", reason, sop, size)
        if isinstance(error, InvalidInstance):
            return Result("refused", _one_line(str(error)), sop, size)
        # Store full, index unavailable, an internal error: never the file's fault.
        return Result("retry", _one_line(str(error)), sop, size, isinstance(error, StoreFullError))

    def _prepare(self, open_source: Callable[[], IO[bytes]], size: int) -> _Prepared | Result:
        """Sniff a source and copy it into a spool file (runs on a worker thread)."""
        try:
            self._check_room(size)
            with open_source() as fh:
                head = _read_head(fh)
                if is_zip(head):
                    return Result("zip")
                try:
                    sniffed = sniff(head, complete=len(head) < HEAD_BYTES)
                except NotDicom as exc:
                    return Result("not_dicom", exc.reason)
                except InvalidInstance as exc:
                    return Result("refused", exc.reason)
                if sniffed.is_dicomdir:
                    return Result("dicomdir", sop=sniffed.sop_instance_uid)
                return self._spool(fh, head, sniffed)
        except StoreFullError as exc:
            return Result("retry", str(exc), full=True)
        except StoreError as exc:
            return Result("retry", str(exc))
        except _Stopping:
            return Result("retry", "the gateway is stopping")
        except OSError as exc:  # unreadable now (permissions, a share that went away)
            return Result("retry", f"cannot read the file: {exc.strerror or exc}")
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            return Result("refused", f"corrupt zip member: {_one_line(str(exc))}")
        except (RuntimeError, NotImplementedError) as exc:  # encrypted, unknown compression
            return Result("refused", f"cannot read zip member: {_one_line(str(exc))}")

    def _check_room(self, size: int) -> None:
        """StoreFullError unless ``size`` bytes fit above ``storage.min_free_bytes``."""
        store = self.ingestor.store
        store.check_space()
        try:
            free = shutil.disk_usage(store.root).free
        except OSError as exc:
            raise StoreError(f"cannot check the store's free space: {exc.strerror}") from exc
        if size > free - store.min_free_bytes:
            raise StoreFullError(f"no room in the store for {size} bytes")

    def _spool(self, fh: IO[bytes], head: bytes, sniffed: Sniffed) -> _Prepared:
        store = self.ingestor.store
        syntax = stored_transfer_syntax(
            sniffed.transfer_syntax, head[sniffed.data_offset : sniffed.data_offset + 6]
        )
        arrival = self._arrival
        if syntax != sniffed.transfer_syntax:  # a data set in the other VR encoding
            arrival = arrival_json(
                self.config.calling_ae, self.called_ae, "", "folder", sniffed.transfer_syntax
            )
        header = encode_file_meta(
            sniffed.sop_class_uid,
            sniffed.sop_instance_uid,
            syntax,
            self.config.calling_ae,
            arrival,
        )
        spool = store.new_spool()
        size = len(head)
        try:
            spool.write(header)
            spool.write(memoryview(head)[sniffed.data_offset :])
            while chunk := fh.read(_COPY_CHUNK):
                if self._stop_requested:
                    raise _Stopping
                spool.write(chunk)
                size += len(chunk)
        except BaseException:
            spool.discard()
            raise
        already = self._already_stored(sniffed.sop_instance_uid, spool.sha256)
        return _Prepared(spool, len(header), sniffed, size, already, syntax)

    def _already_stored(self, sop_instance_uid: str, sha256: str) -> bool:
        """Is this exact file (same bytes, same arrival) in the store already?"""
        try:
            rows = self.ingestor.index.instances(sop_instance_uid)
        except DicomgateError:
            return False  # the ingestor will report the index problem
        return any(row.get("sha256") == sha256 for row in rows)

    # -- after: delete, move, reject ----------------------------------------------------

    def _unchanged(self, path: Path, sig: Signature) -> bool:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        return Signature(st.st_size, st.st_mtime_ns, st.st_ino) == sig

    def _finish_source(self, path: Path, sig: Signature) -> bool:
        """Delete or move a source whose instances are all durable; False if left in place."""
        if not self._unchanged(path, sig):
            log.warning(
                "file changed while it was read; it will be read again",
                extra={"event": "folder.changed", "file": self._file_id(path)},
            )
            return False
        relative = path.relative_to(self.watch)
        try:
            if self.move_to is None:
                os.unlink(path)
            else:
                _move_keeping(path, self.move_to / relative)
        except OSError as exc:
            # The instances are stored; the next scans try the clean-up again.
            self._stored[path] = sig
            reason = f"cleanup: {exc.strerror or exc}"
            if self._retry_logged.get(path) != reason:
                self._retry_logged[path] = reason
                log.error(
                    "cannot remove a file after ingest: %s",
                    exc.strerror or exc,
                    extra={"event": "folder.cleanup_failed", "file": self._file_id(path)},
                )
            return False
        self._stored.pop(path, None)
        self._seen.pop(path, None)
        self._emptied.add(path.parent)
        return True

    def _reject(self, path: Path, sig: Signature, reason: str, detail: str = "") -> None:
        """Move a file to the rejected folder with ``<name>.reason.txt`` beside it."""
        if not self._unchanged(path, sig):
            return  # it is being rewritten: judge the new content once it settles
        relative = path.relative_to(self.watch)
        try:
            target = _move_keeping(path, self.rejected / relative)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            text = f"{stamp} {relative.as_posix()}: {reason}\n{detail}"
            target.with_name(target.name + ".reason.txt").write_text(text, encoding="utf-8")
        except OSError as exc:
            log.error(
                "cannot move a refused file to %s: %s",
                self.rejected,
                exc.strerror or exc,
                extra={"event": "folder.cleanup_failed", "file": self._file_id(path)},
            )
            return
        self._seen.pop(path, None)
        self._emptied.add(path.parent)
        self.rejected_count += 1
        log.warning(
            "file rejected: %s",
            reason,
            extra={"event": "folder.rejected", "file": self._file_id(path)},
        )

    def _note_retry(self, path: Path, reason: str) -> None:
        if self._retry_logged.get(path) == reason:
            return  # said once; the file keeps waiting
        self._retry_logged[path] = reason
        log.warning(
            "file left for the next scan: %s",
            reason,
            extra={"event": "folder.retry", "file": self._file_id(path)},
        )

    def _log_ingested(self, path: Path, result: Result, instances: int = 1) -> None:
        self._retry_logged.pop(path, None)
        self.ingested_count += instances
        extra: dict[str, object] = {"event": "folder.ingested", "file": self._file_id(path)}
        if result.sop:
            extra["sop"] = uid_hash(result.sop)
        extra.update(
            instances=instances,
            bytes=result.size,
            already_stored=result.status == "already",
            after="moved" if self.move_to else "deleted",
        )
        log.info("file ingested", extra=extra)

    def _file_id(self, path: Path) -> str:
        """File names may carry patient names: logs show a hash of the relative path."""
        try:
            relative = path.relative_to(self.watch).as_posix()
        except ValueError:
            relative = str(path)
        return uid_hash(relative)

    def _prune(self) -> None:
        """Remove emptied sub-folders that stayed unchanged for ``settle`` seconds."""
        keep: set[Path] = set()
        for folder in sorted(self._emptied, key=lambda p: len(p.parts), reverse=True):
            if folder == self.watch or not folder.is_relative_to(self.watch):
                continue
            try:
                if any(folder.iterdir()):
                    continue
                if time.time() - folder.stat().st_mtime < self.config.settle:
                    keep.add(folder)
                    continue
                folder.rmdir()
            except OSError:
                continue
            if folder.parent != self.watch:
                keep.add(folder.parent)
        self._emptied = keep

    # -- zip files ----------------------------------------------------------------------

    async def _take_zip(self, path: Path, sig: Signature) -> str:
        try:
            archive = await asyncio.to_thread(zipfile.ZipFile, path)
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:
            await asyncio.to_thread(
                self._reject, path, sig, f"not a readable zip file: {_one_line(str(exc))}"
            )
            return "refused"
        except OSError as exc:
            self._note_retry(path, f"cannot read the file: {exc.strerror or exc}")
            return "retry"
        try:
            results = await self._ingest_members(archive)
        finally:
            await asyncio.to_thread(archive.close)
        if results is None:
            return "retry"  # stopping: the members done so far are recognised next time
        waiting = [r for _, r in results if r.status == "retry"]
        if waiting:
            self._note_retry(path, f"{len(waiting)} zip members wait: {waiting[0].reason}")
            return "full" if any(r.full for r in waiting) else "retry"
        stored = [r for _, r in results if r.status in ("ingested", "already")]
        refused = [(n, r) for n, r in results if r.status == "refused"]
        not_dicom = [(n, r) for n, r in results if r.status == "not_dicom"]
        lines = "".join(f"{n}: {r.reason}\n" for n, r in [*refused, *not_dicom])
        if refused or not stored:
            summary = (
                f"{len(stored)} of {len(results)} zip members stored; {len(refused)} refused,"
                f" {len(not_dicom)} not DICOM"
                if stored or refused
                else "no DICOM instance in the zip file"
            )
            await asyncio.to_thread(self._reject, path, sig, summary, lines)
            return "refused"
        relative = path.relative_to(self.watch)
        if not await asyncio.to_thread(self._finish_source, path, sig):
            return "retry"
        if not_dicom:
            note = f"{len(stored)} zip members stored; {len(not_dicom)} not DICOM, not stored"
            await asyncio.to_thread(self._write_note, relative, note, lines)
        self._log_ingested(
            path, Result("ingested", size=sum(r.size for r in stored)), instances=len(stored)
        )
        return "ingested"

    async def _ingest_members(self, archive: zipfile.ZipFile) -> list[tuple[str, Result]] | None:
        """Every member of ``archive`` through the ingestor (a few at a time); None: stopping."""
        members = deque(m for m in archive.infolist() if not m.is_dir())
        results: list[tuple[str, Result]] = []

        async def worker() -> None:
            while members and not self._stop_requested:
                info = members.popleft()
                name = _one_line(info.filename)
                if _hidden(info.filename.split("/")):
                    continue  # __MACOSX/ resource forks, .DS_Store
                result = await self._ingest_source(
                    functools.partial(archive.open, info), info.file_size
                )
                if result.status == "zip":
                    result = Result("not_dicom", "a zip file inside a zip file is not read")
                if result.status != "dicomdir":
                    results.append((name, result))

        await asyncio.gather(*(worker() for _ in range(self.config.concurrency)))
        if members:
            return None
        return sorted(results, key=lambda item: item[0])

    def _write_note(self, relative: Path, first_line: str, lines: str) -> None:
        """A reason file in the rejected folder for a zip whose DICOM members were stored."""
        target = self.rejected / relative
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            for candidate in candidate_names(target.with_name(target.name + ".reason.txt")):
                with contextlib.suppress(FileExistsError), open(candidate, "x") as fh:
                    fh.write(f"{stamp} {relative.as_posix()}: {first_line}\n{lines}")
                    return
        except OSError as exc:
            log.error(
                "cannot write a reason file: %s",
                exc.strerror or exc,
                extra={"event": "folder.cleanup_failed"},
            )

    # -- DICOMDIR -----------------------------------------------------------------------

    async def _take_dicomdir(self, path: Path, sig: Signature) -> str:
        state, detail = await asyncio.to_thread(self._dicomdir_state, path)
        if state == "refused":
            await asyncio.to_thread(self._reject, path, sig, detail)
            return "refused"
        if state == "pending":
            return "retry"  # its files are still here (not settled, or waiting for room)
        if await asyncio.to_thread(self._finish_source, path, sig):
            log.info(
                "DICOMDIR done: none of its files is left",
                extra={"event": "folder.dicomdir_done", "file": self._file_id(path)},
            )
        return "ingested"

    def _dicomdir_state(self, path: Path) -> tuple[str, str]:
        """("done"|"pending"|"refused", detail): are the files it references gone?"""
        try:
            if path.stat().st_size > _MAX_DICOMDIR_BYTES:
                return "refused", f"DICOMDIR larger than {_MAX_DICOMDIR_BYTES} bytes"
            ds = dcmread(path)
            records = ds.get("DirectoryRecordSequence") or []
            references = []
            for record in records:
                file_id = record.get("ReferencedFileID")
                if file_id:
                    parts = [file_id] if isinstance(file_id, str) else list(file_id)
                    references.append(path.parent.joinpath(*(str(p) for p in parts)))
        except (InvalidDicomError, ValueError, EOFError, KeyError, TypeError) as exc:
            return "refused", f"unreadable DICOMDIR: {_one_line(str(exc))}"
        except OSError as exc:
            return "pending", exc.strerror or str(exc)
        left = sum(1 for ref in references if ref.is_file())
        return ("pending", f"{left} files left") if left else ("done", "")
