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
import sys
import time
from typing import Any

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


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        event = getattr(record, "event", "")
        line = f"{stamp} {record.levelname:<7} {event:<24} {record.getMessage()}"
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
