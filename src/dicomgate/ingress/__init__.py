"""Ingress kinds other than the network listeners: the watched folder (``ingest:``)."""

from __future__ import annotations

from dicomgate.ingress.models import IngestConfig

__all__ = ["IngestConfig"]
