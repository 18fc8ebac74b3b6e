"""DICOM audit messages (PS3.15 A.5.3) built from audit events: participant objects."""

from __future__ import annotations

import base64
import socket
import xml.etree.ElementTree as ET

import pytest

from dicomgate.observability.atna import SyslogSender, audit_message
from dicomgate.observability.audit import AuditEvent
from dicomgate.observability.models import SyslogConfig

STUDY = "1.2.826.0.1.3680043.10.997.1"
MR = "1.2.840.10008.5.1.4.1.1.4"
CT = "1.2.840.10008.5.1.4.1.1.2"
FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def _message(event: AuditEvent) -> ET.Element:
    xml = audit_message(event, "gw-unit")
    assert xml is not None
    return ET.fromstring(xml)


def _objects(root: ET.Element) -> dict[str, ET.Element]:
    return {
        str(o.get("ParticipantObjectID")): o
        for o in root.findall("ParticipantObjectIdentification")
    }


def _id_type(element: ET.Element) -> str:
    code = element.find("ParticipantObjectIDTypeCode")
    assert code is not None
    return str(code.get("csd-code"))


def test_c_find_names_the_sop_queried_and_the_query() -> None:
    identifier = b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY "
    root = _message(
        AuditEvent(
            event="query",
            actor="FINDER",
            source_ip="10.0.0.7",
            object="C-FIND",
            detail={
                "sop_class": FIND,
                "transfer_syntax": "1.2.840.10008.1.2",
                "identifier": base64.b64encode(identifier).decode(),
                "query": {"QueryRetrieveLevel": "STUDY"},
            },
        )
    )
    (query,) = root.findall("ParticipantObjectIdentification")
    assert query.get("ParticipantObjectID") == FIND
    assert (query.get("ParticipantObjectTypeCode"), query.get("ParticipantObjectTypeCodeRole")) == (
        "2",
        "3",
    )
    assert _id_type(query) == "110181"
    assert base64.b64decode(query.findtext("ParticipantObjectQuery") or "") == identifier
    detail = query.find("ParticipantObjectDetail")
    assert detail is not None and detail.get("type") == "TransferSyntax"
    assert base64.b64decode(detail.get("value") or "") == b"1.2.840.10008.1.2"
    # Schema order: the query before its details.
    assert [child.tag for child in query][1:] == [
        "ParticipantObjectQuery",
        "ParticipantObjectDetail",
    ]


def test_qido_query_names_the_route_and_the_query_string() -> None:
    root = _message(
        AuditEvent(
            event="query",
            actor="viewer",
            source_ip="10.0.0.8",
            object="/dicomweb/studies",
            detail={"query": "PatientName=DOE*", "status": 200},
        )
    )
    query = _objects(root)["/dicomweb/studies"]
    assert _id_type(query) == "12"  # URI
    assert base64.b64decode(query.findtext("ParticipantObjectQuery") or "") == b"PatientName=DOE*"


def test_c_move_destination_is_the_move_destination_with_study_and_patient() -> None:
    root = _message(
        AuditEvent(
            event="retrieve",
            actor="MOVER",
            source_ip="10.0.0.9",
            object="C-MOVE",
            study_uid=STUDY,
            patient_id="PID1",
            patient_name="DOE^JANE",
            detail={"move_destination": "ARCHIVE", "studies": {STUDY: {MR: 3, CT: 1}}},
        )
    )
    roles = {
        p.get("UserID"): (p.findtext("RoleIDCode"), p.find("RoleIDCode"), p.get("UserIsRequestor"))
        for p in root.findall("ActiveParticipant")
    }
    destination = roles["ARCHIVE"][1]
    assert destination is not None and destination.get("csd-code") == "110152"
    assert roles["MOVER"][2] == "true" and roles["ARCHIVE"][2] == "false"
    objects = _objects(root)
    assert set(objects) == {STUDY, "PID1"}
    classes = {c.get("UID"): c.get("NumberOfInstances") for c in objects[STUDY].iter("SOPClass")}
    assert classes == {MR: "3", CT: "1"}
    assert _id_type(objects["PID1"]) == "2"
    assert objects["PID1"].findtext("ParticipantObjectName") == "DOE^JANE"


def test_no_empty_sop_class_uid_when_the_classes_are_not_known() -> None:
    root = _message(
        AuditEvent(
            event="delivery.done",
            actor="pacs",
            object="pacs",
            study_uid=STUDY,
            patient_id="PID2",
            detail={"instances": 4, "sop_instance_uids": ["1.2.3"]},
        )
    )
    assert root.find(".//SOPClass") is None
    assert set(_objects(root)) == {STUDY, "PID2"}


def test_audit_log_used() -> None:
    root = _message(
        AuditEvent(event="audit.read", actor="admin", source_ip="10.0.0.1", object="/api/audit")
    )
    ident = root.find("EventIdentification")
    assert ident is not None and ident.get("EventActionCode") == "R"
    assert ident.find("EventID").get("csd-code") == "110101"  # type: ignore[union-attr]
    (log_object,) = root.findall("ParticipantObjectIdentification")
    assert (
        log_object.get("ParticipantObjectTypeCode"),
        log_object.get("ParticipantObjectTypeCodeRole"),
    ) == ("2", "13")
    assert log_object.findtext("ParticipantObjectName") == "Security Audit Log"


def test_a_failed_send_counts_only_the_messages_it_had_to_send() -> None:
    from dicomgate.observability.audit import ForwardFailed

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sender = SyslogSender(SyslogConfig(host="127.0.0.1", port=port, protocol="tcp"), "gw", "1")
    events = [
        AuditEvent(event="association.accepted", actor="A"),  # no DICOM message
        AuditEvent(event="association.rejected", actor="B"),
        AuditEvent(event="stow.request", actor="C"),  # no DICOM message
    ]
    with pytest.raises(ForwardFailed) as failed:
        sender(events)
    assert failed.value.unsent == 1
