"""The ``serve`` process: store + index + ingestor + DIMSE acceptor + HTTP app, one loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pydicom.config
import uvicorn

from dicomgate import __version__
from dicomgate.app import create_app
from dicomgate.config import GatewayConfig, RetentionMode, build_pipelines
from dicomgate.dimse.server import DimseServer
from dicomgate.egress.base import build_sender
from dicomgate.egress.dispatcher import Dispatcher
from dicomgate.errors import DicomgateError
from dicomgate.index.db import Index
from dicomgate.ingest import Ingestor
from dicomgate.ingress.folder import FolderWatcher
from dicomgate.observability.logging import configure_logging
from dicomgate.observability.runtime import Observability
from dicomgate.processing.base import StepContext
from dicomgate.queue.jobs import JobQueue
from dicomgate.queue.notify import JobListener
from dicomgate.recovery import NodeLock, RunMarker, recover
from dicomgate.routing.matcher import Router
from dicomgate.security.connections import ConnectionGuard, guarded_http_protocol
from dicomgate.security.tls import ServerTls, check_peer_tls_files
from dicomgate.store.filestore import ContentStore
from dicomgate.store.retention import Retention

log = logging.getLogger("dicomgate.service")


def _display_host(host: str) -> str:
    """A host name a client can use to reach us (for URLs in webhook notifications)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


#: Net allocations of container objects between two collections of the youngest
#: generation (Python's default is 700).
GC_YOUNG_THRESHOLD = 10_000


def settle_garbage_collector() -> None:
    """Keep the cyclic garbage collector off the ingest path, once start-up is done.

    The ~160,000 objects start-up leaves (modules, classes, functions, pydicom's
    dictionaries) live as long as the process, yet every full collection walked them all:
    80-100 ms with the interpreter lock held, twice per 1,000 instances received, as every
    batch's data sets survived a young collection or two and counted towards the next full
    one. ``gc.freeze()`` moves them out of the collector's sight, and a higher threshold
    for the youngest generation lets a batch's objects die of their reference counts
    before a collection promotes them. Not collected first (~85 ms at each start): the few
    hundred objects of start-up's own cyclic garbage stay, once. See
    docs/architecture.md, *Garbage collection*.
    """
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def listen_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket whose accepted connections get TCP_NODELAY.

    asyncio sets TCP_NODELAY only on sockets whose ``proto`` is ``IPPROTO_TCP``; the
    sockets of ``socket.create_server`` have proto 0, so without this every HTTP response
    written in two parts (headers, body) waits ~40 ms for the peer's delayed ACK.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside our loop: signals are ours (Gateway.run stops HTTP and DIMSE)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Gateway:
    """Everything a running gateway owns. ``open`` refuses to start half-configured."""

    def __init__(self, config: GatewayConfig, base_dir: Path = Path(".")) -> None:
        self.config = config
        self.base_dir = base_dir  # the config file's folder: relative pipeline paths
        self.store = ContentStore(
            config.storage.path,
            fsync=config.storage.fsync,
            min_free_bytes=config.storage.min_free_bytes,
        )
        self.node = config.node.resolved_name()
        # Nodes sharing a PostgreSQL database may share storage.path: each keeps its spool,
        # run marker and delivery work files in its own folder (same file system, so the
        # spool -> store rename stays atomic). SQLite keeps the single-node layout.
        self.clustered = config.database.url.startswith("postgres")
        self.node_dir = (
            Path(config.storage.path) / "nodes" / self.node
            if self.clustered
            else Path(config.storage.path)
        )
        if self.clustered:
            self.store.spool_dir = self.node_dir / "spool"
        self.listener: JobListener | None = None
        self.index: Index
        self.http_port = config.http.port
        self.ingestor: Ingestor
        self.dimse: DimseServer
        self.folder: FolderWatcher | None = None
        self.http_tls: ServerTls | None = None
        self.stopping = False  # set once SIGTERM/SIGINT began the shutdown (app._CutAtStop)
        self.started = False  # set once start-up finished, with "gateway.ready" (/readyz)

    def _late_recovery(self, since: float, started: float) -> None:
        grace = self.config.storage.recovery_grace
        log.info(
            "previous run of node %s did not stop cleanly; commits are synchronous, looking"
            " for uncommitted store files in %.0f s",
            self.node,
            grace,
            extra={"event": "recovery.scheduled"},
        )

        def run() -> None:
            time.sleep(grace)
            try:
                recover(self.config.storage.path, since, self.ingestor.adopt, until=started)
            except Exception:  # never take the node down; the files stay where they are
                log.exception("late recovery failed", extra={"event": "recovery.failed"})

        threading.Thread(target=run, name="dicomgate-recovery", daemon=True).start()

    def open(self) -> None:
        """Check the store and open the index (runs migrations). Raises on failure."""
        # The peers' TLS files (a `verify:` CA bundle, a DIMSE destination's certificate,
        # ...) are otherwise first read at a delivery or a login: a missing or unreadable
        # one is a refusal naming the key, before anything is touched, not a traceback.
        check_peer_tls_files(self.config)
        what = (
            f"node {self.node} of storage.path {self.config.storage.path}"
            if self.clustered
            else f"storage.path {self.config.storage.path}"
        )
        self.lock = NodeLock.acquire(self.node_dir, what)  # before anything is touched
        try:
            self._open()
        except BaseException:
            self.lock.release()
            raise

    def _open(self) -> None:
        removed = self.store.open()
        if removed:
            log.warning(
                "removed %d half-received spool files",
                removed,
                extra={"event": "store.spool_recovered"},
            )
        sqlite = self.config.database.url.startswith("sqlite")
        # SQLite commits are relaxed (crash-safe; power-loss-safe at the next barrier, with
        # recovery from the store files); PostgreSQL commits are synchronous. DESIGN.md.
        self.index = Index.open(
            self.config.database.url,
            durable=self.config.storage.fsync and not sqlite,
            timeout=self.config.database.timeout,
        )
        audit_config = self.config.audit
        if audit_config.node_name is None:
            audit_config = audit_config.model_copy(update={"node_name": self.node})
        self.node_dir.mkdir(parents=True, exist_ok=True)
        self.observability = Observability(
            self.config.metrics,
            audit_config,
            self.index.engine,
            audit_journal=self.node_dir / "audit-journal.jsonl",
        )
        self.observability.install()
        self.marker = RunMarker(self.node_dir)
        self.router = Router.compile(self.config.routes, self.config.destinations)
        self.queue = JobQueue(
            self.index.engine,
            self.config.queue,
            write_lock=self.index.write_lock,
            same_pipeline=self.router.same_pipeline(),
        )
        http = self.config.http
        scheme = "https" if http.tls is not None else "http"
        base_url = http.public_url or f"{scheme}://{_display_host(http.host)}:{http.port}"
        webhooks = [n for n, d in self.config.destinations.items() if d.type == "webhook"]
        if webhooks and http.public_url is None and _display_host(http.host) != http.host:
            log.warning(
                "webhook notifications link to %s, reachable from this machine only; set"
                " http.public_url to the address receivers use",
                base_url,
                extra={"event": "config.public_url_missing", "destinations": webhooks},
            )
        senders = {
            name: build_sender(
                name, model, calling_ae=self.config.dimse.ae_title, gateway_base_url=base_url
            )
            for name, model in self.config.destinations.items()
        }
        self.dispatcher = Dispatcher(
            self.queue,
            senders,
            self.store,
            poll_interval=self.config.queue.poll_interval,
            batch_wait=self.config.queue.batch_wait,
            controls=self.config.destinations,
            pipelines=build_pipelines(
                self.config, StepContext(environ=os.environ, base_dir=self.base_dir)
            ),
            audit=self.observability.audit,
            work_dir=self.node_dir / "egress",
            node=self.node,
        )
        if self.clustered:
            self.listener = JobListener(
                self.index.engine.url,
                self.node,
                self.dispatcher.notify,
                timeout=self.config.database.timeout,
            )
            self.listener.start()  # a DicomgateError naming node.name if the name is taken
        self.observability.watch(self.queue, self.dispatcher, self.config.storage.path)
        self.ingestor = Ingestor(
            self.store,
            self.index,
            self.config.storage.duplicates,
            on_durable=self.marker.write,
            router=self.router,
            on_jobs=self.dispatcher.notify,
            audit=self.observability.audit,
        )
        since = self.marker.previous_durable_until()
        if since is not None and self.index.relaxed_commits:
            recover(self.config.storage.path, since, self.ingestor.adopt)
        elif since is not None:
            # Synchronous commits (PostgreSQL): no acknowledged row can be lost, but a file
            # moved into the store whose commit the crash prevented has no row. Look for
            # those later, among files older than this start only: a scan now would race
            # the other nodes' renames into the shared store (recovery.py).
            self._late_recovery(since, time.time())
        self.marker.write(time.time())
        self.dimse = DimseServer(
            self.config.dimse,
            self.ingestor,
            destinations=self.config.destinations,
            query=self.config.query,
        )
        if self.config.ingest.watch is not None:
            self.folder = FolderWatcher(
                self.config.ingest,
                self.ingestor,
                called_ae=self.config.dimse.ae_title,
                storage_path=self.config.storage.path,
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then shut down in order."""
        self.ingestor.start()
        server: uvicorn.Server | None = None
        http_task: asyncio.Task[None] | None = None
        retention_task: asyncio.Task[None] | None = None
        tls_task: asyncio.Task[None] | None = None
        try:
            try:
                await self.dimse.start()
            except OSError as exc:
                raise DicomgateError(
                    f"dimse.port: cannot listen on {self.config.dimse.host}:"
                    f"{self.config.dimse.port}: {exc.strerror or exc}"
                ) from exc
            if self.config.http.enabled:
                server = _EmbeddedServer(self._http_config())
                # Bind here, not in uvicorn: its bind failure is a sys.exit inside our loop.
                try:
                    sock = listen_tcp(self.config.http.host, self.config.http.port)
                except OSError as exc:
                    raise DicomgateError(
                        f"http.port: cannot listen on {self.config.http.host}:"
                        f"{self.config.http.port}: {exc.strerror or exc}"
                    ) from exc
                self.http_port = sock.getsockname()[1]
                http_task = asyncio.create_task(server.serve(sockets=[sock]))
                while not server.started and not http_task.done():
                    await asyncio.sleep(0.01)
                self._warn_http_exposure()
                if self.http_tls is not None and self.http_tls.config.check_interval > 0:
                    tls_task = asyncio.create_task(self.http_tls.watch(stop), name="tls-watch")
            await self.dispatcher.start()
            if self.folder is not None:
                await self.folder.start()  # a DicomgateError naming ingest.* if unusable
            storage = self.config.storage
            if storage.retention is RetentionMode.RELAY:
                retention = Retention(
                    self.index, self.store, storage.keep_for, interval=storage.retention_interval
                )
                retention_task = asyncio.create_task(retention.run(stop), name="retention")
            settle_garbage_collector()
            self.started = True
            log.info("dicomgate %s ready", __version__, extra={"event": "gateway.ready"})
            await stop.wait()
            log.info("stopping", extra={"event": "gateway.stopping"})
        finally:
            self.stopping = True
            if server is not None:
                # Both ports stop taking work at once: uvicorn closes its listener and idle
                # connections now and gives running requests http.shutdown_grace (then
                # cancels them: app._CutAtStop answers 503), beside the DIMSE drain below.
                server.should_exit = True
            if self.folder is not None:
                await self.folder.stop()  # files already handed over are finished
            await self.dimse.stop(self.config.dimse.shutdown_grace)
            await self.dispatcher.stop(grace=10.0)
            if retention_task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(retention_task, 30)
            if tls_task is not None:
                tls_task.cancel()
            if http_task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(http_task, self.config.http.shutdown_grace + 5)
            await asyncio.to_thread(self.ingestor.stop)

    def _http_config(self) -> uvicorn.Config:
        """uvicorn's settings: our app, TLS context, connection guard and proxy trust."""
        http = self.config.http
        try:
            app = create_app(self)
        except ValueError as exc:  # static JWT keys that cannot be read
            raise DicomgateError(f"http.auth.jwt.public_keys: {exc}") from exc
        tls: ServerTls | None = None
        if http.tls is not None:
            tls = ServerTls(http.tls)
            tls.load()  # a DicomgateError naming http.tls if the pair does not load
        self.http_tls = tls
        guard = ConnectionGuard(
            header_timeout=http.limits.header_timeout,
            max_header_bytes=http.limits.max_header_bytes,
            max_connections_per_client=http.limits.max_connections_per_client,
        )
        return uvicorn.Config(
            app,
            host=http.host,
            port=http.port,
            # TLS is the guard's (counted and timed from the accept), not uvicorn's.
            http=guarded_http_protocol(guard, tls=(lambda: tls.context) if tls else None),
            log_config=None,
            access_log=False,
            lifespan="off",
            # uvicorn takes whole seconds in its signature but only hands them to call_later.
            timeout_keep_alive=cast(int, http.limits.keep_alive_timeout),
            timeout_graceful_shutdown=cast(int, http.shutdown_grace),
            # Forwarded headers are the app's (security.forwarded): uvicorn's own would apply
            # X-Forwarded-For/-Proto before the app could tell a trusted proxy's from others'.
            proxy_headers=False,
        )

    def _warn_http_exposure(self) -> None:
        http = self.config.http
        if http.auth is None:
            log.warning(
                "HTTP has no authentication (http.auth is not set): whoever reaches port %d"
                " can read, store and administer",
                self.http_port,
                extra={"event": "http.auth_disabled"},
            )
        elif http.tls is None and http.host not in ("127.0.0.1", "::1", "localhost"):
            log.warning(
                "HTTP authentication without http.tls: keys and tokens cross the network"
                " readable unless a TLS proxy is in front",
                extra={"event": "http.cleartext_credentials"},
            )

    def reload_tls(self) -> None:
        """SIGHUP: load the HTTPS and DICOM TLS certificates again (for new connections)."""
        if self.http_tls is not None:
            self.http_tls.reload("sighup")
        if hasattr(self, "dimse") and self.dimse.tls is not None:
            self.dimse.reload_tls("sighup")
        if self.http_tls is None and not (hasattr(self, "dimse") and self.dimse.tls is not None):
            log.info("SIGHUP: no certificate to reload", extra={"event": "tls.reload_skipped"})

    def close(self, clean: bool) -> None:
        """Close the index; a clean stop removes the run marker (no recovery next start).

        Unless the ingestor still holds files whose commit's outcome is unknown (the index
        did not answer again before the stop): the marker then stays, dated at the oldest
        of them, so that the next start's recovery indexes those without a row.
        """
        unsettled = self.ingestor.unsettled_since if hasattr(self, "ingestor") else None
        if clean and unsettled is not None:
            self.marker.write(unsettled)
            clean = False
        if self.listener is not None:
            self.listener.stop()
        if hasattr(self, "observability"):
            self.observability.uninstall()  # writes the audit events still queued
        self.index.close()
        if clean:
            self.marker.remove()
        self.lock.release()


def run_gateway(config: GatewayConfig, base_dir: Path = Path(".")) -> None:
    """Run until SIGTERM/SIGINT; exit cleanly. Raises :class:`DicomgateError` on start-up."""
    configure_logging(config.logging.level, config.logging.format)
    # Values that break their VR (e.g. IS '1A') must not stop an image from being stored;
    # the bytes are kept exactly as received.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    gateway = Gateway(config, base_dir)
    gateway.open()
    clean = False
    try:
        with contextlib.suppress(ImportError):
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        asyncio.run(_main(gateway))
        clean = True
    except DicomgateError:
        clean = True  # refused to start: nothing was accepted, nothing to recover
        raise
    finally:
        gateway.close(clean)
    log.info("stopped", extra={"event": "gateway.stopped"})


async def _main(gateway: Gateway) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, gateway.reload_tls)
    try:
        await gateway.run(stop)
    except DicomgateError:
        raise
