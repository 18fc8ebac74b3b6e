"""Configuration model of a route (``routes:`` in the YAML)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from dicomgate.models import ConfigModel as _Model


class RouteConfig(_Model):
    """One forwarding rule: which instances, changed how, sent where."""

    name: str = Field(description="Name of the route, shown in logs, metrics and the queue.")
    match: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Conditions an instance must meet, all of them: a DICOM attribute keyword (e.g."
            " `Modality`, `StudyDescription`) or `calling_ae`, mapped to a value with `*` and"
            " `?` wildcards or a list of alternatives. Empty matches every instance."
        ),
    )
    pipeline: list[dict[str, Any]] = Field(
        default_factory=list,
        description=(
            "Processing steps applied to the copy sent (never to the stored original), in"
            " order; each is a one-key mapping: `deidentify`, `standardize`, `transcode` or"
            " `split`. Empty sends the instance unchanged."
        ),
    )
    to: list[str] = Field(
        min_length=1,
        description="Names of destinations (keys of `destinations`) to send to; at least one.",
    )
    final: bool = Field(
        False,
        description="When this route matches, do not evaluate the routes after it.",
    )
    trigger: Literal["instance", "series_stable", "study_stable"] = Field(
        "instance",
        description=(
            "When to send: `instance` as each instance arrives; `series_stable` or"
            " `study_stable` once the series or study has received nothing new for"
            " `stable_after`."
        ),
    )
    stable_after: str = Field(
        "60s",
        description=(
            "Quiet time before a series or study counts as complete, for the `*_stable`"
            " triggers: a number with a unit, e.g. `60s`."
        ),
    )
