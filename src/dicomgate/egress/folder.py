"""Folder destination: copy each instance to ``<path>/<template>``, atomically.

The file is copied to a temporary name in its final folder, flushed to disk and renamed
over the final name, so a reader of the folder never sees a partial file. An existing file
of the same name is replaced: delivery is at least once, and a repeat is the same file.
Files get the permissions of any file the gateway creates (``0666`` less its umask, like
``cp``), not ``tempfile``'s owner-only ``0600``: the folder is there for other programs and
users (a share, a research drop box) to read.

A template without ``{SOPInstanceUID}`` can give several instances one path; each then
replaces the file of the one before. That may be intended (one file per series), so it is
no error: the sender warns at start-up (``config.folder_template_overwrites``, as
``dicomgate check-config`` does) and logs each file of another instance it replaces
(``egress.folder_replaced``, both SOP Instance UIDs hashed, never the path: it holds
patient data).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicomgate.egress.base import Delivery, Outcome, exception_reason, os_error_reason
from dicomgate.egress.models import FolderDestination, template_keywords
from dicomgate.observability.logging import uid_hash
from dicomgate.store.filestore import fsync_dir
from dicomgate.store.part10 import relay_header

__all__ = ["FolderSender", "render_path", "safe_component"]

LOGGER = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")
_MAX_COMPONENT = 128  # bytes well under NAME_MAX (255) once encoded
_COPY_CHUNK = 1024 * 1024


def safe_component(value: str) -> str:
    """`value` made usable as (part of) one file name: no separators, control
    characters or ``..``; empty becomes ``UNKNOWN``."""
    text = _UNSAFE.sub("_", value).strip().strip("\x00")
    text = text.replace("..", "__")
    text = text[:_MAX_COMPONENT]
    if text in ("", ".", ".."):
        return "UNKNOWN"
    return text


def _element_text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue | list):
        return "-".join(str(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return str(value)


def render_path(root: Path, template: str, ds: Dataset) -> Path:
    """The file path for `ds`: `template` filled from its elements, under `root`."""
    keywords = template_keywords(template)
    values = {kw: safe_component(_element_text(ds, kw)) for kw in keywords}
    relative = template.format_map(values)
    parts = [p for p in relative.split("/") if p]
    # Literal text was checked at config time; values cannot add separators. Re-check
    # anyway: this function decides where bytes are written.
    if any(p in (".", "..") for p in parts):
        raise ValueError("template produced a '.' or '..' path component")
    return root.joinpath(*parts)


def _create_temporary(folder: Path, name: str) -> tuple[int, str]:
    """A new, empty hidden file in `folder` for `name`, opened for writing: mode 0666 less
    the umask (``tempfile.mkstemp`` would make it 0600, unreadable to the folder's other
    users), ``O_EXCL`` so that two writers never share one."""
    while True:
        tmp_name = str(folder / f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp_name
        except FileExistsError:
            continue


def write_atomically(source: Path, target: Path) -> None:
    """Copy `source` to `target` via a flushed temporary file and a rename; the stored
    file's arrival context is left out of its file meta (:func:`relay_header`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = _create_temporary(target.parent, target.name)
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            header, offset = relay_header(src)
            out.write(header)
            src.seek(offset)
            shutil.copyfileobj(src, out, _COPY_CHUNK)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def _instance_in(path: Path) -> str | None:
    """The SOP Instance UID of the file at ``path``; None: no file there; "": a file that
    is no readable instance."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"], force=True)
    except FileNotFoundError:
        return None
    except Exception:  # anything pydicom raises on a file that is not DICOM
        return "" if path.exists() else None
    return str(ds.get("SOPInstanceUID", ""))


class FolderSender:
    """Writes instances into a folder tree (see the module docstring)."""

    def __init__(self, name: str, model: FolderDestination, *, concurrency: int = 2) -> None:
        self.name = name
        self.max_batch = 16
        self.concurrency = concurrency
        self._root = model.path
        self._template = model.template
        self._overwrites = (warning := model.overwrite_warning()) is not None
        if warning is not None:
            LOGGER.warning(
                "folder destination %s: %s",
                name,
                warning,
                extra={"event": "config.folder_template_overwrites", "destination": name},
            )

    async def send(self, batch: Sequence[Delivery]) -> list[Outcome]:
        return await asyncio.to_thread(self._send_blocking, list(batch))

    def _send_blocking(self, batch: list[Delivery]) -> list[Outcome]:
        return [self._write_one(d) for d in batch]

    def _write_one(self, delivery: Delivery) -> Outcome:
        try:
            ds = dcmread(delivery.path, stop_before_pixels=True)
            target = render_path(self._root, self._template, ds)
        except OSError as exc:  # the store is unreachable: may come back
            return self._failed(delivery, f"cannot read the stored file: {os_error_reason(exc)}")
        except Exception as exc:  # pydicom raises many kinds (an unknown VR: NotImplementedError)
            # This instance's header: it fails alone, for good (dead-lettered, re-drivable),
            # and is not an internal error of the batch, which would count against the
            # destination's circuit breaker and hold back every other instance.
            return self._failed(delivery, f"cannot read the header: {exception_reason(exc)}", False)
        written = str(ds.get("SOPInstanceUID", "") or delivery.sop_instance_uid)
        replaced = _instance_in(target) if self._overwrites else None
        try:
            write_atomically(delivery.path, target)
        except OSError as exc:  # full disk, share unmounted, permissions: may be fixed
            return self._failed(delivery, f"cannot write: {os_error_reason(exc)}")
        if replaced is not None and replaced != written:
            LOGGER.warning(
                "folder delivery replaced the file of another instance",
                extra={
                    "event": "egress.folder_replaced",
                    "destination": self.name,
                    "sop": uid_hash(written),
                    "replaced_sop": uid_hash(replaced) if replaced else "unreadable",
                },
            )
        return Outcome(delivery.job_id, True)

    def _failed(self, delivery: Delivery, error: str, retryable: bool = True) -> Outcome:
        LOGGER.warning(
            "folder delivery failed: %s",
            error,
            extra={
                "event": "egress.folder_failed",
                "destination": self.name,
                "sop": uid_hash(delivery.sop_instance_uid),
            },
        )
        return Outcome(delivery.job_id, False, retryable, error)

    async def close(self) -> None:
        return None
