"""Egress: delivering stored instances to destinations (DIMSE, DICOMweb, folder, webhook).

The dispatcher builds one :class:`Sender` per destination with :func:`build_sender` and
hands it batches of :class:`Delivery`; each answers one :class:`Outcome` per delivery.
"""

from __future__ import annotations

from dicomgate.egress.base import Delivery, Outcome, Sender, build_sender

__all__ = ["Delivery", "Outcome", "Sender", "build_sender"]
