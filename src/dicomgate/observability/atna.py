"""DICOM audit messages (PS3.15 A.5, RFC 3881 XML) sent over syslog to an ATNA repository.

IHE ITI-20 "Record Audit Event": each message is one RFC 5424 syslog message (facility
authpriv (10), severity notice (5), MSGID ``IHE+RFC-3881``) whose MSG is the UTF-8 XML of
an ``AuditMessage`` of the DICOM schema (PS3.15 A.5.1). Transports: UDP (RFC 5426, one
message per datagram), TCP with octet counting (RFC 6587 3.4.1) and TLS (RFC 5425).

Audit events map to the DICOM audit messages of PS3.15 A.5.3:

=============================  ================================================  ======
audit event                    DICOM message (EventID, EventTypeCode)            action
=============================  ================================================  ======
instance.received              DICOM Instances Transferred (110104)              C
delivery.*                     DICOM Instances Transferred (110104)              R
retrieve                       DICOM Instances Transferred (110104)              R
query                          Query (110112)                                    E
audit.read                     Audit Log Used (110101)                           R
association.rejected           Security Alert (110113), Node Authentication      E
auth.denied                    User Authentication (110114), Login (110122)      E
application.start / .stop      Application Activity (110100), 110120 / 110121    E
tls.reloaded / .reload_failed  Security Alert (110113), Software Configuration   E
=============================  ================================================  ======

Other kinds (association.accepted, stow.request, ...) stay in the database only
(:func:`forwarded`).

Participant objects (PS3.15 A.5.3): DICOM Instances Transferred names each Study (110180,
with a ``SOPClass`` per class when the instances per class are known: the element is left
out otherwise, which the schema allows) and the Patient; Query names the "SOP Queried and
the Query" (110181 SOP Class UID, ``ParticipantObjectQuery`` = the identifier as received,
base64, and its transfer syntax) for C-FIND, the route and query string (URI) for QIDO-RS
and FHIR; Audit Log Used names the audit log (URI, "Security Audit Log").
"""

from __future__ import annotations

import base64
import select
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dicomgate.observability.audit import SUCCESS, AuditEvent, ForwardFailed
from dicomgate.observability.models import SyslogConfig

_PRI = 10 * 8 + 5  # authpriv.notice
_MSGID = "IHE+RFC-3881"
_TIMEOUT = 5.0
_PROBE_EVERY = 5.0  # seconds between two connection attempts to a repository that failed


@dataclass(frozen=True)
class Code:
    """A coded value of PS3.15 A.5.1 (``csd-code``, ``codeSystemName``, ``originalText``)."""

    code: str
    system: str
    text: str

    def element(self, parent: ET.Element, tag: str) -> ET.Element:
        return ET.SubElement(
            parent,
            tag,
            {"csd-code": self.code, "codeSystemName": self.system, "originalText": self.text},
        )


APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
AUDIT_LOG_USED = Code("110101", "DCM", "Audit Log Used")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
QUERY = Code("110112", "DCM", "Query")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")
APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
LOGIN = Code("110122", "DCM", "Login")
NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
SOFTWARE_CONFIGURATION = Code("110131", "DCM", "Software Configuration")
APPLICATION_ROLE = Code("110150", "DCM", "Application")
DESTINATION_ROLE = Code("110152", "DCM", "Destination Role ID")
SOURCE_ROLE = Code("110153", "DCM", "Source Role ID")
STUDY_UID = Code("110180", "DCM", "Study Instance UID")
SOP_CLASS_UID = Code("110181", "DCM", "SOP Class UID")
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
URI = Code("12", "RFC-3881", "URI")
APPLICATION_SERVER = Code("4", "DCM", "Application Server")

# EventOutcomeIndicator (PS3.15 A.5.1): 0 success, 4 minor failure, 8 serious failure.
_OUTCOME = {SUCCESS: "0", "failure": "4", "serious_failure": "8"}


def _kind(event: str) -> tuple[Code, Code | None, str] | None:
    """(EventID, EventTypeCode, EventActionCode) of an audit event kind, None = not sent."""
    if event == "instance.received":
        return INSTANCES_TRANSFERRED, None, "C"
    if event.startswith("delivery.") or event == "retrieve":
        return INSTANCES_TRANSFERRED, None, "R"
    if event == "query":
        return QUERY, None, "E"
    if event == "audit.read":
        return AUDIT_LOG_USED, None, "R"
    if event == "association.rejected":
        return SECURITY_ALERT, NODE_AUTHENTICATION, "E"
    if event == "auth.denied":
        return USER_AUTHENTICATION, LOGIN, "E"
    if event == "application.start":
        return APPLICATION_ACTIVITY, APPLICATION_START, "E"
    if event == "application.stop":
        return APPLICATION_ACTIVITY, APPLICATION_STOP, "E"
    if event in ("tls.reloaded", "tls.reload_failed"):  # certificates: configuration
        return SECURITY_ALERT, SOFTWARE_CONFIGURATION, "E"
    return None


def forwarded(event: AuditEvent) -> bool:
    """Whether ``event`` has a DICOM audit message (is sent to the repository)."""
    return _kind(event.event) is not None


def _participant(
    root: ET.Element, user: str, requestor: bool, role: Code | None, address: str = ""
) -> None:
    attrs = {"UserID": user or "unknown", "UserIsRequestor": "true" if requestor else "false"}
    if address:
        attrs["NetworkAccessPointID"] = address
        # 1 = machine name, 2 = IP address (PS3.15 A.5.1)
        attrs["NetworkAccessPointTypeCode"] = "2" if _is_ip(address) else "1"
    participant = ET.SubElement(root, "ActiveParticipant", attrs)
    if role is not None:  # RoleIDCode is optional; "other participants" have none
        role.element(participant, "RoleIDCode")


def _object(
    root: ET.Element, object_id: str, type_code: str, role: str, id_type: Code
) -> ET.Element:
    element = ET.SubElement(
        root,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": object_id,
            "ParticipantObjectTypeCode": type_code,
            "ParticipantObjectTypeCodeRole": role,
        },
    )
    id_type.element(element, "ParticipantObjectIDTypeCode")
    return element


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8", "surrogateescape")).decode("ascii")


def _sop_classes(detail: Mapping[str, Any], per_class: Any) -> dict[str, int]:
    """Instances per SOP class of one study, when known: a ``{uid: count}`` mapping, or a
    single class of ``detail["sop_classes"]`` with ``detail["instances"]``."""
    if isinstance(per_class, Mapping):
        return {str(uid): int(n) for uid, n in per_class.items() if uid}
    classes = detail.get("sop_classes")
    count = detail.get("instances")
    if isinstance(classes, list) and len(classes) == 1 and count is not None:
        return {str(classes[0]): int(count)}
    return {}


def _studies(root: ET.Element, event: AuditEvent, detail: Mapping[str, Any]) -> None:
    """One Study participant object per study (PS3.15 A.5.3.10), its SOP classes when
    the number of instances of each is known (``SOPClass`` left out otherwise)."""
    studies = detail.get("studies")
    by_study: dict[str, Any] = {}
    if isinstance(studies, Mapping):
        by_study = {str(uid): classes for uid, classes in studies.items() if uid}
    elif event.study_uid:
        by_study = {event.study_uid: None}
    for uid, per_class in by_study.items():
        study = _object(root, uid, "2", "3", STUDY_UID)  # system object, report
        classes = _sop_classes(detail, per_class)
        if classes:
            desc = ET.SubElement(study, "ParticipantObjectDescription")
            for sop_class, count in classes.items():
                ET.SubElement(desc, "SOPClass", {"UID": sop_class, "NumberOfInstances": str(count)})


def _patient(root: ET.Element, event: AuditEvent) -> None:
    if event.patient_id is None:
        return
    patient = _object(root, event.patient_id, "1", "1", PATIENT_NUMBER)  # person, patient
    if event.patient_name:
        ET.SubElement(patient, "ParticipantObjectName").text = event.patient_name


def _query_object(root: ET.Element, event: AuditEvent, detail: Mapping[str, Any]) -> None:
    """The "SOP Queried and the Query" (PS3.15 A.5.3.12): for C-FIND the SOP Class UID
    (110181) and the identifier as received; for QIDO-RS and FHIR the route (URI) and the
    query string. Values of ``ParticipantObjectQuery`` and ``ParticipantObjectDetail`` are
    base64 (PS3.15 A.5.1)."""
    sop_class = str(detail.get("sop_class") or "")
    if sop_class:
        query = _object(root, sop_class, "2", "3", SOP_CLASS_UID)  # system object, report
        identifier = str(detail.get("identifier") or "")
        ET.SubElement(query, "ParticipantObjectQuery").text = identifier or _b64(
            str(detail.get("query") or "")
        )
        syntax = str(detail.get("transfer_syntax") or "")
        if syntax:
            ET.SubElement(
                query, "ParticipantObjectDetail", {"type": "TransferSyntax", "value": _b64(syntax)}
            )
        return
    if not event.object:
        return
    query = _object(root, event.object, "2", "24", URI)  # system object, query
    ET.SubElement(query, "ParticipantObjectQuery").text = _b64(str(detail.get("query") or ""))


def _is_ip(text: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, text)
            return True
        except OSError:
            continue
    return False


def audit_message(event: AuditEvent, node: str) -> bytes | None:
    """The PS3.15 A.5 ``AuditMessage`` XML of ``event``, or None if it has no DICOM message."""
    kind = _kind(event.event)
    if kind is None:
        return None
    event_id, type_code, action = kind
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": action,
            "EventDateTime": event.time.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "EventOutcomeIndicator": _OUTCOME.get(event.outcome, "4"),
        },
    )
    event_id.element(ident, "EventID")
    if type_code is not None:
        type_code.element(ident, "EventTypeCode")
    me = node
    detail: Mapping[str, Any] = event.detail or {}
    if event_id is INSTANCES_TRANSFERRED and action == "C":
        _participant(root, event.actor, True, SOURCE_ROLE, event.source_ip)
        _participant(root, me, False, DESTINATION_ROLE, node)
    elif event_id is INSTANCES_TRANSFERRED:
        _retrieve_participants(root, event, detail, me)
    elif event_id is APPLICATION_ACTIVITY:
        _participant(root, me, False, APPLICATION_ROLE, node)
    elif event_id is AUDIT_LOG_USED:  # PS3.15 A.5.3.2: who read it
        _participant(root, event.actor, True, None, event.source_ip)
    else:  # query, security alert, authentication: the peer asked, we answered
        _participant(root, event.actor, True, SOURCE_ROLE, event.source_ip)
        _participant(root, me, False, DESTINATION_ROLE, node)
    source = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": node})
    APPLICATION_SERVER.element(source, "AuditSourceTypeCode")
    if event_id is INSTANCES_TRANSFERRED:
        _studies(root, event, detail)
        _patient(root, event)
    elif event_id is QUERY:
        _query_object(root, event, detail)
    elif event_id is AUDIT_LOG_USED:
        log_object = _object(root, event.object or "/api/audit", "2", "13", URI)
        ET.SubElement(log_object, "ParticipantObjectName").text = "Security Audit Log"
    else:
        if event.study_uid:
            _object(root, event.study_uid, "2", "3", STUDY_UID)
        _patient(root, event)
    xml: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return xml


def _retrieve_participants(
    root: ET.Element, event: AuditEvent, detail: Mapping[str, Any], me: str
) -> None:
    """Instances read out of the gateway (PS3.15 A.5.3.4): we are the source; the
    destination is the delivery's destination, a C-MOVE's move destination (the requestor
    then an other participant), or the requestor itself (C-GET, WADO-RS)."""
    _participant(root, me, event.event.startswith("delivery."), SOURCE_ROLE, me)
    if event.event.startswith("delivery."):
        _participant(root, event.object, False, DESTINATION_ROLE)
        return
    move_destination = str(detail.get("move_destination") or "")
    if move_destination:
        _participant(root, move_destination, False, DESTINATION_ROLE)
        _participant(root, event.actor, True, None, event.source_ip)
        return
    _participant(root, event.actor, True, DESTINATION_ROLE, event.source_ip)


def syslog_frame(xml: bytes, *, hostname: str, app_name: str, when: str, procid: str) -> bytes:
    """RFC 5424 message: header, no structured data (``-``), BOM + UTF-8 XML as MSG."""
    header = f"<{_PRI}>1 {when} {hostname[:255] or '-'} {app_name} {procid} {_MSGID} - "
    return header.encode("ascii", "replace") + b"\xef\xbb\xbf" + xml


@dataclass(frozen=True)
class SyslogHealth:
    """What ``/readyz`` says of the audit repository connection."""

    error: str | None  # the last send's or connection attempt's error; None = working
    failing_since: datetime | None
    sent: int  # messages sent since start


def _closed_by_peer(sock: socket.socket) -> bool:
    """A repository never writes to us (RFC 6587/5425 are one-way): a readable socket has
    been closed, unless TLS 1.3 session tickets made it readable."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        sock.setblocking(False)
        data = sock.recv(1)
    except (BlockingIOError, ssl.SSLWantReadError):
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(_TIMEOUT)
    return data == b""


class SyslogSender:
    """Sends audit messages to one repository. Used by the audit writer thread only."""

    def __init__(self, config: SyslogConfig, node: str, procid: str) -> None:
        self.config = config
        self.node = node
        self.procid = procid
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._error: str | None = None
        self._failing_since: datetime | None = None
        self._sent = 0
        self._last_probe = 0.0

    def health(self) -> SyslogHealth:
        return SyslogHealth(self._error, self._failing_since, self._sent)

    def probe_if_failing(self) -> None:
        """While the last attempt failed, try to connect again every few seconds (TCP, TLS),
        so ``/readyz`` sees a repository that is back without waiting for an audit event.
        The connection made is kept for the next message."""
        if self._error is None or self.config.protocol == "udp":
            return
        now = time.monotonic()
        if now - self._last_probe < _PROBE_EVERY:
            return
        self._last_probe = now
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = self._connect()
            except OSError as exc:
                self._failed(exc)
                return
            self._error = self._failing_since = None

    def _failed(self, exc: BaseException) -> None:
        if self._failing_since is None:
            self._failing_since = datetime.now(UTC)
        self._error = (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:200]

    def __call__(self, events: Sequence[AuditEvent]) -> None:
        """Send every event that has a DICOM audit message; raises ForwardFailed (how
        many of those messages were not sent) on failure."""
        frames: list[bytes] = []
        for event in events:
            xml = audit_message(event, self.node)
            if xml is None:
                continue
            when = event.time.astimezone(UTC).isoformat(timespec="milliseconds")
            frames.append(
                syslog_frame(
                    xml,
                    hostname=self.node,
                    app_name=self.config.app_name,
                    when=when.replace("+00:00", "Z"),
                    procid=self.procid,
                )
            )
        if not frames:
            return
        with self._lock:
            done = 0
            try:
                for frame in frames:
                    self._send(frame)
                    self._sent += 1
                    done += 1
            except OSError as exc:
                self._failed(exc)
                raise ForwardFailed(len(frames) - done, exc) from exc
            self._error = self._failing_since = None

    def _send(self, frame: bytes) -> None:
        if self.config.protocol == "udp":
            with socket.socket(self._family(), socket.SOCK_DGRAM) as sock:
                sock.sendto(frame, (self.config.host, self.config.port))
            return
        data = str(len(frame)).encode("ascii") + b" " + frame  # RFC 6587 octet counting
        for attempt in range(2):  # a repository may have closed an idle connection
            try:
                if self._sock is not None and _closed_by_peer(self._sock):
                    self._drop()  # the repository restarted: do not write into the void
                if self._sock is None:
                    self._sock = self._connect()
                self._sock.sendall(data)
                return
            except OSError:
                self._drop()
                if attempt == 1:
                    raise

    def _family(self) -> socket.AddressFamily:
        info = socket.getaddrinfo(self.config.host, self.config.port, type=socket.SOCK_DGRAM)
        return info[0][0]

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.config.host, self.config.port), timeout=_TIMEOUT)
        if self.config.protocol != "tls":
            return sock
        context = ssl.create_default_context(cafile=self.config.ca)
        if self.config.cert:
            context.load_cert_chain(self.config.cert, self.config.key)
        try:
            return context.wrap_socket(sock, server_hostname=self.config.host)
        except (OSError, ssl.SSLError):
            sock.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None


__all__ = ["SyslogHealth", "SyslogSender", "audit_message", "forwarded", "syslog_frame"]
