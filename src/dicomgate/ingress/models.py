"""Configuration of the ingress kinds that are not network listeners (``ingest:`` in the YAML)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator

from dicomgate.models import ConfigModel as _Model
from dicomgate.models import check_ae_title as _check_ae_title

AFTER_DELETE = "delete"
AFTER_MOVE_PREFIX = "move:"


class IngestConfig(_Model):
    """A watched folder: DICOM files dropped into it are stored, indexed and routed exactly
    like instances received over the network, then removed (or moved away)."""

    watch: Path | None = Field(
        None,
        description=(
            "Folder to watch, searched recursively (sub-folders included); unset means no"
            " folder ingest. Drop DICOM files (Part 10 files, with or without extension, or"
            " bare data sets), whole media folders with a DICOMDIR, or zip files of them."
            " Created at start-up if missing; the gateway does not start if it cannot read"
            " and write it. Files and folders whose names start with a dot, and files ending in"
            " `.part` or `.tmp`, are ignored: copy under such a name and rename when done for"
            " an instant hand-over. A relative path is taken from the working directory."
        ),
    )
    after: str = Field(
        AFTER_DELETE,
        description=(
            "What happens to a file once every instance in it is stored, indexed and its"
            " deliveries are queued: `delete` removes it; `move:/some/folder` moves it there,"
            " keeping its path below the watch folder and never replacing a file (a `-1`,"
            " `-2` ... suffix is added). A move target inside the watch folder is allowed and"
            " is not watched itself."
        ),
    )
    rejected: Path | None = Field(
        None,
        description=(
            "Where files that cannot be ingested go (not DICOM, truncated, inconsistent, or a"
            " duplicate refused by `storage.duplicates: reject`), keeping their path below the"
            " watch folder, each with a `<name>.reason.txt` file of one line saying why. Unset"
            " means `rejected/` inside the watch folder, which is not watched itself. Files are"
            " never rejected for lack of disk space: they wait for the next scan."
        ),
    )
    settle: float = Field(
        5.0,
        ge=0,
        description=(
            "Seconds a file's size and modification time must stay unchanged before it is"
            " read, so a file still being copied is not taken half-written. Raise it for slow"
            " network copies; 0 takes files at the first scan (only safe when senders write"
            " under a dot-, `.part` or `.tmp` name and rename when done)."
        ),
    )
    poll_interval: float = Field(
        2.0,
        gt=0,
        description="Seconds between two scans of the watch folder.",
    )
    concurrency: int = Field(
        4,
        ge=1,
        le=64,
        description=(
            "Files (or zip members) read and stored at the same time. A few in flight let the"
            " index commit them together; more rarely helps."
        ),
    )
    calling_ae: str = Field(
        "FOLDER",
        description=(
            "Recorded as the calling AE title (and Source AE Title) of every instance taken"
            " from the folder, so routes can match it with `calling_ae`; routes can also match"
            " `received_via: folder`. 1-16 characters, no backslash."
        ),
    )
    remove_empty_folders: bool = Field(
        False,
        description=(
            "Remove a sub-folder of the watch folder once the files taken from it have left"
            " it empty and it has been unchanged for `settle` seconds (the watch folder itself"
            " is kept). Leave `false` when senders write into fixed sub-folders that they do"
            " not create again."
        ),
    )

    _ae = field_validator("calling_ae")(classmethod(lambda cls, v: _check_ae_title(v)))

    @field_validator("after")
    @classmethod
    def _after(cls, value: str, info: ValidationInfo) -> str:
        if value == AFTER_DELETE:
            return value
        target = value[len(AFTER_MOVE_PREFIX) :].strip()
        if not value.startswith(AFTER_MOVE_PREFIX) or not target:
            raise ValueError(f"use `delete` or `move:/path/to/folder`, not {value!r}")
        watch = info.data.get("watch")
        if watch is not None and _absolute(Path(target)) == _absolute(watch):
            raise ValueError("the move target must not be the watch folder itself")
        return value

    @field_validator("rejected")
    @classmethod
    def _rejected(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return value
        watch = info.data.get("watch")
        if watch is not None and _absolute(value) == _absolute(watch):
            raise ValueError("must not be the watch folder itself")
        after = info.data.get("after", AFTER_DELETE)
        if after.startswith(AFTER_MOVE_PREFIX) and _absolute(
            Path(after[len(AFTER_MOVE_PREFIX) :].strip())
        ) == _absolute(value):
            raise ValueError("must not be the folder of `after: move:`")
        return value

    @property
    def move_to(self) -> Path | None:
        """The folder of ``after: move:PATH``; ``None`` for ``delete``."""
        if self.after == AFTER_DELETE:
            return None
        return Path(self.after[len(AFTER_MOVE_PREFIX) :].strip())

    @property
    def rejected_folder(self) -> Path | None:
        """``rejected``, or ``<watch>/rejected`` by default; ``None`` without ``watch``."""
        if self.watch is None:
            return None
        return self.rejected if self.rejected is not None else self.watch / "rejected"


def _absolute(path: Path) -> Path:
    """``path`` made absolute and normalised without touching the disk."""
    return Path(os.path.normpath(path.absolute()))
