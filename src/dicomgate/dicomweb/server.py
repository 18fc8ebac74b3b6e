"""The DICOMweb server under ``/dicomweb`` (PS3.18) and FHIR under ``/fhir``.

Each service is its own module with a ``router(gateway)`` returning a FastAPI router:
``stow`` (STOW-RS), ``qido`` (QIDO-RS), ``wado`` (WADO-RS, WADO-URI), ``fhir``
(ImagingStudy). Errors are JSON bodies ``{"error": "..."}`` (rule 6), see :func:`problem`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import JSONResponse

if TYPE_CHECKING:
    from dicomgate.service import Gateway

PREFIX = "/dicomweb"
# Retry-After of every 503 the gateway answers (the index unreachable, a STOW-RS that could
# store nothing for want of resources, a request cut at shutdown): seconds a client's retry
# policy waits before it asks again, whether it is the index back after a fail-over, a
# disk with room again, or another node behind the load balancer.
RETRY_AFTER = 10


def problem(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON error response: ``{"error": message}`` with ``status``; a 503 says when to
    try again (:data:`RETRY_AFTER`)."""
    headers = retry_later(status, headers)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def retry_later(status: int, headers: dict[str, str] | None = None) -> dict[str, str] | None:
    """``headers`` with ``Retry-After`` added to a 503's."""
    if status != 503:
        return headers
    return {"Retry-After": str(RETRY_AFTER), **(headers or {})}


def install_dicomweb(app: FastAPI, gateway: Gateway) -> None:
    """Mount every DICOMweb and FHIR service on ``app``."""
    from dicomgate.dicomweb import fhir, qido, stow, wado

    app.include_router(stow.router(gateway), prefix=PREFIX)
    app.include_router(qido.router(gateway), prefix=PREFIX)
    app.include_router(wado.router(gateway), prefix=PREFIX)
    app.include_router(fhir.router(gateway))
