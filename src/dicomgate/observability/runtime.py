"""Wiring of metrics, the event bus and the audit trail for one running gateway."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine

from dicomgate import __version__
from dicomgate.observability.atna import SyslogSender
from dicomgate.observability.audit import AuditTrail
from dicomgate.observability.events import EventHandler
from dicomgate.observability.metrics import GatewayCollector, Metrics, QueueFigures, build_info
from dicomgate.observability.models import AuditConfig, MetricsConfig

if TYPE_CHECKING:
    from dicomgate.egress.dispatcher import Dispatcher
    from dicomgate.queue.jobs import JobQueue


class Observability:
    """Owns :class:`Metrics`, the :class:`AuditTrail` (None when ``audit.enabled`` is
    false) and the :class:`EventHandler` on the ``dicomgate`` logger. Audit rows the
    database cannot take wait in ``audit_journal`` (a file) until it can."""

    def __init__(
        self,
        metrics_config: MetricsConfig,
        audit_config: AuditConfig,
        engine: Engine,
        audit_journal: Path | None = None,
    ):
        self.metrics_config = metrics_config
        self.node = audit_config.node_name or socket.gethostname()
        self.metrics = Metrics(max_label_values=metrics_config.max_label_values)
        build_info(self.metrics.registry, __version__, self.node)
        self.audit: AuditTrail | None = None
        self.syslog: SyslogSender | None = None
        if audit_config.enabled:
            if audit_config.syslog is not None:
                self.syslog = SyslogSender(audit_config.syslog, self.node, str(os.getpid()))
            self.audit = AuditTrail(
                engine,
                node=self.node,
                keep_for=audit_config.keep_for,
                forward=self.syslog,
                on_recorded=lambda kind: self.metrics.audit_events.labels(kind).inc(),
                on_failure=lambda sink: self.metrics.audit_failures.labels(sink).inc(),
                on_idle=self.syslog.probe_if_failing if self.syslog is not None else None,
                journal=audit_journal,
            )
        self.handler = EventHandler(self.metrics, self.audit)
        self._logger = logging.getLogger("dicomgate")

    def install(self) -> None:
        """Start the audit writer and put the event handler on the ``dicomgate`` logger."""
        if self.audit is not None:
            self.audit.start()
        if self.handler not in self._logger.handlers:
            self._logger.addHandler(self.handler)
        # Events are INFO: they must reach the handler whatever the log level shown.
        if self._logger.getEffectiveLevel() > logging.INFO:
            self._logger.setLevel(logging.INFO)

    def watch(self, queue: JobQueue, dispatcher: Dispatcher, store_path: Path) -> None:
        """Scrape-time figures: queue depth per destination, breakers, disk free."""

        def depth() -> Mapping[str, QueueFigures]:
            return {name: QueueFigures(c, oldest) for name, (c, oldest) in queue.depth().items()}

        self.metrics.add_collector(
            GatewayCollector(
                queue_depth=depth,
                destinations=dispatcher.stats,
                store_path=store_path,
                destination_names=dispatcher.stats().keys(),
                cache=self.metrics_config.scrape_cache,
            )
        )

    def uninstall(self) -> None:
        """Remove the handler, write the queued audit events, close the syslog connection."""
        if self.audit is not None:
            self.audit.stop()
        self._logger.removeHandler(self.handler)
        if self.syslog is not None:
            self.syslog.close()


__all__ = ["Observability"]
