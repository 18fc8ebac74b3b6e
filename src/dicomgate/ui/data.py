"""What the console shows, read from the gateway: the overview, recent studies.

Plain dicts of JSON-able values, so the same data serves the HTML pages and
``GET /ui/api/overview`` (what ``dicomgate status`` prints).
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, select

from dicomgate.errors import IndexUnavailable
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
    out = _live_states(gateway)
    for row in out:
        name = row["destination"]
        counts, oldest = depth.get(name, ({}, None))
        error_at, error = last_error.get(name, (None, ""))
        row.update(
            {
                "pending": counts.get("pending", 0),
                "leased": counts.get("leased", 0),
                "dead": counts.get("dead", 0),
                "oldest_job": _iso(oldest),
                "last_success": _iso(last_success.get(name)),
                "last_error_at": _iso(error_at),
                "last_error": error,
            }
        )
    return out


def _live_states(gateway: Gateway) -> list[dict[str, Any]]:
    """Per configured destination, what this process knows without the database: the
    breaker and the schedule; the queue's figures are None until filled in."""
    stats = gateway.dispatcher.stats()
    out = []
    for name in gateway.config.destinations:
        stat = stats.get(name, {})
        out.append(
            {
                "destination": name,
                "pending": None,
                "leased": None,
                "dead": None,
                "oldest_job": None,
                "last_success": None,
                "last_error_at": None,
                "last_error": "",
                "breaker": "open" if stat.get("breaker_open") else "closed",
                "schedule": "open" if stat.get("schedule_open", 1) else "closed",
            }
        )
    return out


def _stored(gateway: Gateway) -> tuple[int, int]:
    """Instances in the store and their bytes, from the index."""
    with gateway.index.engine.connect() as connection:
        stored = connection.execute(
            select(func.count(), func.coalesce(func.sum(instance.c.size), 0)).where(
                instance.c.is_current
            )
        ).one()
    return int(stored[0]), int(stored[1])


def disk_use(gateway: Gateway, stored: tuple[int, int] | None) -> dict[str, Any]:
    """The store's size (``stored``, from the index: None when it is unavailable) and its
    file system's free space."""
    usage = shutil.disk_usage(gateway.config.storage.path)
    return {
        "instances": None if stored is None else stored[0],
        "store_bytes": None if stored is None else stored[1],
        "disk_total_bytes": usage.total,
        "disk_free_bytes": usage.free,
        "disk_used_percent": round(100 * (usage.total - usage.free) / usage.total, 1)
        if usage.total
        else 0.0,
    }


def overview(gateway: Gateway) -> dict[str, Any]:
    """Everything on the Overview page, as JSON.

    ``index`` is ``ok``, or ``unavailable: <reason>`` when the index database does not
    answer: the page is what an administrator opens then, so it still shows what the
    process knows (associations, breakers, schedules, free disk), with None for the
    figures read from the database, instead of failing as a whole.
    """
    view: dict[str, Any] = {
        "generated_at": _iso(datetime.now(UTC)),
        "associations": int(getattr(gateway.dimse, "_active", 0)),
        "index": "ok",
    }
    try:
        received: list[dict[str, Any]] | None = received_last_hour(gateway)
        destinations = destination_states(gateway)
        stored: tuple[int, int] | None = _stored(gateway)
    except IndexUnavailable as exc:
        view["index"] = f"unavailable: {exc}"
        received, destinations, stored = None, _live_states(gateway), None
    view["received_last_hour"] = received
    view["destinations"] = destinations
    view["disk"] = disk_use(gateway, stored)
    return view


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
