"""Which stored files answer a WADO request: index lookups by Study/Series/SOP UID.

Only the current copy of each SOP Instance UID is served (``instance.is_current``).
Instances are ordered by Instance Number, then SOP Instance UID.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine, select, true
from sqlalchemy import exc as sa_exc

from dicomgate.errors import IndexUnavailable
from dicomgate.index.schema import instance, series, study

__all__ = ["StoredRef", "find_instances"]


@dataclass(frozen=True)
class StoredRef:
    """One stored instance as WADO needs it."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    relpath: str  # under the store root
    size: int  # bytes of the Part 10 file
    rows: int | None  # None: not an image
    columns: int | None
    number_of_frames: int | None


def find_instances(
    engine: Engine, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
) -> list[StoredRef]:
    """The current instances of a study, series or one instance (empty if unknown)."""
    query = (
        select(
            study.c.study_instance_uid,
            series.c.series_instance_uid,
            instance.c.sop_instance_uid,
            instance.c.sop_class_uid,
            instance.c.transfer_syntax_uid,
            instance.c.relpath,
            instance.c.size,
            instance.c.rows,
            instance.c.columns,
            instance.c.number_of_frames,
        )
        .select_from(
            instance.join(series, instance.c.series_pk == series.c.id).join(
                study, series.c.study_pk == study.c.id
            )
        )
        .where(study.c.study_instance_uid == study_uid, instance.c.is_current == true())
        .order_by(
            series.c.series_number,
            series.c.series_instance_uid,
            instance.c.instance_number,
            instance.c.sop_instance_uid,
        )
    )
    if series_uid is not None:
        query = query.where(series.c.series_instance_uid == series_uid)
    if sop_uid is not None:
        query = query.where(instance.c.sop_instance_uid == sop_uid)
    try:
        with engine.connect() as connection:
            rows = connection.execute(query).all()
    except sa_exc.DBAPIError as error:
        raise IndexUnavailable(str(error.orig or error).splitlines()[0]) from error
    return [
        StoredRef(
            study_uid=row[0],
            series_uid=row[1],
            sop_instance_uid=row[2],
            sop_class_uid=row[3],
            transfer_syntax_uid=row[4],
            relpath=row[5],
            size=int(row[6]),
            rows=row[7],
            columns=row[8],
            number_of_frames=row[9],
        )
        for row in rows
    ]
