"""Structured logging with a stable event name per line and no PHI.

Every log call passes ``extra={"event": "instance.stored", ...}``. Identifiers that could
point at a patient are never logged; UIDs are logged as :func:`uid_hash` (DESIGN rule 5).
Fields named ``audit_*`` are for the audit trail only (which may hold PHI, e.g. a request
path with UIDs): the formatters here never print them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import time
import warnings
from typing import Any

from dicomgate.errors import DicomgateError, one_line

_STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}
AUDIT_ONLY = "audit_"  # prefix of the fields that reach the audit trail, never a log line


def uid_hash(value: str) -> str:
    """A short, stable, non-reversible token for a UID or identifier in logs."""
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: v
        for k, v in vars(record).items()
        if k not in _STANDARD and k != "event" and not k.startswith(AUDIT_ONLY)
    }


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", record.name),
            "msg": record.getMessage(),
        }
        doc.update(_fields(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


# Control characters (C0, DEL, C1) and the Unicode line and paragraph separators: in a
# text log line they would start a new line, or a forged one, or move the terminal's cursor.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_MNEMONIC = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """``text`` with each control character written as an escape (``\\n``, ``\\x1b``),
    so that one log record stays one line whatever a peer put into a value (an AE title
    with a newline must not forge the next line of the log)."""
    return _CONTROL.sub(_escape_one, text)


def _escape_one(match: re.Match[str]) -> str:
    char = match[0]
    if char in _MNEMONIC:
        return _MNEMONIC[char]
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


class TextFormatter(logging.Formatter):
    """One line per record: time, level, event, message, ``[key=value ...]``; control
    characters in the message and the values are escaped (:func:`escape_controls`); only
    a traceback adds lines."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        extra = " ".join(
            f"{escape_controls(str(k))}={escape_controls(str(v))}"
            for k, v in _fields(record).items()
        )
        event = escape_controls(str(getattr(record, "event", "")))
        line = f"{stamp} {record.levelname:<7} {event:<24} {escape_controls(record.getMessage())}"
        if extra:
            line += f" [{extra}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Install one stderr handler on the ``dicomgate`` logger (called by ``serve``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    # The handler filters what is shown; the logger lets INFO events through whatever the
    # level, for the metrics and audit handler (observability/events.py).
    handler.setLevel(level)
    root = logging.getLogger("dicomgate")
    root.handlers[:] = [handler]
    root.setLevel(min(logging.getLevelName(level), logging.INFO))
    root.propagate = False
    # Other libraries' warnings and errors (uvicorn, asyncio, SQLAlchemy) in the same
    # format: with no handler on Python's root logger they reached stderr bare, through
    # logging's last-resort handler, a line that a JSON log collector cannot parse.
    others = logging.StreamHandler(sys.stderr)
    others.setFormatter(handler.formatter)
    others.setLevel(max(logging.WARNING, handler.level))
    logging.getLogger().handlers[:] = [others]
    for noisy in ("uvicorn.access",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Python warnings too: printed bare to stderr, with the warning's source line, they
    # broke a JSON log into lines that are not JSON.
    logging.captureWarnings(True)
    # pydicom's warnings are about values of the instances it reads ("Failed to decode byte
    # string with encoding 'UTF8'", "Invalid value for VR DA: '...'"), twice over (its
    # logger and a Python warning): they name no instance, so no one can act on them, and
    # some quote the value, which may be patient data (rule 5). The gateway stores values
    # as received and says what it could not read where it can name the instance (the
    # ``undecodable`` field of instance.stored).
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
    warnings.filterwarnings("ignore", message="Invalid value for VR", category=UserWarning)


class Outage:
    """The log of a background task that fails again and again (the database down, say).

    A task that retries every second or two logged each failure with its traceback: an
    hour's outage wrote thousands of lines and buried everything else. Here the first
    failure is logged once at ``level`` (ERROR by default), with its traceback only when
    the error is not ``expected`` (by default a :class:`~dicomgate.errors.DicomgateError`,
    a known condition such as IndexUnavailable); the same trouble again only as a reminder
    every ``remind`` seconds (``still failing after N s``), other repeats at DEBUG; and the
    first success after it once at INFO under ``recovered_event``. Not thread-safe: one
    instance per task (or per group of tasks on one event loop).
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        event: str,
        recovered_event: str,
        *,
        remind: float = 300.0,
        level: int = logging.ERROR,
        expected: tuple[type[BaseException], ...] = (DicomgateError,),
        extra: dict[str, Any] | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        self._log = logger
        self._what = what
        self._event = event
        self._recovered = recovered_event
        self._remind = remind
        self._level = level
        self._expected = expected
        self._extra = extra or {}
        self._clock = clock
        self._since: float | None = None
        self._reminded = 0.0
        self.failures = 0

    @property
    def failing(self) -> bool:
        return self._since is not None

    def failed(self, error: BaseException) -> None:
        """Call in the ``except`` block of the failed attempt."""
        now = self._clock()
        self.failures += 1
        reason = one_line(error)
        extra = {"event": self._event, **self._extra}
        if self._since is None:
            self._since = self._reminded = now
            known = isinstance(error, self._expected)
            self._log.log(
                self._level,
                "%s failed: %s",
                self._what,
                reason,
                exc_info=None if known else error,
                extra=extra,
            )
        elif now - self._reminded >= self._remind:
            self._reminded = now
            self._log.log(
                self._level,
                "%s still failing after %.0f s (%d failures): %s",
                self._what,
                now - self._since,
                self.failures,
                reason,
                extra=extra,
            )
        else:
            self._log.debug("%s failed again: %s", self._what, reason, extra=extra)

    def ok(self) -> None:
        """Call after a successful attempt (cheap when nothing failed)."""
        if self._since is None:
            return
        self._log.info(
            "%s: working again after %.0f s (%d failures)",
            self._what,
            self._clock() - self._since,
            self.failures,
            extra={"event": self._recovered, **self._extra},
        )
        self._since = None
        self.failures = 0
