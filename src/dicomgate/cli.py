"""The ``dicomgate`` command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dicomgate import __version__
from dicomgate.errors import ConfigError

if TYPE_CHECKING:
    from dicomgate.dicomweb.client import StowOptions
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
        run_gateway(cfg, base_dir=config.parent)
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


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _byte_size(option: str, value: str) -> int:
    """``64M``, ``500K``, ``1G`` or a plain number of bytes."""
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (text[:-1], text[-1]) if text[-1:] in "KMG" else (text, "")
    if not number.isdigit() or int(number) < 1:
        raise _fail(f"{option}: expected a size such as 64M, 500K or 1048576, got {value!r}")
    return int(number) * _SIZE_UNITS[unit]


def _key_value(option: str, value: str, what: str) -> tuple[str, str]:
    key, sep, rest = value.partition(":")
    if not sep or not key.strip():
        raise _fail(f"{option}: expected {what}, got {value!r}")
    return key.strip(), rest.strip() if option == "--header" else rest


_DICOMWEB_ONLY = (
    "--batch",
    "--batch-bytes",
    "--token",
    "--token-file",
    "--user",
    "--header",
    "--insecure",
    "--ca-bundle",
    "--retries",
    "--retry-wait",
    "--concurrency",
)


def _stow_options(
    url: str,
    *,
    timeout: float,
    batch: int | None,
    batch_bytes: str | None,
    token: str | None,
    token_file: Path | None,
    user: str | None,
    header: list[str],
    insecure: bool,
    ca_bundle: Path | None,
    retries: int | None,
    retry_wait: float | None,
    concurrency: int | None,
) -> StowOptions:
    """The checked :class:`~dicomgate.dicomweb.client.StowOptions` of a dicomweb send."""
    import ssl

    from pydantic import ValidationError

    from dicomgate.dicomweb.client import StowOptions
    from dicomgate.egress.models import DicomwebDestination

    if not url.startswith(("http://", "https://")):
        raise _fail(f"--to: expected an http:// or https:// URL with --via dicomweb, got {url!r}")
    if sum(x is not None for x in (token, token_file, user)) > 1:
        raise _fail("--token, --token-file and --user: give only one")
    auth: dict[str, Any] | None = None
    if token is not None:
        if not token.strip():
            raise _fail("--token: empty token")
        auth = {"bearer": token}
    elif token_file is not None:
        if not token_file.is_file():
            raise _fail(f"--token-file: {token_file}: no such file")
        auth = {"bearer_file": str(token_file)}
    elif user is not None:
        name, password = _key_value("--user", user, "USER:PASSWORD")
        auth = {"basic": {"username": name, "password": password}}
    headers = dict(_key_value("--header", h, "NAME:VALUE") for h in header)
    verify: bool | str = True
    if ca_bundle is not None:
        if insecure:
            raise _fail("--ca-bundle and --insecure: give only one")
        try:
            ssl.create_default_context(cafile=str(ca_bundle))
        except (OSError, ssl.SSLError) as exc:
            raise _fail(f"--ca-bundle: {ca_bundle}: not a readable PEM CA bundle ({exc})") from None
        verify = str(ca_bundle)
    elif insecure:
        verify = False
    for option, value, low in (
        ("--batch", batch, 1),
        ("--retries", retries, 0),
        ("--concurrency", concurrency, 1),
    ):
        if value is not None and value < low:
            raise _fail(f"{option}: must be at least {low}, got {value}")
    if retry_wait is not None and not retry_wait > 0:
        raise _fail(f"--retry-wait: must be more than 0 seconds, got {retry_wait:g}")
    settings: dict[str, Any] = {
        "type": "dicomweb",
        "url": url,
        "auth": auth,
        "headers": headers,
        "verify": verify,
        "timeout": timeout,
    }
    if batch is not None:
        settings["batch_max_instances"] = batch
    if batch_bytes is not None:
        settings["batch_max_bytes"] = _byte_size("--batch-bytes", batch_bytes)
    if concurrency is not None:
        settings["concurrency"] = concurrency
    try:
        destination = DicomwebDestination.model_validate(settings)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "url"
        option = {"batch_max_bytes": "--batch-bytes", "url": "--to"}.get(field, "--" + field)
        raise _fail(f"{option}: {error['msg']}") from None
    return StowOptions(
        destination,
        retries=3 if retries is None else retries,
        retry_wait=1.0 if retry_wait is None else retry_wait,
    )


@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (recursive)")],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="HOST:PORT of a DIMSE receiver, or the base URL of a DICOMweb service"
            " (the part before /studies, e.g. https://pacs/dicom-web)",
        ),
    ],
    via: Annotated[
        str | None,
        typer.Option(
            help="dimse (C-STORE) or dicomweb (STOW-RS); default: dicomweb when --to is an"
            " http(s) URL, else dimse"
        ),
    ] = None,
    aet: Annotated[
        str | None, typer.Option("--aet", help="dimse: our (calling) AE title [DICOMGATE]")
    ] = None,
    aec: Annotated[
        str | None, typer.Option("--aec", help="dimse: the receiver's AE title [ANY-SCP]")
    ] = None,
    timeout: Annotated[float, typer.Option(help="network timeout, seconds")] = 60.0,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    batch: Annotated[
        int | None, typer.Option(help="dicomweb: most instances per request [50]")
    ] = None,
    batch_bytes: Annotated[
        str | None, typer.Option(help="dicomweb: most bytes per request, e.g. 16M [64M]")
    ] = None,
    token: Annotated[
        str | None, typer.Option(help="dicomweb: bearer token (Authorization: Bearer ...)")
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(help="dicomweb: file holding the bearer token, read again when it changes"),
    ] = None,
    user: Annotated[
        str | None, typer.Option(help="dicomweb: USER:PASSWORD for HTTP basic authentication")
    ] = None,
    header: Annotated[
        list[str] | None,
        typer.Option(help="dicomweb: extra HTTP header NAME:VALUE (repeatable)"),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="dicomweb: do not verify the TLS certificate")
    ] = False,
    ca_bundle: Annotated[
        Path | None, typer.Option(help="dicomweb: CA bundle (PEM) to verify the server with")
    ] = None,
    retries: Annotated[
        int | None,
        typer.Option(help="dicomweb: retries of a failure that may pass (5xx, timeout...) [3]"),
    ] = None,
    retry_wait: Annotated[
        float | None,
        typer.Option(help="dicomweb: seconds before the first retry, doubled each time [1]"),
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="dicomweb: requests in flight at once [2]")
    ] = None,
) -> None:
    """Send files and folders with C-STORE or STOW-RS; prints a summary, exit 1 if any failed.

    Non-DICOM files are skipped and counted. With --via dicomweb, instances go in batched
    multipart requests, each instance's result is read from the response, and failures
    that may pass (5xx, timeouts, out of resources) are retried.
    """
    import logging

    if not timeout > 0:
        raise _fail(f"--timeout: must be more than 0 seconds, got {timeout:g}")
    if via is None:
        via = "dicomweb" if to.startswith(("http://", "https://")) else "dimse"
    if via not in ("dimse", "dicomweb"):
        raise _fail(f"--via: expected dimse or dicomweb, got {via!r}")
    header = header or []
    if via == "dimse":
        given = (
            batch,
            batch_bytes,
            token,
            token_file,
            user,
            header or None,
            insecure or None,
            ca_bundle,
            retries,
            retry_wait,
            concurrency,
        )
        for option, value in zip(_DICOMWEB_ONLY, given, strict=True):
            if value is not None:
                raise _fail(f"{option}: only with --via dicomweb")
        host, port = _host_port(to)
    else:
        for option, value in (("--aet", aet), ("--aec", aec)):
            if value is not None:
                raise _fail(f"{option}: only with --via dimse")
        options = _stow_options(
            to,
            timeout=timeout,
            batch=batch,
            batch_bytes=batch_bytes,
            token=token,
            token_file=token_file,
            user=user,
            header=header,
            insecure=insecure,
            ca_bundle=ca_bundle,
            retries=retries,
            retry_wait=retry_wait,
            concurrency=concurrency,
        )
    for path in paths:
        if not path.exists():
            raise _fail(f"{path}: no such file or folder")
    if via == "dimse":
        from dicomgate.dimse.scu import send_paths

        summary = send_paths(
            paths,
            host,
            port,
            calling_ae=aet or "DICOMGATE",
            called_ae=aec or "ANY-SCP",
            timeout=timeout,
            progress=progress,
        )
    else:
        from dicomgate.dicomweb.client import upload_paths

        # The client's own warnings are summed up in the summary; without a handler the
        # logging module would print each one to stderr as well.
        logging.getLogger("dicomgate").addHandler(logging.NullHandler())
        summary = upload_paths(paths, options, progress=progress)
    typer.echo(summary.describe())
    if summary.failed:
        raise typer.Exit(1)


_QR_LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
# Columns shown by `find` at each level, beside the keys given with -k.
_FIND_COLUMNS = {
    "PATIENT": ["PatientName", "PatientID", "PatientBirthDate", "PatientSex"],
    "STUDY": [
        "PatientName",
        "PatientID",
        "StudyDate",
        "AccessionNumber",
        "ModalitiesInStudy",
        "StudyDescription",
        "NumberOfStudyRelatedInstances",
        "StudyInstanceUID",
    ],
    "SERIES": [
        "SeriesNumber",
        "Modality",
        "SeriesDescription",
        "NumberOfSeriesRelatedInstances",
        "SeriesInstanceUID",
    ],
    "IMAGE": ["InstanceNumber", "SOPClassUID", "SOPInstanceUID"],
}


def _qr_identifier(level: str, keys: list[str], model: str, columns: list[str]) -> Any:
    """The C-FIND/C-MOVE identifier from ``-k KEY=VALUE`` options (checked)."""
    import warnings

    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataset import Dataset

    if level.upper() not in _QR_LEVELS:
        raise _fail(f"--level: expected one of {', '.join(_QR_LEVELS)}, got {level!r}")
    if model not in ("study", "patient"):
        raise _fail(f"--model: expected study or patient, got {model!r}")
    if model == "study" and level.upper() == "PATIENT":
        raise _fail("--level PATIENT needs --model patient (the study root has no patient level)")
    ds = Dataset()
    ds.QueryRetrieveLevel = level.upper()
    for name in columns:
        tag = tag_for_keyword(name)
        assert tag is not None, name
        ds.add_new(tag, dictionary_VR(tag), None)
    for key in keys:
        name, sep, value = key.partition("=")
        tag = tag_for_keyword(name.strip())
        if tag is None:
            raise _fail(f"-k: {name.strip()!r} is not a DICOM keyword (e.g. PatientName=DOE*)")
        vr = dictionary_VR(tag)
        if vr == "SQ":
            raise _fail(f"-k: {name.strip()} is a sequence; not supported here")
        with warnings.catch_warnings():  # a range such as 2023-2024 is no valid DA value
            warnings.simplefilter("ignore")
            ds.add_new(tag, vr, value if sep and value else None)
    return ds


def _show(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


@app.command()
def find(
    host: Annotated[str, typer.Argument(help="peer host")],
    port: Annotated[int, typer.Argument(help="peer port", min=1, max=65535)],
    key: Annotated[
        list[str] | None,
        typer.Option(
            "--key",
            "-k",
            help="KEY=VALUE to match (wildcards * ?, ranges 2023-2024), or KEY to return it;"
            " repeatable",
        ),
    ] = None,
    level: Annotated[str, typer.Option(help="PATIENT, STUDY, SERIES or IMAGE")] = "STUDY",
    model: Annotated[str, typer.Option(help="study (Study Root) or patient (Patient Root)")] = (
        "study"
    ),
    aet: Annotated[str, typer.Option("--aet", help="our (calling) AE title")] = "DICOMGATE",
    aec: Annotated[str, typer.Option("--aec", help="the peer's (called) AE title")] = "ANY-SCP",
    timeout: Annotated[float, typer.Option(help="seconds")] = 30.0,
) -> None:
    """Query a peer with C-FIND and print the matches as a table; exit 1 on failure."""
    from rich.console import Console
    from rich.table import Table

    from dicomgate.dimse.scu import QueryFailed, find_peer, status_text

    keys = key or []
    named = [k.partition("=")[0].strip() for k in keys]
    columns = (
        [c for c in _FIND_COLUMNS[level.upper()] if c not in named]
        if (level.upper() in _FIND_COLUMNS)
        else []
    )
    identifier = _qr_identifier(level, keys, model, columns)
    try:
        result = find_peer(
            host, port, identifier, calling_ae=aet, called_ae=aec, model=model, timeout=timeout
        )
    except QueryFailed as exc:
        raise _fail(f"find {host}:{port} failed: {exc}", 1) from None
    shown = named + columns
    table = Table(*shown, title=f"{len(result.matches)} {level.lower()} matches")
    for match in result.matches:
        table.add_row(*(_show(match.get(name)) for name in shown))
    console = Console()
    if result.matches:
        console.print(table)
    summary = f"{len(result.matches)} matches in {result.elapsed * 1000:.0f} ms"
    if result.status != 0x0000:
        comment = f" ({result.comment})" if result.comment else ""
        raise _fail(f"find failed: {status_text(result.status)}{comment}; {summary}", 1)
    typer.echo(summary)


@app.command()
def move(
    host: Annotated[str, typer.Argument(help="peer host")],
    port: Annotated[int, typer.Argument(help="peer port", min=1, max=65535)],
    dest: Annotated[str, typer.Option("--dest", help="AE title the peer sends the instances to")],
    key: Annotated[
        list[str] | None,
        typer.Option(
            "--key",
            "-k",
            help="unique key KEY=UID of what to move, e.g. StudyInstanceUID=1.2.3; repeatable",
        ),
    ] = None,
    level: Annotated[str, typer.Option(help="PATIENT, STUDY, SERIES or IMAGE")] = "STUDY",
    model: Annotated[str, typer.Option(help="study (Study Root) or patient (Patient Root)")] = (
        "study"
    ),
    aet: Annotated[str, typer.Option("--aet", help="our (calling) AE title")] = "DICOMGATE",
    aec: Annotated[str, typer.Option("--aec", help="the peer's (called) AE title")] = "ANY-SCP",
    timeout: Annotated[float, typer.Option(help="seconds to wait for each response")] = 600.0,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Ask a peer to send instances to an AE with C-MOVE; prints a summary, exit 1 unless
    every sub-operation succeeded."""
    import sys

    from dicomgate.dimse.scu import QueryFailed, move_peer, status_text

    if not key:
        raise _fail("-k: give what to move, e.g. -k StudyInstanceUID=1.2.3")
    identifier = _qr_identifier(level, key, model, [])
    show = progress and sys.stderr.isatty()

    def run(on_pending: Any) -> Any:
        return move_peer(
            host,
            port,
            identifier,
            destination=dest,
            calling_ae=aet,
            called_ae=aec,
            model=model,
            timeout=timeout,
            on_pending=on_pending,
        )

    try:
        if show:
            from rich.console import Console
            from rich.progress import Progress

            with Progress(console=Console(stderr=True), transient=True) as bar:
                task = bar.add_task(f"moving to {dest}", total=None)

                def on_pending(remaining: int, completed: int, failed: int, warning: int) -> None:
                    done = completed + failed + warning
                    bar.update(task, completed=done, total=done + remaining)

                result = run(on_pending)
        else:
            result = run(lambda *_: None)
    except QueryFailed as exc:
        raise _fail(f"move {host}:{port} failed: {exc}", 1) from None
    moved = result.completed + result.warning
    rate = moved / result.elapsed if result.elapsed > 0 else 0.0
    lines = [
        f"moved {moved} to {dest} (warnings {result.warning}), failed {result.failed} in"
        f" {result.elapsed:.1f} s ({rate:.1f} inst/s): {status_text(result.status)}"
        + (f" ({result.comment})" if result.comment else "")
    ]
    lines += [f"  failed: {uid}" for uid in result.failed_uids[:20]]
    if len(result.failed_uids) > 20:
        lines.append(f"  ... and {len(result.failed_uids) - 20} more")
    typer.echo("\n".join(lines))
    if result.status != 0x0000:
        raise typer.Exit(1)


queue_app = typer.Typer(help="Inspect and re-drive the delivery queue.", no_args_is_help=True)
app.add_typer(queue_app, name="queue")

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="YAML config file")]


@app.command()
def process(
    inputs: Annotated[list[Path], typer.Argument(help="DICOM files or folders (recursive)")],
    pipeline: Annotated[
        Path,
        typer.Option(
            "--pipeline",
            help="YAML file with the steps, the same list as a route's `pipeline:`",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder the results are written into")],
    progress: Annotated[bool, typer.Option(help="Show a progress bar on a terminal")] = True,
) -> None:
    """Run a processing pipeline (deidentify, standardize, transcode, split) over files."""
    from dicomgate.processing.batch import run_batch

    for path in inputs:
        if not path.exists():
            raise _fail(f"{path}: no such file or folder")
    try:
        code = run_batch(pipeline, inputs, out, progress)
    except ConfigError as exc:
        raise _fail(f"{pipeline}: {exc}") from None
    raise typer.Exit(code)


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


keys_app = typer.Typer(help="API keys for the HTTP interface.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("new")
def keys_new(
    name: Annotated[str, typer.Option(help="who will hold the key (shown in the log)")] = "client",
    scopes: Annotated[
        str, typer.Option(help="comma-separated permissions: read, write, admin")
    ] = "read",
) -> None:
    """Print a new API key (first line) and its config entry for http.auth.api_keys."""
    from dicomgate.security.http_auth import hash_api_key, new_api_key
    from dicomgate.security.http_models import Permission

    wanted = [s.strip() for s in scopes.split(",") if s.strip()]
    known = [p.value for p in Permission]
    for scope in wanted:
        if scope not in known:
            raise _fail(f"--scopes: {scope!r} is not one of {', '.join(known)}")
    if not name.strip() or any(c in name for c in "\"'{}[],:#\n"):
        raise _fail("--name: use letters, digits, spaces, '-', '_' or '.'")
    key = new_api_key()
    typer.echo(key)
    typer.echo(
        "# Give the key above to the client; it is shown only once and not stored anywhere.\n"
        "# Add this entry to http.auth.api_keys in the config file:\n"
        f'- {{name: {name.strip()}, sha256: "{hash_api_key(key)}", scopes: [{", ".join(wanted)}]}}'
    )


def main() -> None:
    """Console-script entry point. Bad usage exits 2 (click's convention, kept)."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
