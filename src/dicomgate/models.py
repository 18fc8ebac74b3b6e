"""Shared base of the configuration models (strict: unknown keys are errors)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2 AE VR: no backslash, no control


class ConfigModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_ae_title(value: str) -> str:
    """Validate an AE title (PS3.5 6.2); returns it without surrounding spaces."""
    if not value.strip() or not _AE_RE.match(value):
        raise ValueError("an AE title is 1-16 printable characters, no backslash")
    return value.strip()
