"""A DIMSE upstream for DICOMweb requests: QIDO-RS as C-FIND, WADO-RS as C-GET / C-MOVE.

``query.dicomweb.source`` naming a ``dimse`` destination turns this gateway into a
DICOMweb front of that PACS (what dicomweb-proxy does):

- a QIDO-RS search becomes one C-FIND (Study Root, PS3.4 C.6.2) at the level of the path;
  the query keys go into the identifier as they are (wildcards, ranges and UID lists share
  their syntax with C-FIND, PS3.18 8.3.4.1 / PS3.4 C.2.2.2), the returned attributes are
  the PS3.18 defaults plus ``includefield`` as empty return keys (PS3.4 C.4.1.1.3.2);
  ``limit``/``offset`` are applied here, on the whole answer;
- a WADO-RS request first learns the instances of the resource with an IMAGE-level
  C-FIND (their SOP classes are the storage contexts to offer), then retrieves them with a
  C-GET on the same kind of association, this gateway taking the Storage SCP role
  (PS3.4 C.4.3, PS3.7 D.3.3.4). Each C-STORE sub-operation is written into the retrieve
  cache (:mod:`.cache`) as it arrives.

Failures are :class:`UpstreamFailed`: 502 when the PACS is down, refuses or aborts the
association or answers with a failure status; 504 when it does not answer within
``query.dicomweb.timeout``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, StoragePresentationContexts

from dicomgate.dicomweb.catalog import StoredRef
from dicomgate.dimse.scu import _diagnose_connect, _set_tcp_nodelay, uid_hash
from dicomgate.errors import DicomgateError
from dicomgate.index.query import DEFAULT_RETURN, Level, QueryOptions, attributes_at

__all__ = [
    "DimseUpstream",
    "UpstreamFailed",
    "UpstreamNotFound",
    "find_identifier",
    "get_contexts",
]

log = logging.getLogger(__name__)

_LEVEL_NAME = {Level.STUDY: "STUDY", Level.SERIES: "SERIES", Level.IMAGE: "IMAGE"}
_RETRIEVE_URL = 0x00081190
# C-FIND answer attributes a DICOMweb client has no use for (PS3.18 Table 6.7.1-2).
_DROPPED = {0x00080052, 0x00080054, 0x00080056, 0x00080005}
_UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]
_COMPRESSED = [
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]
# Study Root Query/Retrieve Information Model FIND and GET (PS3.4 C.6.2).
StudyRootQueryRetrieveInformationModelFind = "1.2.840.10008.5.1.4.1.2.2.1"
StudyRootQueryRetrieveInformationModelMove = "1.2.840.10008.5.1.4.1.2.2.2"
StudyRootQueryRetrieveInformationModelGet = "1.2.840.10008.5.1.4.1.2.2.3"
_FIND_MSG_ID = 1  # the Message ID of our C-FIND on its own association
_MAX_CONTEXTS = 127  # PS3.8 9.3.2.2: odd context IDs 1-255; one is the C-GET model


class UpstreamFailed(DicomgateError):
    """The upstream PACS could not answer: HTTP 502, or 504 when it timed out."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out

    @property
    def status(self) -> int:
        return 504 if self.timed_out else 502


class UpstreamNotFound(DicomgateError):
    """The upstream PACS has no instance in the requested resource (HTTP 404)."""


@dataclass(frozen=True)
class DimseUpstream:
    """One ``dimse`` destination used as the source of DICOMweb requests."""

    name: str  # the destination's name (in logs)
    host: str
    port: int
    called_ae: str
    calling_ae: str
    timeout: float

    # -- associations ------------------------------------------------------------------

    def _associate(
        self,
        contexts: list[PresentationContext],
        roles: Iterable[Any] = (),
        handlers: list[Any] | None = None,
    ) -> Association:
        """An established association, or :class:`UpstreamFailed` with the reason."""
        ae = AE(ae_title=self.calling_ae)
        for attr in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(ae, attr, self.timeout)
        connected: list[bool] = []

        def on_open(event: evt.Event) -> None:
            connected.append(True)
            _set_tcp_nodelay(event)

        started = time.monotonic()
        assoc = ae.associate(
            self.host,
            self.port,
            contexts,
            ae_title=self.called_ae,
            ext_neg=list(roles) or None,
            evt_handlers=[(evt.EVT_CONN_OPEN, on_open), *(handlers or [])],
        )
        if assoc.is_established:
            if not assoc.accepted_contexts:
                assoc.abort()
                raise UpstreamFailed(f"{self.name} accepted none of the proposed contexts")
            return assoc
        if assoc.is_rejected and assoc.acceptor.primitive is not None:
            rsp = assoc.acceptor.primitive
            raise UpstreamFailed(
                f"{self.name} rejected the association ({rsp.result_str.lower()}, "
                f"{rsp.source_str}): {rsp.reason_str}"
            )
        if not connected:
            reason = _diagnose_connect(self.host, self.port, self.timeout)
            raise UpstreamFailed(f"{self.name}: {reason}", timed_out="timed out" in reason)
        timed_out = time.monotonic() - started >= self.timeout * 0.95
        raise UpstreamFailed(
            f"{self.name} aborted the association during negotiation"
            + (f" (no answer within {self.timeout:g} s)" if timed_out else ""),
            timed_out=timed_out,
        )

    def _lost(self, what: str, since: float) -> UpstreamFailed:
        timed_out = time.monotonic() - since >= self.timeout * 0.95
        if timed_out:
            return UpstreamFailed(
                f"no {what} response from {self.name} within {self.timeout:g} s",
                timed_out=True,
            )
        return UpstreamFailed(f"{self.name} aborted the association during the {what}")

    # -- C-FIND ------------------------------------------------------------------------

    def find(self, identifier: Dataset, limit: int | None = None) -> list[Dataset]:
        """The matches of one Study Root C-FIND (PS3.4 C.4.1), ``limit`` at most: once
        that many are in, the PACS gets a C-CANCEL-RQ (PS3.7 9.1.2.1.3) and its answers
        are read on to the final one (the association is then released, or aborted if
        the PACS ignores the cancel for ``timeout``)."""
        model = StudyRootQueryRetrieveInformationModelFind
        context = build_context(model, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = self._associate([context])
        matches: list[Dataset] = []
        cancelled_at = 0.0
        try:
            last = time.monotonic()
            for status, match in assoc.send_c_find(identifier, model, msg_id=_FIND_MSG_ID):
                if "Status" not in status:
                    if cancelled_at:
                        break  # no answer to the cancel: we have what we wanted
                    raise self._lost("C-FIND", last)
                last = time.monotonic()
                code = int(status.Status)
                if code in (0xFF00, 0xFF01):
                    if cancelled_at:
                        if last - cancelled_at > self.timeout:
                            assoc.abort()  # the PACS ignores the cancel
                            break
                        continue
                    if match is not None:
                        matches.append(match)
                    if limit is not None and len(matches) >= limit:
                        cancelled_at = time.monotonic()
                        assoc.send_c_cancel(_FIND_MSG_ID, query_model=model)
                elif code != 0x0000 and not (cancelled_at and code == 0xFE00):
                    comment = str(status.get("ErrorComment", "") or "")
                    raise UpstreamFailed(
                        f"{self.name} answered the C-FIND with status 0x{code:04X}"
                        + (f": {comment}" if comment else "")
                    )
        finally:
            if assoc.is_established:
                assoc.release()
        return matches

    # -- C-GET -------------------------------------------------------------------------

    def instances_of(
        self, study: str, series: str | None, sop: str | None
    ) -> list[tuple[str, str, str]]:
        """(series UID, SOP Instance UID, SOP Class UID) of the instances of a resource."""
        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series or ""
        ds.SOPInstanceUID = sop or ""
        ds.SOPClassUID = ""
        ds.InstanceNumber = None
        found = self.find(ds)
        if not found:
            raise UpstreamNotFound(
                "unknown " + ("instance" if sop else "series" if series else "study")
            )
        return [
            (
                str(m.get("SeriesInstanceUID", "") or ""),
                str(m.get("SOPInstanceUID", "") or ""),
                str(m.get("SOPClassUID", "") or ""),
            )
            for m in found
        ]

    def get(
        self,
        study: str,
        series: str | None,
        sop: str | None,
        sop_classes: Iterable[str],
        on_instance: Callable[[Dataset, bytes], None],
    ) -> int:
        """C-GET the resource; ``on_instance(file meta, Part 10 bytes)`` for each C-STORE.

        Returns how many instances arrived; :class:`UpstreamFailed` if the C-GET failed
        or ended with failed sub-operations and nothing arrived.
        """
        model = StudyRootQueryRetrieveInformationModelGet
        contexts, roles = get_contexts(
            build_context(model, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]), sop_classes
        )
        received = [0]
        failures: list[str] = []

        def on_store(event: evt.Event) -> int:
            try:
                data = event.encoded_dataset(include_meta=True)
                on_instance(event.file_meta, data)
            except Exception as exc:  # our disk: tell the PACS, stop counting it
                failures.append(str(exc))
                log.error(
                    "cannot cache a retrieved instance: %s",
                    exc,
                    extra={"event": "bridge.cache_write_failed", "destination": self.name},
                )
                return 0xA700
            received[0] += 1
            return 0x0000

        assoc = self._associate(contexts, roles, [(evt.EVT_C_STORE, on_store)])
        identifier = _retrieve_identifier(study, series, sop)
        final = 0x0000
        comment = ""
        try:
            last = time.monotonic()
            for status, _ in assoc.send_c_get(identifier, model):
                if "Status" not in status:
                    raise self._lost("C-GET", last)
                last = time.monotonic()
                code = int(status.Status)
                if code not in (0xFF00, 0xFF01):
                    final = code
                    comment = str(status.get("ErrorComment", "") or "")
        finally:
            if assoc.is_established:
                assoc.release()
        if failures and not received[0]:
            raise UpstreamFailed(f"cannot keep the retrieved instances: {failures[0]}")
        if final not in (0x0000, 0xB000) and not received[0]:
            raise UpstreamFailed(
                f"{self.name} answered the C-GET with status 0x{final:04X}"
                + (f": {comment}" if comment else "")
            )
        return received[0]

    def move(self, study: str, series: str | None, sop: str | None, destination: str) -> int:
        """C-MOVE the resource to ``destination`` (our own AE title, PS3.4 C.4.2); returns
        the completed sub-operations once the PACS reports the end."""
        model = StudyRootQueryRetrieveInformationModelMove
        context = build_context(model, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = self._associate([context])
        identifier = _retrieve_identifier(study, series, sop)
        final, completed, comment = 0x0000, 0, ""
        try:
            last = time.monotonic()
            for status, _ in assoc.send_c_move(identifier, destination, model):
                if "Status" not in status:
                    raise self._lost("C-MOVE", last)
                last = time.monotonic()
                code = int(status.Status)
                if code not in (0xFF00, 0xFF01):
                    final = code
                    completed = int(status.get("NumberOfCompletedSuboperations", 0) or 0)
                    comment = str(status.get("ErrorComment", "") or "")
        finally:
            if assoc.is_established:
                assoc.release()
        if final not in (0x0000, 0xB000):
            raise UpstreamFailed(
                f"{self.name} answered the C-MOVE to {destination} with status 0x{final:04X}"
                + (f": {comment}" if comment else "")
            )
        return completed


def get_contexts(
    get_context: PresentationContext, sop_classes: Iterable[str]
) -> tuple[list[PresentationContext], list[Any]]:
    """The presentation contexts and SCP/SCU role selections of a C-GET association
    (PS3.4 C.4.3, PS3.7 D.3.3.4) for instances of ``sop_classes``.

    Each storage class is offered uncompressed, and each compressed syntax in a context of
    its own, so that the PACS can send an instance as it is stored (a PACS without a JPEG
    2000 decoder cannot send a JPEG 2000 instance any other way). When that does not fit
    in the 127 contexts (PS3.8 9.3.2.2), one context per class proposes every syntax.
    """
    classes = sorted({c for c in sop_classes if c})
    if not classes:  # the PACS did not say: offer every storage class we know
        classes = [str(c.abstract_syntax) for c in StoragePresentationContexts]
    syntax_sets = [_UNCOMPRESSED] + [[ts] for ts in _COMPRESSED]
    if len(classes) * len(syntax_sets) > _MAX_CONTEXTS - 1:
        syntax_sets = [_UNCOMPRESSED + _COMPRESSED]
    contexts = [get_context]
    for sop_class in classes[: _MAX_CONTEXTS - 1]:
        for syntaxes in syntax_sets:
            if len(contexts) < _MAX_CONTEXTS:
                contexts.append(build_context(sop_class, list(syntaxes)))
    roles = [build_role(c, scp_role=True) for c in classes[: _MAX_CONTEXTS - 1]]
    return contexts, roles


def _retrieve_identifier(study: str, series: str | None, sop: str | None) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE" if sop else "SERIES" if series else "STUDY"
    identifier.StudyInstanceUID = study
    if series:
        identifier.SeriesInstanceUID = series
    if sop:
        identifier.SOPInstanceUID = sop
    return identifier


# -- QIDO-RS -> C-FIND ------------------------------------------------------------------


def _tag_path(key: str) -> list[int]:
    path: list[int] = []
    for part in key.split("."):
        part = part.strip().strip("()").replace(",", "")
        tag = tag_for_keyword(part)
        if tag is None:
            tag = int(part, 16)  # the key was checked by qido's parser
        path.append(int(tag))
    return path


def _put(ds: Dataset, path: list[int], value: str | None) -> None:
    """Add a key (value) or return key (None) at ``path`` (a sequence item path)."""
    target = ds
    for parent in path[:-1]:
        if parent not in target:
            target.add_new(parent, "SQ", [Dataset()])
        seq = target[parent].value
        if not seq:
            seq.append(Dataset())
        target = seq[0]
    tag = path[-1]
    if value is None and tag in target:
        return
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        vr = "UN"
    if vr == "SQ":
        target.add_new(tag, "SQ", [])
        return
    if value is not None and vr == "UI":
        value = value.replace(",", "\\")  # PS3.18 UID lists use commas, C-FIND backslashes
    # validation_mode=0: ranges (20230101-20230110) and wildcards are query syntax.
    target[tag] = DataElement(tag, vr, value if value is not None else None, validation_mode=0)


def find_identifier(level: Level, keys: Mapping[str, str], options: QueryOptions) -> Dataset:
    """The C-FIND identifier of a QIDO-RS search (PS3.18 8.3.4, PS3.4 C.6.2.1)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = _LEVEL_NAME[level]
    returned: list[str] = []
    for default_level in options.default_levels:
        returned.extend(DEFAULT_RETURN[default_level])
    if options.include_all:
        returned.extend(a.key for a in attributes_at(level))
    returned.extend(options.include)
    for key, value in keys.items():
        _put(ds, _tag_path(key), value)
    for key in returned:
        path = _tag_path(key)
        if path[0] == _RETRIEVE_URL:
            continue  # ours, filled by qido
        if path[0] == 0x00080052:
            continue
        _put(ds, path, None)
    for uid in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")[: level.value]:
        _put(ds, _tag_path(uid), None)
    return ds


def cfind_json(match: Dataset) -> dict[str, Any]:
    """A C-FIND answer in the DICOM JSON model (PS3.18 F.2), via the WADO metadata writer."""
    import io

    from dicomgate.dicomweb.dicomjson import _dataset_json

    for tag in _DROPPED:
        if tag in match:
            del match[tag]
    return _dataset_json(match, io.BytesIO(), lambda _: "", "", True)


# -- retrieved files --------------------------------------------------------------------


def write_instance(folder: Path, relfolder: str, meta: Dataset, data: bytes) -> StoredRef:
    """Write one retrieved Part 10 file into ``folder`` (tmp + rename) and describe it."""
    sop = str(meta.MediaStorageSOPInstanceUID)
    name = uid_hash(sop) + ".dcm"
    tmp = folder / (name + ".part")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, folder / name)
    ds = dcmread(
        folder / name,
        stop_before_pixels=True,
        specific_tags=[
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "Rows",
            "Columns",
            "NumberOfFrames",
        ],
    )
    frames = ds.get("NumberOfFrames")
    return StoredRef(
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        sop_instance_uid=sop,
        sop_class_uid=str(meta.MediaStorageSOPClassUID),
        transfer_syntax_uid=str(meta.TransferSyntaxUID),
        relpath=f"{relfolder}/{name}",
        size=len(data),
        rows=int(ds.Rows) if ds.get("Rows") is not None else None,
        columns=int(ds.Columns) if ds.get("Columns") is not None else None,
        number_of_frames=int(frames) if frames not in (None, "") else None,
    )


def iter_sorted(refs: Iterable[StoredRef]) -> Iterator[StoredRef]:
    """Refs in a stable order (series, then SOP Instance UID)."""
    yield from sorted(refs, key=lambda r: (r.series_uid, r.sop_instance_uid))
