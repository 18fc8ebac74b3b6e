"""C-ECHO and C-STORE SCU: the ``dicomgate echo`` and ``dicomgate send`` commands.

Sending is done in three steps, each a plain function that can be tested alone:

1. :func:`iter_candidate_files` walks the paths given (folders recursively);
2. :func:`scan_file` reads each file's header only (up to the SOP Instance UID, so
   never the pixel data) and tells a DICOM instance from anything else;
3. :func:`plan_associations` builds the presentation contexts from what is actually
   being sent and groups the files so that no association needs more than
   :data:`MAX_CONTEXTS` contexts (PS3.8 9.3.2.2: presentation context IDs are odd
   numbers 1-255).

Each distinct (SOP class, transfer syntax) gets a context proposing exactly that
transfer syntax, so that an acceptor which orders transfer syntaxes by its own
preference still picks the file's own encoding and the file can be streamed from disk
as is. Each SOP class also gets one fallback context proposing Explicit and Implicit VR
Little Endian, used when the peer refuses a file's own encoding and the file can be
converted: native little-endian encodings are re-encoded, encapsulated (compressed)
ones are decompressed when a pixel data decoder is installed. Big-endian and
undecodable encapsulated files have no fallback.

Streaming uses pynetdicom's ``STORE_SEND_CHUNKED_DATASET``, a process-wide switch: when
it is on, ``Association.send_c_store(path)`` sends the encoded data set straight from
the file in PDU-sized chunks. :func:`send_paths` turns it on (and leaves it on: a path
handed to ``send_c_store`` anywhere in dicomgate must be streamed, design rule 2).

pynetdicom does not set ``TCP_NODELAY``; :func:`_set_tcp_nodelay` sets it from the
``EVT_CONN_OPEN`` notification, which pynetdicom fires right after ``connect()``.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import struct
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.pixels.decoders.base import get_decoder
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MediaStorageDirectoryStorage,
    RLELossless,
)
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from dicomgate.errors import DicomgateError

__all__ = [
    "LOSSLESS_COMPRESSED_SYNTAXES",
    "MAX_CONTEXTS",
    "AssociationPlan",
    "ContextSpec",
    "EchoFailed",
    "FindResult",
    "InvalidAeTitle",
    "MoveResult",
    "QueryFailed",
    "ScannedFile",
    "SendSummary",
    "ae_title_problem",
    "echo_peer",
    "find_peer",
    "iter_candidate_files",
    "lossless_contexts",
    "move_peer",
    "plan_associations",
    "scan_file",
    "send_paths",
]

LOGGER = logging.getLogger(__name__)

MAX_CONTEXTS = 128
"""pynetdicom's (and the standard's) limit of presentation contexts per association."""

FALLBACK_SYNTAXES: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

# Lossless compressed syntaxes a sender that can transcode proposes, one context each, for
# a SOP class the peer accepted in none of the syntaxes above (a peer taking only JPEG
# Lossless, say), in order of preference: compact and fast first, the most widely
# implemented next, RLE last (egress/dimse.py; docs/conformance.md 4.2.5).
LOSSLESS_COMPRESSED_SYNTAXES: tuple[UID, ...] = (
    JPEGLSLossless,
    JPEGLosslessSV1,
    JPEG2000Lossless,
    RLELossless,
)

# PS3.4 B.2.3: the Storage Service Class warning statuses; the instance was stored.
WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})

MAX_LISTED_FAILURES = 20


class EchoFailed(DicomgateError):
    """A C-ECHO did not succeed; the message says why."""


class _AssociationFailed(DicomgateError):
    """An association could not be established; the message says why."""


class InvalidAeTitle(DicomgateError):
    """An AE title that cannot be sent (PS3.5 6.2, VR AE); the caller's usage error."""


def ae_title_problem(value: str) -> str | None:
    """Why ``value`` is no usable AE title (PS3.5 6.2: 1-16 characters, not only spaces,
    no backslash or control character), or None when it is one."""
    if not value.strip():
        return "must not be empty or only spaces"
    valid, reason = _config.VALIDATORS["AE"](value)
    return None if valid else reason


def _check_ae_titles(**titles: str) -> None:
    """Raise :class:`InvalidAeTitle` for the first bad title, named by its keyword, before
    pynetdicom raises a bare ValueError (and logs it)."""
    for what, value in titles.items():
        problem = ae_title_problem(value)
        if problem is not None:
            raise InvalidAeTitle(f"{what.replace('_', ' ')} AE title {value!r}: {problem}")


# --------------------------------------------------------------------------- scanning


@dataclass(frozen=True)
class ScannedFile:
    """What a header scan learnt about one DICOM file."""

    path: Path
    sop_class_uid: UID
    sop_instance_uid: UID
    transfer_syntax_uid: UID
    # True when the file has a preamble and complete file meta: it can be streamed.
    streamable: bool

    @property
    def convertible(self) -> bool:
        """Whether the data set can be sent in Explicit/Implicit VR Little Endian."""
        return can_send_uncompressed(self.transfer_syntax_uid)


def can_send_uncompressed(transfer_syntax: UID) -> bool:
    """Whether data in `transfer_syntax` can be converted to a fallback syntax."""
    if not transfer_syntax.is_transfer_syntax:
        return False  # private or unknown to pydicom: only the peer may understand it
    if transfer_syntax.is_encapsulated:
        try:
            return bool(get_decoder(transfer_syntax).is_available)
        except NotImplementedError:  # no decoder exists for this syntax
            return False
    # Native: little endian (incl. deflated) converts; pydicom cannot swap endianness.
    return transfer_syntax.is_little_endian is True


def iter_candidate_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Yield the files given and, for folders, every file below them, in name order."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path


def _looks_like_raw_dataset(head: bytes) -> bool:
    """Whether `head` may start a data set written without preamble and file meta.

    Such a data set (PS3.10 7.1 allows none on the network, but old archives hold
    them) starts with a group 0x0002 or 0x0008 element, little or big endian.
    """
    if len(head) < 8:
        return False
    little = int.from_bytes(head[0:2], "little")
    big = int.from_bytes(head[0:2], "big")
    return little in (0x0002, 0x0008) or big == 0x0008


def _after_sop_instance_uid(tag: BaseTag, vr: str | None, length: int) -> bool:
    return bool(tag > 0x00080018)


class UnreadableDicom(DicomgateError):
    """A file that claims to be DICOM (it has the 'DICM' prefix) but cannot be used."""


def scan_file(path: Path) -> ScannedFile | None:
    """Read the header of `path`; ``None`` when it is not a DICOM instance.

    Raises :class:`UnreadableDicom` for a file with the 'DICM' prefix (PS3.10 7.1)
    that cannot be parsed or lacks its SOP Class / Instance UIDs, and ``OSError``
    when the file cannot be read.
    """
    with path.open("rb") as fp:
        head = fp.read(132)
    has_preamble = len(head) == 132 and head[128:132] == b"DICM"
    if not has_preamble and not _looks_like_raw_dataset(head):
        return None
    try:
        with path.open("rb") as fp, warnings.catch_warnings():
            # A header pydicom has to guess at is still usable; the verdict is ours.
            warnings.simplefilter("ignore")
            # Both UIDs are in group 0008: stop parsing right after them.
            ds = read_partial(fp, _after_sop_instance_uid, force=not has_preamble)
    except (
        InvalidDicomError,
        BytesLengthException,
        ValueError,
        EOFError,
        KeyError,
        TypeError,
        struct.error,
    ) as exc:
        if has_preamble:
            raise UnreadableDicom(f"cannot parse the header: {exc}") from exc
        return None

    meta = ds.file_meta if hasattr(ds, "file_meta") else FileMetaDataset()
    # The data set is the truth; PS3.7 9.3.1.1 wants the C-STORE command's UIDs to
    # match it, so file meta that disagrees is not used.
    sop_class = ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")
    sop_instance = ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID")
    if sop_class == MediaStorageDirectoryStorage:
        return None  # a DICOMDIR is a media index, not an instance to store
    if not sop_class or not sop_instance:
        if has_preamble:
            raise UnreadableDicom("no SOP Class UID or SOP Instance UID")
        return None
    transfer_syntax = meta.get("TransferSyntaxUID")
    if transfer_syntax is None:
        # No file meta: the encoding pydicom found while parsing.
        implicit, little = ds.original_encoding
        if little is False:
            transfer_syntax = ExplicitVRBigEndian
        else:
            transfer_syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    # pynetdicom streams the bytes after the file meta and takes the command's UIDs from
    # the file meta. Group 0002 and the preamble have even lengths, so an odd file size
    # means an odd data set (e.g. an unpadded deflate stream, against PS3.5 A.5), which
    # peers refuse as an odd PDV fragment: such files are re-encoded instead.
    streamable = (
        has_preamble
        and meta.get("MediaStorageSOPClassUID") == sop_class
        and meta.get("MediaStorageSOPInstanceUID") == sop_instance
        and path.stat().st_size % 2 == 0
    )
    return ScannedFile(
        path=path,
        sop_class_uid=UID(str(sop_class)),
        sop_instance_uid=UID(str(sop_instance)),
        transfer_syntax_uid=UID(str(transfer_syntax)),
        streamable=streamable,
    )


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class ContextSpec:
    """One presentation context to propose."""

    sop_class_uid: UID
    transfer_syntaxes: tuple[UID, ...]


@dataclass
class AssociationPlan:
    """The contexts of one association and the files sent over it, in order."""

    contexts: list[ContextSpec] = field(default_factory=list)
    files: list[ScannedFile] = field(default_factory=list)


def _contexts_for_class(files: list[ScannedFile]) -> tuple[list[ContextSpec], ContextSpec | None]:
    """The exact contexts of one SOP class's files, and its fallback context if any."""
    sop_class = files[0].sop_class_uid
    syntaxes = list(dict.fromkeys(f.transfer_syntax_uid for f in files))
    exact = [ContextSpec(sop_class, (ts,)) for ts in syntaxes]
    needs_fallback = any(f.convertible for f in files) and not set(FALLBACK_SYNTAXES) <= set(
        syntaxes
    )
    fallback = ContextSpec(sop_class, FALLBACK_SYNTAXES) if needs_fallback else None
    return exact, fallback


def lossless_contexts(sop_class_uid: UID, syntaxes: Iterable[UID]) -> list[ContextSpec]:
    """One context per transfer syntax of ``syntaxes`` for ``sop_class_uid``: separate
    contexts, so that the peer can accept any of them and the sender choose."""
    return [ContextSpec(sop_class_uid, (ts,)) for ts in syntaxes]


def plan_associations(
    files: Iterable[ScannedFile], max_contexts: int = MAX_CONTEXTS
) -> list[AssociationPlan]:
    """Group `files` into associations of at most `max_contexts` contexts each.

    All contexts of a SOP class stay in one association when they fit; files keep
    their order within an association.
    """
    if max_contexts < 2:
        raise ValueError("max_contexts must be at least 2")
    ordered = list(files)
    by_class: dict[UID, list[ScannedFile]] = {}
    for f in ordered:
        by_class.setdefault(f.sop_class_uid, []).append(f)

    plans: list[AssociationPlan] = []
    # (sop class, transfer syntax) -> the plan that carries its exact context
    home: dict[tuple[UID, UID], AssociationPlan] = {}
    current = AssociationPlan()
    for class_files in by_class.values():
        exact, fallback = _contexts_for_class(class_files)
        extra = [fallback] if fallback else []
        if len(current.contexts) + len(exact) + len(extra) > max_contexts and current.contexts:
            plans.append(current)
            current = AssociationPlan()
        # A class with more syntaxes than fit in one association is split.
        room = max_contexts - len(extra)
        for start in range(0, len(exact), room):
            chunk = exact[start : start + room]
            if len(current.contexts) + len(chunk) + len(extra) > max_contexts:
                plans.append(current)
                current = AssociationPlan()
            current.contexts.extend(chunk + extra)
            for spec in chunk:
                home[(spec.sop_class_uid, spec.transfer_syntaxes[0])] = current
    if current.contexts:
        plans.append(current)

    for class_files in by_class.values():
        for f in class_files:
            home[(f.sop_class_uid, f.transfer_syntax_uid)].files.append(f)
    # Restore the caller's file order inside each association.
    order = {id(f): n for n, f in enumerate(ordered)}
    for plan in plans:
        plan.files.sort(key=lambda f: order[id(f)])
    return plans


# --------------------------------------------------------------------------- summary


@dataclass
class SendSummary:
    """The outcome of :func:`send_paths`."""

    sent: int = 0  # stored by the peer, warnings included
    failed: int = 0
    warnings: int = 0  # stored with a warning status (PS3.4 B.2.3)
    skipped: int = 0  # not DICOM
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    elapsed: float = 0.0  # seconds, scan included

    def describe(self) -> str:
        """A human summary: one line of counts, then up to 20 failures."""
        rate = self.sent / self.elapsed if self.elapsed > 0 else 0.0
        lines = [
            f"sent {self.sent}, warnings {self.warnings}, failed {self.failed}, "
            f"skipped {self.skipped} (not DICOM) in {self.elapsed:.1f} s ({rate:.1f} inst/s)"
        ]
        lines += [f"  {path}: {reason}" for path, reason in self.failures[:MAX_LISTED_FAILURES]]
        if len(self.failures) > MAX_LISTED_FAILURES:
            lines.append(f"  ... and {len(self.failures) - MAX_LISTED_FAILURES} more failures")
        return "\n".join(lines)

    def add_failure(self, path: Path, reason: str) -> None:
        self.failed += 1
        self.failures.append((str(path), reason))


# --------------------------------------------------------------------------- association


def uid_hash(uid: str) -> str:
    """A short, stable stand-in for a UID in log lines (design rule 5)."""
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:12]


def _set_tcp_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: send small PDUs at once (no Nagle delay)."""
    transport = event.assoc.dul.socket
    sock = transport.socket if transport is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _diagnose_connect(host: str, port: int, timeout: float) -> str:
    """Why a TCP connection to host:port fails, in a few words.

    pynetdicom only logs the socket error, so it is reproduced with one more attempt.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return "connection closed before the association was negotiated"
    except ConnectionRefusedError:
        return "connection refused"
    except TimeoutError:
        return f"connection timed out after {timeout:g} s"
    except socket.gaierror as exc:
        return f"cannot resolve host {host!r} ({exc.strerror})"
    except OSError as exc:
        return f"cannot connect: {exc.strerror or exc}"


def _make_ae(calling_ae: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


def _open_association(
    ae: AE,
    host: str,
    port: int,
    called_ae: str,
    contexts: list[PresentationContext],
    timeout: float,
) -> Association:
    """Request an association; raise :class:`_AssociationFailed` with the reason."""
    connected: list[bool] = []

    def on_open(event: evt.Event) -> None:
        connected.append(True)
        _set_tcp_nodelay(event)

    try:
        assoc = ae.associate(
            host, port, contexts, ae_title=called_ae, evt_handlers=[(evt.EVT_CONN_OPEN, on_open)]
        )
    except socket.gaierror as exc:  # pynetdicom resolves the host before connecting
        raise _AssociationFailed(f"cannot resolve host {host!r} ({exc.strerror})") from None
    except OSError as exc:
        raise _AssociationFailed(f"cannot connect: {exc.strerror or exc}") from None
    if assoc.is_established:
        if not assoc.accepted_contexts:
            assoc.abort()
            raise _AssociationFailed(
                f"peer accepted none of the {len(contexts)} proposed presentation contexts"
            )
        return assoc
    if assoc.is_rejected and assoc.acceptor.primitive is not None:
        rsp = assoc.acceptor.primitive
        raise _AssociationFailed(
            f"association rejected ({rsp.result_str.lower()}, {rsp.source_str}): {rsp.reason_str}"
        )
    if not connected:
        raise _AssociationFailed(_diagnose_connect(host, port, timeout))
    raise _AssociationFailed("association aborted by the peer or timed out during negotiation")


# --------------------------------------------------------------------------- C-ECHO


def echo_peer(host: str, port: int, *, calling_ae: str, called_ae: str, timeout: float) -> float:
    """Send one C-ECHO (PS3.4 A.4) and return the seconds it took, association included.

    Raises :class:`EchoFailed`, or :class:`InvalidAeTitle` for a bad AE title."""
    _check_ae_titles(calling=calling_ae, called=called_ae)
    ae = _make_ae(calling_ae, timeout)
    start = time.monotonic()
    try:
        assoc = _open_association(ae, host, port, called_ae, [build_context(Verification)], timeout)
    except _AssociationFailed as exc:
        raise EchoFailed(str(exc)) from None
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    elapsed = time.monotonic() - start
    if "Status" not in status:
        raise EchoFailed(f"no C-ECHO response within {timeout:g} s (association lost)")
    if status.Status != 0x0000:
        raise EchoFailed(f"status 0x{status.Status:04X}")
    return elapsed


# --------------------------------------------------------------------------- C-STORE


@dataclass(frozen=True)
class _Outcome:
    kind: str  # "sent", "warning", "failed", or "lost" (failed and the association gone)
    reason: str = ""


def _status_outcome(status: Dataset, waited: float, timeout: float) -> _Outcome:
    """Map a C-STORE response status (PS3.4 B.2.3) to an outcome."""
    if "Status" not in status:
        # pynetdicom returns an empty status on abort, connection loss or timeout.
        if waited >= timeout:
            return _Outcome("lost", f"no response within {timeout:g} s")
        return _Outcome("lost", "association aborted or connection closed by the peer")
    code = int(status.Status)
    if code == 0x0000:
        return _Outcome("sent")
    comment = status.get("ErrorComment")
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", ""))[1]
    reason = f"status 0x{code:04X}" + (f" {meaning}" if meaning else "")
    if comment:
        reason += f": {comment}"
    return _Outcome("warning" if code in WARNING_STATUSES else "failed", reason)


def _accepted_syntaxes(assoc: Association, sop_class: UID) -> set[UID]:
    return {
        UID(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == sop_class and cx.transfer_syntax
    }


def _load_for_conversion(f: ScannedFile) -> Dataset:
    """Read the whole file to send it in a fallback (uncompressed) syntax."""
    ds = dcmread(f.path, force=not f.streamable)
    if not hasattr(ds, "file_meta"):
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = f.transfer_syntax_uid
    if f.transfer_syntax_uid.is_encapsulated:
        # Explicit VR Little Endian, the same instance: pydicom would give it a new SOP
        # Instance UID, and the peer would store another instance than the one sent.
        ds.decompress(generate_instance_uid=False)
    return ds


def _store_one(assoc: Association, f: ScannedFile, timeout: float) -> _Outcome:
    """C-STORE one file over `assoc`, streamed when the peer took its own syntax."""
    accepted = _accepted_syntaxes(assoc, f.sop_class_uid)
    payload: Path | Dataset
    try:
        if f.transfer_syntax_uid in accepted and f.streamable:
            payload = f.path
        elif f.transfer_syntax_uid in accepted:
            payload = dcmread(f.path, force=True)
            payload.file_meta = FileMetaDataset()
            payload.file_meta.TransferSyntaxUID = f.transfer_syntax_uid
        elif f.convertible and accepted & set(FALLBACK_SYNTAXES):
            payload = _load_for_conversion(f)
        else:
            return _Outcome(
                "failed",
                f"peer did not accept {f.sop_class_uid.name} in "
                f"{f.transfer_syntax_uid.name}" + (" or uncompressed" if f.convertible else ""),
            )
        started = time.monotonic()
        status = assoc.send_c_store(payload)
    except OSError as exc:
        return _Outcome("failed", f"cannot read: {exc.strerror or exc}")
    except Exception as exc:  # a per-file failure must not stop the run; it is reported
        return _Outcome("failed", f"cannot send: {type(exc).__name__}: {exc}")
    return _status_outcome(status, time.monotonic() - started, timeout)


@dataclass
class _Peer:
    host: str
    port: int
    calling_ae: str
    called_ae: str
    timeout: float


def _send_plan(
    peer: _Peer,
    plan: AssociationPlan,
    summary: SendSummary,
    on_file_done: Callable[[], None],
) -> None:
    """Send the files of one plan; reconnect once after each association loss."""
    ae = _make_ae(peer.calling_ae, peer.timeout)
    contexts = [build_context(c.sop_class_uid, list(c.transfer_syntaxes)) for c in plan.contexts]
    assoc: Association | None = None
    try:
        for n, f in enumerate(plan.files):
            if assoc is None or not assoc.is_established:
                try:
                    assoc = _open_association(
                        ae, peer.host, peer.port, peer.called_ae, contexts, peer.timeout
                    )
                except _AssociationFailed as exc:
                    LOGGER.info(
                        "association to %s:%s failed: %s",
                        peer.host,
                        peer.port,
                        exc,
                        extra={"event": "scu.association_failed"},
                    )
                    for rest in plan.files[n:]:
                        summary.add_failure(rest.path, str(exc))
                        on_file_done()
                    return
            outcome = _store_one(assoc, f, peer.timeout)
            if outcome.kind == "lost":
                # Reconnect for the next file; abort rather than release a dead link
                # (a release would wait for an A-RELEASE-RP that never comes).
                assoc.abort()
                assoc = None
            if outcome.kind in ("failed", "lost"):
                summary.add_failure(f.path, outcome.reason)
                LOGGER.info(
                    "C-STORE of instance %s failed: %s",
                    uid_hash(f.sop_instance_uid),
                    outcome.reason,
                    extra={"event": "scu.store_failed"},
                )
            else:
                summary.sent += 1
                summary.warnings += outcome.kind == "warning"
            on_file_done()
    finally:
        if assoc is not None and assoc.is_established:
            assoc.release()


def send_paths(
    paths: list[Path],
    host: str,
    port: int,
    *,
    calling_ae: str,
    called_ae: str,
    timeout: float,
    progress: bool,
) -> SendSummary:
    """C-STORE every DICOM file under `paths` to host:port (PS3.4 B); never raises
    for a per-file problem: each one is a failure in the summary (an unreachable peer
    too). Raises :class:`InvalidAeTitle` for a bad AE title, before anything is read."""
    _check_ae_titles(calling=calling_ae, called=called_ae)
    _config.STORE_SEND_CHUNKED_DATASET = True  # see the module docstring
    start = time.monotonic()
    summary = SendSummary()
    scanned: list[ScannedFile] = []
    for path in iter_candidate_files(paths):
        try:
            found = scan_file(path)
        except OSError as exc:
            summary.add_failure(path, f"cannot read: {exc.strerror or exc}")
            continue
        except UnreadableDicom as exc:
            summary.add_failure(path, str(exc))
            continue
        if found is None:
            summary.skipped += 1
        else:
            scanned.append(found)

    plans = plan_associations(scanned)
    peer = _Peer(host, port, calling_ae, called_ae, timeout)
    LOGGER.info(
        "sending %d instances to %s:%s over %d association(s)",
        len(scanned),
        host,
        port,
        len(plans),
        extra={"event": "scu.send_start"},
    )
    if progress and sys.stderr.isatty() and scanned:
        from rich.console import Console
        from rich.progress import Progress

        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("sending", total=len(scanned))
            for plan in plans:
                _send_plan(peer, plan, summary, lambda: bar.advance(task))
    else:
        for plan in plans:
            _send_plan(peer, plan, summary, lambda: None)
    summary.elapsed = time.monotonic() - start
    return summary


# --------------------------------------------------------------------------- C-FIND / C-MOVE

# Query/Retrieve information models (PS3.4 C.6): model name -> (FIND, MOVE) SOP class UIDs.
QR_MODELS: dict[str, tuple[str, str]] = {
    "study": ("1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.2.2"),
    "patient": ("1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.1.2"),
}


class QueryFailed(DicomgateError):
    """A C-FIND or C-MOVE could not be done at all (association refused, lost...)."""


@dataclass
class FindResult:
    """The outcome of :func:`find_peer`."""

    matches: list[Dataset] = field(default_factory=list)
    status: int = 0  # of the final response
    comment: str = ""  # its Error Comment, if any
    elapsed: float = 0.0


@dataclass
class MoveResult:
    """The outcome of :func:`move_peer`: the final response's status and counts."""

    status: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0
    comment: str = ""
    failed_uids: list[str] = field(default_factory=list)
    elapsed: float = 0.0


def _qr_association(
    host: str, port: int, calling_ae: str, called_ae: str, sop_class: str, timeout: float
) -> Association:
    _check_ae_titles(calling=calling_ae, called=called_ae)
    ae = _make_ae(calling_ae, timeout)
    context = build_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    try:
        return _open_association(ae, host, port, called_ae, [context], timeout)
    except _AssociationFailed as exc:
        raise QueryFailed(str(exc)) from None


def find_peer(
    host: str,
    port: int,
    identifier: Dataset,
    *,
    calling_ae: str,
    called_ae: str,
    model: str,
    timeout: float,
) -> FindResult:
    """Send one C-FIND (PS3.4 C.4.1) and collect every match."""
    start = time.monotonic()
    assoc = _qr_association(host, port, calling_ae, called_ae, QR_MODELS[model][0], timeout)
    result = FindResult()
    try:
        for status, match in assoc.send_c_find(identifier, QR_MODELS[model][0]):
            if "Status" not in status:
                raise QueryFailed(f"no C-FIND response within {timeout:g} s (association lost)")
            result.status = int(status.Status)
            result.comment = str(status.get("ErrorComment", ""))
            if result.status in (0xFF00, 0xFF01) and match is not None:
                result.matches.append(match)
    finally:
        if assoc.is_established:
            assoc.release()
    result.elapsed = time.monotonic() - start
    return result


def move_peer(
    host: str,
    port: int,
    identifier: Dataset,
    *,
    destination: str,
    calling_ae: str,
    called_ae: str,
    model: str,
    timeout: float,
    on_pending: Callable[[int, int, int, int], None] = lambda *_: None,
) -> MoveResult:
    """Send one C-MOVE (PS3.4 C.4.2); ``on_pending(remaining, completed, failed, warning)``
    is called for each pending response."""
    _check_ae_titles(move_destination=destination)
    start = time.monotonic()
    sop_class = QR_MODELS[model][1]
    assoc = _qr_association(host, port, calling_ae, called_ae, sop_class, timeout)
    result = MoveResult()
    try:
        for status, extra in assoc.send_c_move(identifier, destination, sop_class):
            if "Status" not in status:
                raise QueryFailed(f"no C-MOVE response within {timeout:g} s (association lost)")
            code = int(status.Status)
            counts = [
                int(status.get(f"NumberOf{kind}Suboperations", 0) or 0)
                for kind in ("Remaining", "Completed", "Failed", "Warning")
            ]
            if code in (0xFF00, 0xFF01):
                on_pending(*counts)
                continue
            result.status = code
            result.completed, result.failed, result.warning = counts[1:]
            result.comment = str(status.get("ErrorComment", ""))
            if extra is not None and "FailedSOPInstanceUIDList" in extra:
                value = extra.FailedSOPInstanceUIDList
                result.failed_uids = [str(v) for v in value] if value else []
    finally:
        if assoc.is_established:
            assoc.release()
    result.elapsed = time.monotonic() - start
    return result


def status_text(code: int) -> str:
    """A short description of a Q/R status (PS3.4 C.4.1.1.4, C.4.2.1.5)."""
    from pynetdicom.status import QR_FIND_SERVICE_CLASS_STATUS, QR_MOVE_SERVICE_CLASS_STATUS

    for table in (QR_MOVE_SERVICE_CLASS_STATUS, QR_FIND_SERVICE_CLASS_STATUS):
        if code in table:
            return f"0x{code:04X} {table[code][0]}: {table[code][1]}"
    if code == 0x0124:
        return "0x0124 Failure: Refused, not authorized"
    if 0xC000 <= code <= 0xCFFF:
        return f"0x{code:04X} Failure: unable to process"
    return f"0x{code:04X}"
