"""Configuration models of the destination kinds (``destinations:`` in the YAML)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from dicomgate.models import ConfigModel as _Model
from dicomgate.models import check_ae_title as _check_ae_title


class DimseDestination(_Model):
    """Send with C-STORE to a DICOM node (PACS, workstation, AI engine)."""

    type: Literal["dimse"] = Field(description="Destination kind: `dimse`.")
    ae_title: str = Field(description="The peer's AE title (the called AE title we use).")
    host: str = Field(description="The peer's host name or IP address.")
    port: int = Field(104, ge=1, le=65535, description="The peer's DICOM TCP port.")
    calling_ae_title: str | None = Field(
        None,
        description=(
            "Calling AE title we present to this peer; unset means `dimse.ae_title`. Set it"
            " when the peer knows this gateway under another name."
        ),
    )
    max_associations: int = Field(
        2,
        ge=1,
        description=(
            "Most associations open at once to this peer. Raise it for throughput if the peer"
            " accepts more; keep it low for a busy PACS."
        ),
    )

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))


class DicomwebDestination(_Model):
    """Send with STOW-RS to a DICOMweb service (cloud archive, VNA)."""

    type: Literal["dicomweb"] = Field(description="Destination kind: `dicomweb`.")
    url: str = Field(
        description=(
            "Base URL of the DICOMweb service (the part before `/studies`), e.g."
            " `https://example.org/dicomWeb`."
        )
    )


class FolderDestination(_Model):
    """Write Part 10 files into a folder (a share, a research drop box)."""

    type: Literal["folder"] = Field(description="Destination kind: `folder`.")
    path: Path = Field(description="Folder the files are written into.")


class WebhookDestination(_Model):
    """Notify an HTTP endpoint (e.g. an AI engine) about received instances."""

    type: Literal["webhook"] = Field(description="Destination kind: `webhook`.")
    url: str = Field(description="URL of the endpoint to notify.")
