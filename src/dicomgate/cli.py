"""The ``dicomgate`` command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dicomgate import __version__
from dicomgate.errors import ConfigError

if TYPE_CHECKING:
    from dicomgate.queue.jobs import JobQueue as JobQueueT

app = typer.Typer(
    name="dicomgate",
    help="A DICOM gateway: DIMSE and DICOMweb ingest, durable store, routing.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_USAGE = 2


def _fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    typer.echo(f"dicomgate: {message}", err=True)
    return typer.Exit(code)


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _fail(f"--to: expected HOST:PORT, got {value!r}")
    return host, int(port)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(f"dicomgate {__version__}")


@app.command("check-config")
def check_config(config: Annotated[Path, typer.Argument(help="YAML config file")]) -> None:
    """Validate a config file; exit 2 with the offending key if it is wrong."""
    from dicomgate.config import load_config

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise _fail(f"config error: {exc}") from None
    typer.echo(
        f"{config}: ok (AE {cfg.dimse.ae_title} on port {cfg.dimse.port}, "
        f"{len(cfg.destinations)} destinations, {len(cfg.routes)} routes)"
    )


@app.command()
def serve(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML config file")],
) -> None:
    """Run the gateway until SIGTERM or SIGINT."""
    from dicomgate.config import load_config
    from dicomgate.errors import DicomgateError
    from dicomgate.service import run_gateway

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise _fail(f"config error: {exc}") from None
    try:
        run_gateway(cfg)
    except DicomgateError as exc:
        raise _fail(f"cannot start: {exc}", 1) from None


@app.command()
def echo(
    host: Annotated[str, typer.Argument(help="peer host")],
    port: Annotated[int, typer.Argument(help="peer port", min=1, max=65535)],
    aet: Annotated[str, typer.Option("--aet", help="our (calling) AE title")] = "DICOMGATE",
    aec: Annotated[str, typer.Option("--aec", help="the peer's (called) AE title")] = "ANY-SCP",
    timeout: Annotated[float, typer.Option(help="seconds")] = 30.0,
) -> None:
    """Send a C-ECHO (verification) to a peer."""
    from dicomgate.dimse.scu import EchoFailed, echo_peer

    try:
        elapsed = echo_peer(host, port, calling_ae=aet, called_ae=aec, timeout=timeout)
    except EchoFailed as exc:
        raise _fail(f"echo {host}:{port} failed: {exc}", 1) from None
    typer.echo(f"echo {aec}@{host}:{port}: success in {elapsed * 1000:.1f} ms")


@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (recursive)")],
    to: Annotated[str, typer.Option("--to", help="HOST:PORT of the receiver")],
    aet: Annotated[str, typer.Option("--aet", help="our (calling) AE title")] = "DICOMGATE",
    aec: Annotated[str, typer.Option("--aec", help="the receiver's AE title")] = "ANY-SCP",
    timeout: Annotated[float, typer.Option(help="network timeout, seconds")] = 60.0,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """C-STORE files and folders to a receiver; prints a summary, exit 1 if any failed."""
    from dicomgate.dimse.scu import send_paths

    host, port = _host_port(to)
    for path in paths:
        if not path.exists():
            raise _fail(f"{path}: no such file or folder")
    summary = send_paths(
        paths, host, port, calling_ae=aet, called_ae=aec, timeout=timeout, progress=progress
    )
    typer.echo(summary.describe())
    if summary.failed:
        raise typer.Exit(1)


queue_app = typer.Typer(help="Inspect and re-drive the delivery queue.", no_args_is_help=True)
app.add_typer(queue_app, name="queue")

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="YAML config file")]


def _open_queue(config: Path) -> JobQueueT:
    from dicomgate.config import load_config
    from dicomgate.errors import DicomgateError
    from dicomgate.index.db import Index
    from dicomgate.queue.jobs import JobQueue

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise _fail(f"config error: {exc}") from None
    try:
        index = Index.open(cfg.database.url)
    except DicomgateError as exc:
        raise _fail(f"cannot open the index: {exc}", 1) from None
    return JobQueue(index.engine, cfg.queue)


def _print_jobs(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "destination", "route", "state", "attempts", "not before", "last error")
    for row in rows:
        table.add_row(
            str(row.get("id")),
            str(row.get("destination")),
            str(row.get("route")),
            str(row.get("state")),
            str(row.get("attempts")),
            str(row.get("not_before") or ""),
            str(row.get("last_error") or "")[:60],
        )
    Console().print(table)


@queue_app.command("list")
def queue_list(
    config: ConfigOption,
    state: Annotated[str | None, typer.Option(help="pending | leased | done | dead")] = None,
    destination: Annotated[str | None, typer.Option(help="destination name")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 50,
) -> None:
    """Counts per destination and state, then the newest jobs matching the filters."""
    queue = _open_queue(config)
    counts = queue.counts()
    for (dest, st), n in sorted(counts.items()):
        typer.echo(f"{dest:<20} {st:<8} {n}")
    _print_jobs(queue.list(state=state, destination=destination, limit=limit))


@queue_app.command("show")
def queue_show(config: ConfigOption, job_id: Annotated[int, typer.Argument()]) -> None:
    """One job with every field (JSON)."""
    import json

    row = _open_queue(config).get(job_id)
    if row is None:
        raise _fail(f"no job {job_id}", 1)
    typer.echo(json.dumps(row, indent=2, default=str))


@queue_app.command("retry")
def queue_retry(config: ConfigOption, job_id: Annotated[int, typer.Argument()]) -> None:
    """Re-drive one job now (dead-lettered or waiting), its attempts reset."""
    if not _open_queue(config).retry(job_id):
        raise _fail(f"job {job_id} cannot be retried (unknown, leased or done)", 1)
    typer.echo(f"job {job_id} queued again")


@queue_app.command("retry-dead")
def queue_retry_dead(
    config: ConfigOption,
    destination: Annotated[str | None, typer.Option(help="only this destination")] = None,
) -> None:
    """Re-drive every dead-lettered job (of one destination)."""
    n = _open_queue(config).retry_dead(destination)
    typer.echo(f"{n} dead-lettered jobs queued again")


@queue_app.command("purge")
def queue_purge(
    config: ConfigOption,
    state: Annotated[str, typer.Option(help="done | dead")] = "done",
    destination: Annotated[str | None, typer.Option(help="only this destination")] = None,
) -> None:
    """Delete finished (done) or dead-lettered jobs."""
    if state not in ("done", "dead"):
        raise _fail("--state: only done or dead jobs can be purged")
    n = _open_queue(config).purge(state=state, destination=destination)
    typer.echo(f"{n} {state} jobs deleted")


def main() -> None:
    """Console-script entry point. Bad usage exits 2 (click's convention, kept)."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
