"""dicomgate: a DICOM gateway that never loses an image."""

from __future__ import annotations

__version__ = "0.1.0"

# DICOM implementation identity (PS3.7 D.3.3.2): our UID root is a 2.25 UUID-derived root.
IMPLEMENTATION_CLASS_UID = "2.25.294519812735404386428406011712426105349"
IMPLEMENTATION_VERSION_NAME = "DICOMGATE_010"
