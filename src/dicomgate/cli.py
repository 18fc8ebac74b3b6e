"""The ``dicomgate`` command."""

from __future__ import annotations

import logging
import os
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


def _check_ae_options(**options: str | None) -> None:
    """Exit 2 naming the option of a bad AE title (``aet="X"`` checks ``--aet``)."""
    from dicomgate.dimse.scu import ae_title_problem

    for name, value in options.items():
        problem = None if value is None else ae_title_problem(value)
        if problem is not None:
            raise _fail(f"--{name}: {value!r} is not a valid AE title: {problem}")


def _sqlite_file(url: str) -> Path | None:
    """The absolute path of a SQLite ``database.url``'s file; None for another database,
    an in-memory one or a URL that does not parse (opening it reports that)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:"):
        return None
    # As `serve` opens it: a relative path is taken from the working directory.
    return Path(database).expanduser().absolute()


def _require_index_file(url: str) -> None:
    """Refuse a SQLite index file that does not exist: a read or operate command run from
    another folder (a relative path) must not create and show an empty index."""
    path = _sqlite_file(url)
    if path is not None and not path.exists():
        raise _fail(
            f"no index database at {path} (database.url; relative paths are taken from the"
            " working directory)",
            1,
        )


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(f"dicomgate {__version__}")


@app.command("check-config")
def check_config(config: Annotated[Path, typer.Argument(help="YAML config file")]) -> None:
    """Validate a config file; exit 2 with the offending key if it is wrong."""
    from dicomgate.config import load_config
    from dicomgate.errors import DicomgateError
    from dicomgate.security.tls import check_peer_tls_files, check_tls_files

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise _fail(f"config error: {exc}") from None
    try:  # the certificates, keys and CA files, loaded as serve loads them
        check_tls_files(cfg.http.tls if cfg.http.enabled else None, cfg.dimse.tls)
        check_peer_tls_files(cfg)
    except DicomgateError as exc:
        raise _fail(f"config error: {exc}") from None
    typer.echo(
        f"{config}: ok (AE {cfg.dimse.ae_title} on port {cfg.dimse.port}, "
        f"{len(cfg.destinations)} destinations, {len(cfg.routes)} routes)"
    )
    from dicomgate.egress.models import destination_warnings

    for warning in destination_warnings(cfg.destinations):  # valid, but likely unintended
        typer.echo(f"warning: {warning}", err=True)


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
    # Stopped cleanly: every file, row and audit event is written and the index closed.
    # Skip the interpreter's teardown of its ~1,500 modules (0.5 s here), so a restart or a
    # rolling upgrade waits for nothing but the gateway's own shutdown.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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

    _check_ae_options(aet=aet, aec=aec)
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
    import warnings

    # pydicom warns of every odd value it reads (a UID with a letter, a date that is no
    # date): each file is sent as it is and the peer decides, so a folder of old files
    # printed a Python warning per file and value on stderr around the summary.
    warnings.filterwarnings("ignore", message="Invalid value for VR", category=UserWarning)
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
        _check_ae_options(aet=aet, aec=aec)
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
        with warnings.catch_warnings():  # a range such as 20230101-20241231 is no DA value
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
            help="KEY=VALUE to match (wildcards * ?; date ranges YYYYMMDD-YYYYMMDD, e.g."
            " StudyDate=20230101-20241231), or KEY to return it; repeatable",
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
    _check_ae_options(aet=aet, aec=aec)
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
    _check_ae_options(aet=aet, aec=aec, dest=dest)
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
    inputs: Annotated[
        list[Path],
        typer.Argument(help="DICOM files or folders (recursive); then OUT unless --out is given"),
    ],
    pipeline: Annotated[
        Path,
        typer.Option(
            "--pipeline",
            help="YAML file with the steps, the same list as a route's `pipeline:`",
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Folder the results are written into (or the last argument)"),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on a terminal")] = True,
) -> None:
    """Run a processing pipeline (deidentify, standardize, transcode, split) over files:
    `dicomgate process --pipeline FILE IN... OUT` (or `--out OUT`)."""
    from dicomgate.processing.batch import OutputUnusable, run_batch

    if out is None:
        if len(inputs) < 2:
            raise _fail("give the output folder: process --pipeline FILE IN... OUT")
        *inputs, out = inputs
    for path in inputs:
        if not path.exists():
            raise _fail(f"{path}: no such file or folder")
    try:
        code = run_batch(pipeline, inputs, out, progress)
    except ConfigError as exc:
        raise _fail(f"{pipeline}: {exc}") from None
    except OutputUnusable as exc:
        raise _fail(str(exc)) from None
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
    _require_index_file(cfg.database.url)
    try:
        index = Index.open(cfg.database.url, timeout=cfg.database.timeout)
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
    """Counts per destination and state, then the oldest jobs matching the filters (by id)."""
    from dicomgate.queue.jobs import JobState

    states = [s.value for s in JobState]
    if state is not None and state not in states:
        raise _fail(f"--state: expected one of {', '.join(states)}, got {state!r}")
    queue = _open_queue(config)
    counts = queue.counts()
    for (dest, st), n in sorted(counts.items()):
        typer.echo(f"{dest:<20} {st:<8} {n}")
    _print_jobs(queue.list(state=state, destination=destination, limit=limit))


@queue_app.command("show")
def queue_show(config: ConfigOption, job_id: Annotated[int, typer.Argument()]) -> None:
    """One job with every field and its history of attempts (JSON)."""
    import json

    queue = _open_queue(config)
    row = queue.get(job_id)
    if row is None:
        raise _fail(f"no job {job_id}", 1)
    row["history"] = queue.history(job_id)
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
    queue = _open_queue(config)
    n = queue.retry_dead(destination)
    if n == 0 and destination is not None:
        # A name neither configured nor named by any job is a typo, not "0 jobs" (as
        # POST /api/queue/retry-dead answers 404); a destination removed from the config
        # whose jobs remain is known.
        from dicomgate.config import load_config

        if destination not in load_config(config).destinations and not any(
            name == destination for name, _ in queue.counts()
        ):
            raise _fail(f"no destination {destination!r}", 1)
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


def _gateway_url(config: Path | None, url: str | None) -> str:
    """The running gateway's HTTP base URL: ``--url``, else ``http.host``/``port`` of the
    config (a wildcard listen address is reached on 127.0.0.1)."""
    if url:
        return url.rstrip("/")
    if config is None:
        raise _fail("give --url, or --config to take it from http.host and http.port")
    from dicomgate.config import load_config

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise _fail(f"config error: {exc}") from None
    host = cfg.http.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if cfg.http.tls is not None else "http"
    return f"{scheme}://{host}:{cfg.http.port}"


def _pause_or_resume(
    action: str, destination: str, config: Path | None, url: str | None, token: str | None
) -> None:
    import httpx

    base = _gateway_url(config, url)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        rsp = httpx.post(
            f"{base}/api/destinations/{destination}/{action}", headers=headers, timeout=10.0
        )
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach the gateway at {base}: {exc}", 1) from None
    if rsp.status_code != 200:
        try:
            message = str(rsp.json().get("error", rsp.text))
        except ValueError:
            message = rsp.text[:200]
        raise _fail(f"HTTP {rsp.status_code}: {message}", 1)
    typer.echo(f"destination {destination} {action}d")


UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url", help="The running gateway's HTTP URL; default: http.host/port of --config"
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token", envvar="DICOMGATE_TOKEN", help="API key or token with the admin permission"
    ),
]
OptionalConfig = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")]


@queue_app.command("pause")
def queue_pause(
    destination: Annotated[str, typer.Argument(help="destination name")],
    config: OptionalConfig = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Pause a destination in the running gateway: its jobs wait, no attempt is spent.

    The pause lasts until `queue resume` or a restart of the gateway."""
    _pause_or_resume("pause", destination, config, url, token)


@queue_app.command("resume")
def queue_resume(
    destination: Annotated[str, typer.Argument(help="destination name")],
    config: OptionalConfig = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Resume a paused destination in the running gateway."""
    _pause_or_resume("resume", destination, config, url, token)


route_app = typer.Typer(help="Check routes against files.", no_args_is_help=True)
app.add_typer(route_app, name="route")


@route_app.command("test")
def route_test(
    file: Annotated[Path, typer.Argument(help="a DICOM file")],
    config: ConfigOption,
    calling_ae: Annotated[str, typer.Option(help="as if sent by this AE title")] = "",
    called_ae: Annotated[str, typer.Option(help="as if sent to this AE title")] = "",
    source_ip: Annotated[str, typer.Option(help="as if sent from this address")] = "",
    via: Annotated[str, typer.Option(help="dimse | stow | folder | recovery")] = "dimse",
) -> None:
    """Dry-run: which routes match FILE and why the others do not, and what each matching
    route's pipeline changes in the header (nothing is stored or sent)."""
    import os

    import pydicom
    from pydicom.errors import InvalidDicomError
    from rich.console import Console
    from rich.table import Table

    from dicomgate.config import build_pipelines, load_config
    from dicomgate.processing.base import StepContext
    from dicomgate.routing.explain import explain, header_diff, run_pipeline
    from dicomgate.routing.matcher import RECEIVED_VIA, MatchContext

    if via not in RECEIVED_VIA:
        raise _fail(f"--via: use one of {', '.join(RECEIVED_VIA)}")
    if source_ip:
        import ipaddress

        try:
            ipaddress.ip_address(source_ip)
        except ValueError:
            raise _fail(f"--source-ip: {source_ip!r} is not an IP address") from None
    if not file.exists():  # as send and process: a usage error
        raise _fail(f"{file}: no such file")
    try:
        cfg = load_config(config)
        pipelines = build_pipelines(cfg, StepContext(environ=os.environ, base_dir=config.parent))
    except ConfigError as exc:
        raise _fail(f"config error: {exc}") from None
    try:
        ds = pydicom.dcmread(file)
    except FileNotFoundError:
        raise _fail(f"{file}: no such file", 1) from None
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise _fail(f"{file}: not a DICOM file ({exc})", 1) from None
    ctx = MatchContext(calling_ae, called_ae, source_ip, via)
    console = Console()
    table = Table("route", "verdict", "to", "why", title=f"Routes for {file.name}")
    explanations = explain(cfg.routes, ds, ctx)
    for x in explanations:
        lines = [x.reason] + [
            f"{'ok ' if c.ok else 'NO '} {c.key}: wants {c.condition}, has {c.actual or '(empty)'}"
            for c in x.checks
        ]
        table.add_row(x.route, x.verdict, ", ".join(x.destinations), "\n".join(lines))
    console.print(table)
    if not cfg.routes:
        typer.echo("no routes configured: nothing would be forwarded")
    for x in explanations:
        if x.verdict != "matched" or not x.has_pipeline:
            continue
        result = run_pipeline(x.route, pipelines.get(x.route), ds)
        if result.error:
            typer.echo(f"pipeline of {x.route}: failed: {result.error}")
            continue
        for n, output in enumerate(result.outputs, 1):
            diff = Table(
                "tag",
                "keyword",
                "input",
                "output",
                "change",
                title=f"Pipeline of {x.route}: output {n} of {len(result.outputs)}",
            )
            for row in header_diff(ds, output):
                diff.add_row(row.tag, row.keyword, row.before, row.after, row.change)
            console.print(diff)


@app.command()
def status(
    config: OptionalConfig = None,
    url: Annotated[
        str | None, typer.Option(help="the gateway's base URL (default: from the config)")
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="DICOMGATE_API_KEY", help="API key with read permission"),
    ] = None,
) -> None:
    """The overview of a running gateway (its console's Overview page) as tables."""
    import httpx
    import yaml
    from pydantic import ValidationError
    from rich.console import Console
    from rich.table import Table

    from dicomgate.config import HttpConfig

    if url is None:
        if config is None:
            raise _fail("give --url, or --config to take it from http.host and http.port")
        # Only `http:` is read: the gateway's secrets need not be in this shell's environment.
        try:
            raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
            http = HttpConfig.model_validate(raw.get("http") or {})
        except (OSError, yaml.YAMLError, ValidationError, AttributeError) as exc:
            raise _fail(f"config error: {config}: http: {exc}") from None
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(http.host, http.host)
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if http.tls is not None else "http"
        url = f"{scheme}://{host}:{http.port}"
    headers = {"x-api-key": api_key} if api_key else {}
    try:
        response = httpx.get(url.rstrip("/") + "/ui/api/overview", headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach the gateway at {url}: {exc}", 1) from None
    if response.status_code in (401, 403):
        raise _fail(f"{url}: {response.status_code}: give an API key (--api-key)", 1)
    if response.status_code != 200:
        raise _fail(f"{url}: HTTP {response.status_code}: {response.text[:200]}", 1)
    view = response.json()
    disk = view["disk"]
    index = view.get("index", "ok")

    def known(value: object) -> str:
        return "?" if value is None else str(value)

    console = Console()
    console.print(
        f"dicomgate at {url}: {view['associations']} associations now, "
        f"{known(disk['instances'])} instances stored ({known(disk['store_bytes'])} bytes), "
        f"disk {disk['disk_used_percent']}% used"
    )
    if index != "ok":
        console.print(f"[bold red]index database {index}[/]: stores are refused until it is back")
    received = Table("source AE", "via", "instances", "bytes", title="Received in the last hour")
    for r in view["received_last_hour"] or []:
        received.add_row(r["source_ae"], r["via"], str(r["instances"]), str(r["bytes"]))
    console.print(received)
    dests = Table(
        "destination",
        "queued",
        "dead",
        "oldest job",
        "last success",
        "last error",
        "breaker",
        title="Destinations",
    )
    for d in view["destinations"]:
        dests.add_row(
            d["destination"],
            "?" if d["pending"] is None else str(d["pending"] + d["leased"]),
            known(d["dead"]),
            d["oldest_job"] or "-",
            d["last_success"] or "-",
            (d["last_error"] or "-")[:60],
            d["breaker"],
        )
    console.print(dests)
    if index != "ok":
        raise typer.Exit(1)


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

    wanted = list(dict.fromkeys(s.strip() for s in scopes.split(",") if s.strip()))
    known = [p.value for p in Permission]
    if not wanted:
        raise _fail(f"--scopes: give at least one of {', '.join(known)}")
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


db_app = typer.Typer(help="The index database schema (upgrades).", no_args_is_help=True)
app.add_typer(db_app, name="db")


def _db_engine(config: Path, *, create: bool = False) -> tuple[Any, str, Path | None]:
    """The engine of ``database.url``, the URL to show, and the SQLite file that
    ``create`` allows to be made (None when it exists or is no SQLite file)."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import ArgumentError

    from dicomgate.config import load_config
    from dicomgate.index.db import normalize_url

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise _fail(f"config error: {exc}") from None
    new_file = _sqlite_file(cfg.database.url)
    if new_file is not None and new_file.exists():
        new_file = None
    elif new_file is not None and not create:
        _require_index_file(cfg.database.url)
    try:
        url = normalize_url(cfg.database.url)
        engine = create_engine(url)
    except ArgumentError as exc:
        raise _fail(f"config error: database.url: {exc}".splitlines()[0]) from None
    return engine, url.render_as_string(hide_password=True), new_file


@db_app.command("current")
def db_current(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML config file")],
) -> None:
    """Print the database's schema revision and the newest one this version knows."""
    from sqlalchemy import exc as sa_exc

    from dicomgate.index.db import current_revision, head_revision

    engine, shown, _ = _db_engine(config)
    try:
        with engine.connect() as connection:
            current = current_revision(connection)
    except sa_exc.DBAPIError as exc:
        raise _fail(f"database.url: cannot open {shown}: {exc.orig}".splitlines()[0], 1) from None
    finally:
        engine.dispose()
    head = head_revision()
    state = "up to date" if current == head else "run `dicomgate db migrate`"
    typer.echo(f"{shown}: revision {current or '(empty)'}; this version's head {head} ({state})")


@db_app.command("migrate")
def db_migrate(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML config file")],
) -> None:
    """Upgrade the schema to this version's head (safe while other nodes run: one at a time).

    A SQLite file that does not exist yet is created (and said so)."""
    from sqlalchemy import exc as sa_exc

    from dicomgate.errors import DicomgateError
    from dicomgate.index.db import current_revision, migrate

    engine, shown, new_file = _db_engine(config, create=True)
    try:
        if new_file is not None:
            new_file.parent.mkdir(parents=True, exist_ok=True)
        with engine.connect() as connection:
            before = current_revision(connection)
            migrate(connection)
            connection.commit()
            after = current_revision(connection)
    except DicomgateError as exc:
        raise _fail(str(exc), 1) from None
    except OSError as exc:
        raise _fail(f"database.url: cannot create {new_file}: {exc.strerror or exc}", 1) from None
    except sa_exc.DBAPIError as exc:
        message = f"database.url: cannot migrate {shown}: {exc.orig}"
        raise _fail(message.splitlines()[0], 1) from None
    finally:
        engine.dispose()
    if new_file is not None:
        typer.echo(f"{shown}: created a new index database at {new_file}")
    if before == after:
        typer.echo(f"{shown}: already at revision {after}")
    else:
        typer.echo(f"{shown}: migrated from {before or '(empty)'} to {after}")


def main() -> None:
    """Console-script entry point. Bad usage exits 2 (click's convention, kept)."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
