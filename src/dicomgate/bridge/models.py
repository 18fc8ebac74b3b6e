"""``query:`` in the config: where queries and retrieves go (local store or an upstream)."""

from __future__ import annotations

from pydantic import Field, field_validator

from dicomgate.models import ConfigModel as _Model
from dicomgate.models import check_ae_title

LOCAL = "local"


class _Source(_Model):
    """Where one entry point's queries and retrieves are answered."""

    source: str = Field(
        LOCAL,
        description=(
            "`local` (the gateway's own index and store) or the name of a destination: a"
            " `dicomweb` destination (queries become QIDO-RS, retrieves WADO-RS) or a `dimse`"
            " destination (queries become C-FIND, retrieves C-GET or C-MOVE on that PACS)."
        ),
    )
    timeout: float = Field(
        30.0,
        gt=0,
        description=(
            "Seconds to wait for the upstream's answer to a query, and between two instances"
            " of a retrieve; on expiry the request fails (DIMSE 0xA700-range, HTTP 504)."
        ),
    )


class QuerySource(_Source):
    """Where C-FIND / C-MOVE / C-GET to one (virtual) AE title are answered."""

    move: str = Field(
        "relay",
        description=(
            "With a `dimse` source, how a C-MOVE is passed on. `relay`: the C-MOVE goes to"
            " the PACS with the Move Destination translated by `move_destination_map`; the"
            " PACS sends the instances itself, so it must know that AE title and its"
            " address. `forward`: the gateway C-GETs the instances from the PACS (which"
            " must allow C-GET to our AE title) and sends them on to the move destination,"
            " which must be one of the gateway's move destinations; the PACS needs to know"
            " only the gateway."
        ),
    )
    move_destination_map: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "`move: relay`: Move Destinations as the requestor names them -> as the PACS"
            " knows them, e.g. `{VIEWER: WS01_VIEWER}`. An AE title not listed is passed on"
            " unchanged."
        ),
    )

    @field_validator("move")
    @classmethod
    def _move(cls, value: str) -> str:
        if value not in ("relay", "forward"):
            raise ValueError("use relay or forward")
        return value

    @field_validator("move_destination_map")
    @classmethod
    def _move_map(cls, value: dict[str, str]) -> dict[str, str]:
        return {check_ae_title(k): check_ae_title(v) for k, v in value.items()}


class DicomwebQuerySource(_Source):
    """Where QIDO-RS / WADO-RS requests to this gateway are answered."""

    retrieve: str = Field(
        "get",
        description=(
            "With a `dimse` source: `get` (C-GET over our association) or `move` (C-MOVE to"
            " this gateway's own AE title, `dimse.ae_title`, which the PACS must know)."
        ),
    )
    cache_seconds: float = Field(
        300.0,
        ge=0,
        description=(
            "How long instances retrieved from the upstream stay in a local cache, so that a"
            " viewer fetching metadata then frames retrieves once; 0: no cache."
        ),
    )
    cache_bytes: int = Field(
        1 << 30, ge=0, description="Most bytes kept in that cache (oldest evicted first)."
    )

    @field_validator("retrieve")
    @classmethod
    def _retrieve(cls, value: str) -> str:
        if value not in ("get", "move"):
            raise ValueError("use get or move")
        return value


class QueryConfig(_Model):
    """Where queries and retrieves are answered: locally, or bridged to an upstream."""

    dimse: QuerySource = Field(
        default_factory=QuerySource,
        description=("C-FIND / C-MOVE / C-GET to the gateway's own AE title (`dimse.ae_title`)."),
    )
    ae_titles: dict[str, QuerySource] = Field(
        default_factory=dict,
        description=(
            "Virtual AE titles, each with its own source: a C-FIND/C-MOVE/C-GET whose called"
            " AE title is a key here is answered by that source, e.g."
            " `{CLOUD: {source: cloud}}` exposes a DICOMweb archive as a DICOM node and"
            " `{PACS_PROXY: {source: pacs}}` relays to a PACS (AE-title translation)."
            " Associations to these AE titles are accepted even with `check_called_ae`."
        ),
    )
    dicomweb: DicomwebQuerySource = Field(
        default_factory=DicomwebQuerySource,
        description="QIDO-RS and WADO-RS on `/dicomweb`.",
    )

    @field_validator("ae_titles")
    @classmethod
    def _titles(cls, value: dict[str, QuerySource]) -> dict[str, QuerySource]:
        return {check_ae_title(k): v for k, v in value.items()}
