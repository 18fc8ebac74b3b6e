"""The ``dicomgate`` command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from dicomgate import __version__
from dicomgate.errors import ConfigError

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


def main() -> None:
    """Console-script entry point. Bad usage exits 2 (click's convention, kept)."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
