"""What the console shows, read from the gateway: the overview, recent studies.

Plain dicts of JSON-able values, so the same data serves the HTML pages and
``GET /ui/api/overview`` (what ``dicomgate status`` prints).
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, select

from dicomgate.index.schema import delivery_job, instance, patient, series, study

if TYPE_CHECKING:
    from dicomgate.service import Gateway


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat(timespec="seconds") if value is not None else None


def received_last_hour(gateway: Gateway) -> list[dict[str, Any]]:
    """Instances and bytes received in the last hour, by source AE and way in."""
    since = datetime.now(UTC) - timedelta(hours=1)
    i = instance.c
    query = (
        select(i.calling_ae, i.received_via, func.count(), func.coalesce(func.sum(i.size), 0))
        .where(i.received_at >= since)
        .group_by(i.calling_ae, i.received_via)
        .order_by(func.count().desc())
    )
    with gateway.index.engine.connect() as connection:
        return [
            {"source_ae": ae or "-", "via": via, "instances": int(n), "bytes": int(size)}
            for ae, via, n, size in connection.execute(query)
        ]


def destination_states(gateway: Gateway) -> list[dict[str, Any]]:
    """Per configured destination: queue depth, oldest job, last success and error, breaker."""
    j = delivery_job.c
    depth = gateway.queue.depth()
    stats = gateway.dispatcher.stats()
    last_success: dict[str, datetime] = {}
    last_error: dict[str, tuple[datetime | None, str]] = {}
    with gateway.index.engine.connect() as connection:
        done = select(j.destination, func.max(j.updated_at)).where(j.state == "done")
        for name, when in connection.execute(done.group_by(j.destination)):
            last_success[str(name)] = when
        newest = (
            select(j.destination, func.max(j.updated_at).label("at"))
            .where(j.last_error.is_not(None))
            .group_by(j.destination)
            .subquery()
        )
        errors = select(j.destination, j.updated_at, j.last_error).join(
            newest, and_(newest.c.destination == j.destination, newest.c.at == j.updated_at)
        )
        for name, when, error in connection.execute(errors):
            last_error[str(name)] = (when, str(error))
    out = []
    for name in gateway.config.destinations:
        counts, oldest = depth.get(name, ({}, None))
        stat = stats.get(name, {})
        error_at, error = last_error.get(name, (None, ""))
        out.append(
            {
                "destination": name,
                "pending": counts.get("pending", 0),
                "leased": counts.get("leased", 0),
                "dead": counts.get("dead", 0),
                "oldest_job": _iso(oldest),
                "last_success": _iso(last_success.get(name)),
                "last_error_at": _iso(error_at),
                "last_error": error,
                "breaker": "open" if stat.get("breaker_open") else "closed",
                "schedule": "open" if stat.get("schedule_open", 1) else "closed",
            }
        )
    return out


def disk_use(gateway: Gateway) -> dict[str, Any]:
    """The store's size (from the index) and its file system's free space."""
    with gateway.index.engine.connect() as connection:
        stored = connection.execute(
            select(func.count(), func.coalesce(func.sum(instance.c.size), 0)).where(
                instance.c.is_current
            )
        ).one()
    usage = shutil.disk_usage(gateway.config.storage.path)
    return {
        "instances": int(stored[0]),
        "store_bytes": int(stored[1]),
        "disk_total_bytes": usage.total,
        "disk_free_bytes": usage.free,
        "disk_used_percent": round(100 * (usage.total - usage.free) / usage.total, 1)
        if usage.total
        else 0.0,
    }


def overview(gateway: Gateway) -> dict[str, Any]:
    """Everything on the Overview page, as JSON."""
    return {
        "generated_at": _iso(datetime.now(UTC)),
        "associations": int(getattr(gateway.dimse, "_active", 0)),
        "received_last_hour": received_last_hour(gateway),
        "destinations": destination_states(gateway),
        "disk": disk_use(gateway),
    }


def recent_studies(gateway: Gateway, limit: int = 50) -> list[dict[str, Any]]:
    """The newest studies and, per destination, how many of their jobs are in which state."""
    s, p = study.c, patient.c
    query = (
        select(
            s.id,
            s.study_instance_uid,
            s.study_date,
            s.study_description,
            s.accession_number,
            p.patient_id,
            s.last_received_at,
        )
        .join(patient, patient.c.id == s.patient_pk)
        .order_by(s.last_received_at.desc(), s.id.desc())
        .limit(limit)
    )
    j = delivery_job.c
    with gateway.index.engine.connect() as connection:
        rows = [dict(row) for row in connection.execute(query).mappings()]
        pks = [row["id"] for row in rows]
        delivered: dict[int, dict[str, dict[str, int]]] = {}
        modalities: dict[int, set[str]] = {}
        if pks:
            jobs = (
                select(series.c.study_pk, j.destination, j.state, func.count())
                .select_from(
                    delivery_job.join(instance, instance.c.id == j.instance_pk).join(
                        series, series.c.id == instance.c.series_pk
                    )
                )
                .where(series.c.study_pk.in_(pks))
                .group_by(series.c.study_pk, j.destination, j.state)
            )
            for pk, dest, state, n in connection.execute(jobs):
                delivered.setdefault(pk, {}).setdefault(str(dest), {})[str(state)] = int(n)
            mods = select(series.c.study_pk, series.c.modality).where(series.c.study_pk.in_(pks))
            for pk, modality in connection.execute(mods):
                if modality:
                    modalities.setdefault(pk, set()).add(str(modality))
    for row in rows:
        pk = row.pop("id")
        row["last_received_at"] = _iso(row["last_received_at"])
        row["modalities"] = sorted(modalities.get(pk, ()))
        row["deliveries"] = delivered.get(pk, {})
    return rows
