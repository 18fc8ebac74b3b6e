"""Typed errors of dicomgate.

The tree::

    DicomgateError
    ├── ConfigError            a configuration file or value is wrong (exit code 2)
    ├── StoreError             the content store cannot take or give bytes
    │   └── StoreFullError     no space left (DIMSE 0xA700, HTTP 507)
    ├── IndexError_            the index database refused or failed
    │   ├── IndexUnavailable   cannot connect / locked for too long (DIMSE 0xA700, HTTP 503)
    │   └── DuplicateRejected  duplicate SOP Instance UID under policy "reject" (DIMSE 0xA900)
    └── InvalidInstance        bytes are not a usable DICOM instance (DIMSE 0xC000-range, HTTP 400)

Errors are mapped to DIMSE statuses in ``dimse/`` and to HTTP codes in ``dicomweb/`` only.
"""

from __future__ import annotations

import re


class DicomgateError(Exception):
    """Root of every error raised on purpose by dicomgate."""


class ConfigError(DicomgateError):
    """A configuration key or value is wrong; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


class StoreError(DicomgateError):
    """The content store failed to write or read."""


class StoreFullError(StoreError):
    """The store's file system has no space left."""


class IndexError_(DicomgateError):
    """The index database failed."""


class IndexUnavailable(IndexError_):
    """The index database is unreachable or locked."""


class CommitUncertain(IndexUnavailable):
    """The connection failed during COMMIT: the server may have committed or not.

    The rows' files must stay until the index says which (``Ingestor`` settles it)."""


class DuplicateRejected(IndexError_):
    """An instance with this SOP Instance UID exists and the policy is ``reject``."""


class InvalidInstance(DicomgateError):
    """The received bytes are not a DICOM instance we can index."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def os_error_reason(exc: OSError) -> str:
    """An ``OSError`` without its file names: a store path holds the study, series and SOP
    Instance UIDs, and a file name may hold a patient ID (DESIGN rule 5: no identifiers in
    logs or error answers)."""
    return f"{type(exc).__name__}: {exc.strerror or 'errno ' + str(exc.errno)}"


# What a client of the DICOM services (DICOMweb, FHIR, DIMSE) is told when the index does
# not answer: not the driver's text, which names the database's host, port and name (the
# operator reads it in /readyz, the log and the admin API).
INDEX_UNAVAILABLE = "the index database is unavailable; try again later"


def one_line(error: BaseException) -> str:
    """The first non-empty line of an error (of the database driver's own error when
    SQLAlchemy wraps one: ``.orig``), else its class name: for log lines and answers."""
    cause = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return lines[0] if lines else type(cause).__name__


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def without_values(text: str) -> str:
    """``text`` with every quoted part (how our messages and pydicom's quote a value:
    ``PatientBirthDate: '1923-04-17' is not a value or a range``) replaced by ``'…'``:
    for a log line, when the full text goes to the requester only."""
    return _QUOTED.sub("'…'", text)


def error_type(error: BaseException) -> str:
    """The error's type as a log or an answer names it: ``ValueError``, ``zlib.error``
    (never its text, which may quote a value)."""
    kind = type(error)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


def error_text(error: BaseException) -> str:
    """``str(error)``, but an ``OSError`` without its file names (:func:`os_error_reason`)."""
    return os_error_reason(error) if isinstance(error, OSError) else str(error)
