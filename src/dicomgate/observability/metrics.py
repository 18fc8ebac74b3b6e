"""Prometheus metrics (``/metrics``). Every name starts with ``dicomgate_``.

:class:`Metrics` owns the metric objects on its own registry (nothing at import time, no
global registry: several gateways in one test process do not collide). Counters and
histograms are moved by the event bus (:mod:`dicomgate.observability.events`) and the HTTP
middleware; what is a state rather than an event (queue depth, oldest job, disk free,
circuit breakers) is read at scrape time by :class:`GatewayCollector`, cached for
``metrics.scrape_cache`` seconds.

Several processes on one host (``PROMETHEUS_MULTIPROC_DIR`` set before start-up): counters,
histograms and the active-association gauge are written to memory-mapped files there by
prometheus-client and every process's ``/metrics`` answers the sum
(:class:`prometheus_client.multiprocess.MultiProcessCollector`); the scrape-time figures
come from the shared database and disk, so any process answers them alike.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dicomgate.observability.logging import Outage

log = logging.getLogger("dicomgate.metrics")

# Latency buckets (seconds): sub-millisecond acks up to a minute-long delivery batch.
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SLOW = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
OTHER = "other"


class LabelLimiter:
    """Keep at most ``limit`` distinct values of a free-text label (calling AE titles come
    from the network): later new values are reported as ``other``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: object) -> str:
        text = "" if value is None else str(value)[:64]
        if text in self._seen:
            return text
        with self._lock:
            if len(self._seen) >= self._limit:
                return OTHER
            self._seen.add(text)
        return text


class Metrics:
    """The gateway's metric objects. ``multiprocess_dir`` defaults to the environment's
    ``PROMETHEUS_MULTIPROC_DIR`` (read by prometheus-client itself when it is imported)."""

    def __init__(self, *, max_label_values: int = 200, multiprocess_dir: str | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self.registry = CollectorRegistry(auto_describe=True)
        self.ae = LabelLimiter(max_label_values)
        self.name = LabelLimiter(max_label_values)
        r = self.registry
        self.associations_active = Gauge(
            "dicomgate_associations_active",
            "DIMSE associations currently open (accepted, not yet ended).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.associations = Counter(
            "dicomgate_associations",
            "DIMSE association requests, by calling AE title and result (accepted, rejected).",
            ["calling_ae", "result"],
            registry=r,
        )
        self.associations_ended = Counter(
            "dicomgate_associations_ended",
            "Accepted DIMSE associations that ended, by how (released, aborted, lost).",
            ["calling_ae", "how"],
            registry=r,
        )
        self.instances_received = Counter(
            "dicomgate_instances_received",
            "Instances made durable and indexed, by calling AE title and ingress"
            " (dimse, stow, folder).",
            ["calling_ae", "ingress"],
            registry=r,
        )
        self.bytes_received = Counter(
            "dicomgate_received_bytes",
            "Bytes of the stored files of received instances, by calling AE and ingress.",
            ["calling_ae", "ingress"],
            registry=r,
        )
        self.instances_refused = Counter(
            "dicomgate_instances_refused",
            "Instances refused (incomplete, inconsistent, duplicate under reject, store full),"
            " by calling AE title and reason.",
            ["calling_ae", "reason"],
            registry=r,
        )
        self.instances_mislabelled = Counter(
            "dicomgate_instances_mislabelled",
            "Stored instances whose data set is not in the VR encoding of its transfer"
            " syntax, by calling AE title, ingress and action (relabelled: stored under"
            " the Little Endian syntax of its bytes; kept: stored under the sender's).",
            ["calling_ae", "ingress", "action"],
            registry=r,
        )
        self.store_ack_seconds = Histogram(
            "dicomgate_store_ack_seconds",
            "Time from a fully received instance to its acknowledgement being possible"
            " (flushed, indexed, route jobs committed), by ingress. For dimse this is the"
            " C-STORE acknowledgement latency added by the gateway.",
            ["ingress"],
            buckets=_FAST,
            registry=r,
        )
        self.stow_requests = Counter(
            "dicomgate_stow_requests",
            "STOW-RS requests, by result (stored, partial, failed, refused).",
            ["result"],
            registry=r,
        )
        self.stow_seconds = Histogram(
            "dicomgate_stow_request_seconds",
            "STOW-RS request duration, from the request to the response (body upload included).",
            buckets=_SLOW,
            registry=r,
        )
        self.queries = Counter(
            "dicomgate_queries",
            "Query/retrieve requests answered or refused, by service (find, move, get: DIMSE;"
            " qido, wado, fhir: HTTP GETs, WADO frames and renderings included) and result.",
            ["service", "result"],
            registry=r,
        )
        self.deliveries = Counter(
            "dicomgate_deliveries",
            "Delivery jobs finished an attempt, by destination and outcome (done, failed ="
            " will be retried, dead_lettered).",
            ["destination", "outcome"],
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "dicomgate_delivery_seconds",
            "Duration of one successful send of a batch of jobs to a destination.",
            ["destination"],
            buckets=_SLOW,
            registry=r,
        )
        self.breaker_trips = Counter(
            "dicomgate_circuit_breaker_trips",
            "Times a destination's circuit breaker opened (deliveries paused).",
            ["destination"],
            registry=r,
        )
        self.http_requests = Counter(
            "dicomgate_http_requests",
            "HTTP requests, by method, route template and status code.",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_seconds = Histogram(
            "dicomgate_http_request_seconds",
            "HTTP request duration until the response is complete, by method and route.",
            ["method", "route"],
            buckets=_SLOW,
            registry=r,
        )
        self.auth_failures = Counter(
            "dicomgate_auth_failures",
            "Refused authentications and authorizations, by kind: http (auth.denied), dimse"
            " (dimse.allow refusals, 0x0124), dimse_tls (refused DICOM TLS handshakes).",
            ["kind"],
            registry=r,
        )
        self.tls_probes = Counter(
            "dicomgate_dimse_tls_probes",
            "TCP connections to the DICOM TLS port closed before their first byte (load"
            " balancer health checks, port scans); not audited, logged at DEBUG only.",
            registry=r,
        )
        self.retention_deleted = Counter(
            "dicomgate_retention_deleted_instances",
            "Instances deleted by retention (storage.retention: relay).",
            registry=r,
        )
        self.audit_events = Counter(
            "dicomgate_audit_events",
            "Audit events recorded, by event kind.",
            ["event"],
            registry=r,
        )
        self.audit_failures = Counter(
            "dicomgate_audit_failures",
            "Audit events that could not be written to the database or sent to the audit"
            " repository, by sink (database, syslog).",
            ["sink"],
            registry=r,
        )
        self.log_errors = Counter(
            "dicomgate_log_errors",
            "Log lines of level ERROR or worse, by event name.",
            ["event"],
            registry=r,
        )
        self._collectors: list[Collector] = []

    def add_collector(self, collector: Collector) -> None:
        """A scrape-time collector (queue, disk, destinations)."""
        self._collectors.append(collector)
        self.registry.register(collector)

    def exposition_registry(self) -> CollectorRegistry:
        """The registry ``/metrics`` renders (a multi-process view when configured)."""
        if not self.multiprocess_dir:
            return self.registry
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        for collector in self._collectors:
            merged.register(collector)
        return merged

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.exposition_registry()), CONTENT_TYPE_LATEST


@dataclass(frozen=True)
class QueueFigures:
    """Unfinished jobs of one destination (from :meth:`JobQueue.depth`)."""

    jobs: Mapping[str, int]  # state -> count (pending, leased, dead)
    oldest_created_at: datetime | None  # oldest pending or leased job


class GatewayCollector(Collector):
    """State read at scrape time: queue per destination, destination controls, disk.

    Each source is a plain callable so tests can feed it; results are cached ``cache``
    seconds. A source that fails is skipped for that scrape (and logged), so /metrics keeps
    answering when the database does not.
    """

    def __init__(
        self,
        *,
        queue_depth: Callable[[], Mapping[str, QueueFigures]] | None,
        destinations: Callable[[], Mapping[str, Mapping[str, int]]] | None,
        store_path: Path | None,
        destination_names: Iterable[str] = (),
        cache: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._queue_depth = queue_depth
        self._destinations = destinations
        self._store_path = store_path
        self._names = sorted(destination_names)
        self._cache = cache
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: list[Metric] | None = None
        self._cached_at = 0.0
        self._queue_outage = Outage(  # used under self._lock
            log,
            "queue metrics",
            "metrics.queue_failed",
            "metrics.queue_recovered",
            level=logging.WARNING,
            expected=(Exception,),
        )

    def describe(self) -> Iterable[Metric]:
        return []  # values are read at scrape time only

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            now = self._clock()
            if self._cached is None or now - self._cached_at >= self._cache:
                self._cached = self._read()
                self._cached_at = now
            return list(self._cached)

    def _read(self) -> list[Metric]:
        out: list[Metric] = []
        if self._queue_depth is not None:
            out += self._queue()
        if self._destinations is not None:
            out += self._controls()
        if self._store_path is not None:
            out += self._disk()
        return out

    def _queue(self) -> list[Metric]:
        assert self._queue_depth is not None
        up = GaugeMetricFamily(
            "dicomgate_index_up",
            "1 when the index database answered this scrape's queue query, 0 when it did not"
            " (stores are then refused with 0xA700 / 409 and deliveries wait).",
        )
        try:
            figures = self._queue_depth()
        except Exception as exc:  # the database may be down: say so (once), keep serving
            self._queue_outage.failed(exc)
            up.add_metric([], 0.0)
            return [up]
        self._queue_outage.ok()
        up.add_metric([], 1.0)
        jobs = GaugeMetricFamily(
            "dicomgate_queue_jobs",
            "Unfinished delivery jobs per destination and state (pending, leased, dead).",
            labels=["destination", "state"],
        )
        oldest = GaugeMetricFamily(
            "dicomgate_queue_oldest_job_age_seconds",
            "Age of the oldest pending or leased job per destination (0 when none).",
            labels=["destination"],
        )
        now = datetime.now(UTC)
        for name in sorted(set(self._names) | set(figures)):
            fig = figures.get(name, QueueFigures({}, None))
            for state in ("pending", "leased", "dead"):
                jobs.add_metric([name, state], float(fig.jobs.get(state, 0)))
            age = 0.0
            if fig.oldest_created_at is not None:
                age = max(0.0, (now - fig.oldest_created_at).total_seconds())
            oldest.add_metric([name], age)
        return [up, jobs, oldest]

    def _controls(self) -> list[Metric]:
        assert self._destinations is not None
        stats = self._destinations()
        breaker = GaugeMetricFamily(
            "dicomgate_destination_circuit_open",
            "1 while a destination's circuit breaker is open (deliveries paused), else 0.",
            labels=["destination"],
        )
        schedule = GaugeMetricFamily(
            "dicomgate_destination_schedule_open",
            "1 while a destination's schedule window is open, else 0.",
            labels=["destination"],
        )
        for name, values in sorted(stats.items()):
            breaker.add_metric([name], float(values.get("breaker_open", 0)))
            schedule.add_metric([name], float(values.get("schedule_open", 1)))
        return [breaker, schedule]

    def _disk(self) -> list[Metric]:
        assert self._store_path is not None
        try:
            usage = shutil.disk_usage(self._store_path)
        except OSError as exc:
            log.warning("disk metrics unavailable: %s", exc, extra={"event": "metrics.disk_failed"})
            return []
        free = GaugeMetricFamily(
            "dicomgate_store_free_bytes",
            "Free bytes on the file system of the content store (storage.path).",
        )
        free.add_metric([], float(usage.free))
        total = GaugeMetricFamily(
            "dicomgate_store_size_bytes", "Size in bytes of the content store's file system."
        )
        total.add_metric([], float(usage.total))
        return [free, total]


def build_info(registry: CollectorRegistry, version: str, node: str) -> None:
    """``dicomgate_build_info{version, node} 1`` and the start time."""
    info = Gauge(
        "dicomgate_build_info",
        "Always 1; the labels say which version runs on which node.",
        ["version", "node"],
        registry=registry,
        multiprocess_mode="max",
    )
    info.labels(version, node).set(1)
    started = Gauge(
        "dicomgate_start_time_seconds",
        "Unix time the gateway process started.",
        registry=registry,
        multiprocess_mode="min",
    )
    started.set(time.time())


__all__ = ["GatewayCollector", "LabelLimiter", "Metrics", "QueueFigures"]
