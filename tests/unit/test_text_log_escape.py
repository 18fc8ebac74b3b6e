"""The text log format keeps one record on one line (log forging through a value)."""

from __future__ import annotations

import logging
from typing import Any

from dicomgate.observability.logging import TextFormatter


def test_text_log_escapes_control_characters_of_any_value() -> None:
    """The text formatter (``logging.format: text``) keeps one record on one line whatever
    a value holds (defence in depth: a value from a peer we did not think of)."""
    record = logging.makeLogRecord(
        {
            "name": "dicomgate.test",
            "levelname": "WARNING",
            "msg": "refused %s",
            "args": ("A\r\nB\u2028C",),
            "event": "test.event",
            "calling_ae": "CT\n2099-01-01 00:00:00 INFO    forged",
            "tag\n": "\x07\x7f\x85",
        }
    )
    line = TextFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\u2028" not in line
    assert "refused A\\r\\nB\\u2028C" in line
    assert "calling_ae=CT\\n2099-01-01 00:00:00 INFO    forged" in line
    assert "tag\\n=\\x07\\x7f\\x85" in line
    plain: dict[str, Any] = {"msg": "stored", "event": "e", "path": "C:\\data\\n1"}
    assert "path=C:\\data\\n1" in TextFormatter().format(logging.makeLogRecord(plain))
