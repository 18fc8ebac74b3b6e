"""DIMSE command sets (PS3.7 section 9.3 and Annex E): decode and encode group 0000.

Command sets are always Implicit VR Little Endian (PS3.7 6.3.1).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

NO_DATASET = 0x0101  # CommandDataSetType "no data set present" (PS3.7 E.1-1)
DATASET_PRESENT = 0x0000  # any other value means a data set follows; 0x0000 is customary


class CommandField(IntEnum):
    C_STORE_RQ = 0x0001
    C_STORE_RSP = 0x8001
    C_GET_RQ = 0x0010
    C_GET_RSP = 0x8010
    C_FIND_RQ = 0x0020
    C_FIND_RSP = 0x8020
    C_MOVE_RQ = 0x0021
    C_MOVE_RSP = 0x8021
    C_ECHO_RQ = 0x0030
    C_ECHO_RSP = 0x8030
    N_EVENT_REPORT_RQ = 0x0100
    N_GET_RQ = 0x0110
    N_SET_RQ = 0x0120
    N_ACTION_RQ = 0x0130
    N_CREATE_RQ = 0x0140
    N_DELETE_RQ = 0x0150
    C_CANCEL_RQ = 0x0FFF


class Status(IntEnum):
    """Statuses used by our SCP (PS3.4 B.2.3 Storage, C.4 Query/Retrieve, PS3.7 C)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: Data Set does not match SOP Class
    CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand
    # In the "cannot understand" range; PS3.18 Table I.2-2 names it for STOW-RS (an unknown
    # syntax never reaches a C-STORE: negotiation refuses it).
    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122  # Referenced Transfer Syntax not supported
    DUPLICATE_SOP_INSTANCE = 0x0111  # PS3.7 C.5.6, used under storage.duplicates: reject
    UNRECOGNIZED_OPERATION = 0x0211  # PS3.7 C.4.2
    SOP_CLASS_NOT_SUPPORTED = 0x0122  # PS3.7 C.5.4 Refused: SOP Class not Supported
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_INVOCATION = 0x0210
    MISTYPED_ARGUMENT = 0x0212
    NOT_AUTHORIZED = 0x0124  # PS3.7 C.5.21 Refused: Not Authorized
    # Query/Retrieve (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4)
    PENDING = 0xFF00
    PENDING_WARNING = 0xFF01  # C-FIND: optional keys not supported for existence/matching
    CANCEL = 0xFE00
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    UNABLE_TO_PROCESS = 0xC000
    OUT_OF_RESOURCES_MATCHES = 0xA701  # C-MOVE/C-GET: unable to calculate number of matches
    OUT_OF_RESOURCES_SUBOPERATIONS = 0xA702  # C-MOVE/C-GET: unable to perform sub-operations
    MOVE_DESTINATION_UNKNOWN = 0xA801
    SUBOPERATIONS_WITH_FAILURES = 0xB000  # C-MOVE/C-GET: warning, one or more failures


# (element number, VR) of the group 0000 elements we read or write.
_UI, _US, _UL, _AE, _LO, _AT = "UI", "US", "UL", "AE", "LO", "AT"
_ELEMENTS: dict[int, tuple[str, str]] = {
    0x0000: ("CommandGroupLength", _UL),
    0x0002: ("AffectedSOPClassUID", _UI),
    0x0003: ("RequestedSOPClassUID", _UI),
    0x0100: ("CommandField", _US),
    0x0110: ("MessageID", _US),
    0x0120: ("MessageIDBeingRespondedTo", _US),
    0x0600: ("MoveDestination", _AE),
    0x0700: ("Priority", _US),
    0x0800: ("CommandDataSetType", _US),
    0x0900: ("Status", _US),
    0x0901: ("OffendingElement", _AT),
    0x0902: ("ErrorComment", _LO),
    0x1000: ("AffectedSOPInstanceUID", _UI),
    0x1001: ("RequestedSOPInstanceUID", _UI),
    0x1020: ("NumberOfRemainingSuboperations", _US),
    0x1021: ("NumberOfCompletedSuboperations", _US),
    0x1022: ("NumberOfFailedSuboperations", _US),
    0x1023: ("NumberOfWarningSuboperations", _US),
    0x1030: ("MoveOriginatorApplicationEntityTitle", _AE),
    0x1031: ("MoveOriginatorMessageID", _US),
}


class CommandError(ValueError):
    """A command set that cannot be decoded."""


@dataclass
class Command:
    """A decoded command set; only the fields we use are typed."""

    command_field: int
    message_id: int
    affected_sop_class_uid: str = ""
    affected_sop_instance_uid: str = ""
    has_dataset: bool = False
    priority: int = 0
    move_originator_ae: str = ""
    move_originator_message_id: int | None = None
    # C-FIND/C-MOVE/C-GET and responses (PS3.7 9.3.2 - 9.3.4, 9.3.1.2 for C-STORE-RSP)
    message_id_responded_to: int | None = None
    move_destination: str = ""
    status: int | None = None
    error_comment: str = ""


def decode_command(raw: bytes) -> Command:
    """Decode an Implicit VR Little Endian group-0000 command set."""
    values: dict[str, str | int] = {}
    pos = 0
    end = len(raw)
    while pos < end:
        if pos + 8 > end:
            raise CommandError("command set ends inside an element header")
        group, element, length = struct.unpack_from("<HHI", raw, pos)
        pos += 8
        if group != 0x0000:
            raise CommandError(f"element ({group:04X},{element:04X}) outside group 0000")
        if pos + length > end:
            raise CommandError(f"element (0000,{element:04X}) length {length} runs past the end")
        value = raw[pos : pos + length]
        pos += length
        known = _ELEMENTS.get(element)
        if known is None:
            continue
        name, vr = known
        if vr == _AT:
            continue  # only ever sent by us
        if vr in (_US,):
            if length != 2:
                raise CommandError(f"(0000,{element:04X}) US with length {length}")
            values[name] = struct.unpack("<H", value)[0]
        elif vr == _UL:
            if length != 4:
                raise CommandError(f"(0000,{element:04X}) UL with length {length}")
            values[name] = struct.unpack("<I", value)[0]
        else:
            values[name] = value.decode("ascii", "replace").rstrip("\x00 ").strip()
    if "CommandField" not in values:
        raise CommandError("command set has no CommandField (0000,0100)")
    data_set_type = values.get("CommandDataSetType", NO_DATASET)
    return Command(
        command_field=int(values["CommandField"]),
        message_id=int(values.get("MessageID", 0)),
        affected_sop_class_uid=str(values.get("AffectedSOPClassUID", "")),
        affected_sop_instance_uid=str(values.get("AffectedSOPInstanceUID", "")),
        has_dataset=data_set_type != NO_DATASET,
        priority=int(values.get("Priority", 0)),
        move_originator_ae=str(values.get("MoveOriginatorApplicationEntityTitle", "")),
        move_originator_message_id=(
            int(values["MoveOriginatorMessageID"]) if "MoveOriginatorMessageID" in values else None
        ),
        message_id_responded_to=(
            int(values["MessageIDBeingRespondedTo"])
            if "MessageIDBeingRespondedTo" in values
            else None
        ),
        move_destination=str(values.get("MoveDestination", "")),
        status=int(values["Status"]) if "Status" in values else None,
        error_comment=str(values.get("ErrorComment", "")),
    )


def _element(element: int, vr: str, value: str | int | list[int]) -> bytes:
    if vr == _AT:
        assert isinstance(value, list)
        data = b"".join(struct.pack("<HH", tag >> 16, tag & 0xFFFF) for tag in value)
    elif vr == _US:
        assert isinstance(value, int)
        data = struct.pack("<H", value)
    elif vr == _UL:
        assert isinstance(value, int)
        data = struct.pack("<I", value)
    else:
        data = str(value).encode("ascii", "replace")
        if len(data) % 2:
            data += b"\x00" if vr == _UI else b" "
    return struct.pack("<HHI", 0, element, len(data)) + data


def encode_response(
    command_field: int,
    message_id_responded: int,
    status: int,
    *,
    sop_class_uid: str = "",
    sop_instance_uid: str = "",
    error_comment: str = "",
    has_dataset: bool = False,
    offending_elements: list[int] | None = None,
    suboperations: SubOperations | None = None,
) -> bytes:
    """Encode a response command set (C-STORE-RSP, C-ECHO-RSP, C-FIND-RSP ...).

    ``suboperations`` adds the Number of Remaining/Completed/Failed/Warning Sub-operations
    of C-MOVE-RSP and C-GET-RSP (PS3.7 9.3.3.2, 9.3.4.2); Remaining is left out when it is
    None, as for a final response (PS3.4 C.4.2.3.1).
    """
    body = b""
    if sop_class_uid:
        body += _element(0x0002, _UI, sop_class_uid)
    body += _element(0x0100, _US, command_field)
    body += _element(0x0120, _US, message_id_responded)
    body += _element(0x0800, _US, DATASET_PRESENT if has_dataset else NO_DATASET)
    body += _element(0x0900, _US, status)
    if offending_elements:
        body += _element(0x0901, _AT, offending_elements)
    if error_comment:
        body += _element(0x0902, _LO, error_comment[:64])
    if sop_instance_uid:
        body += _element(0x1000, _UI, sop_instance_uid)
    if suboperations is not None:
        if suboperations.remaining is not None:
            body += _element(0x1020, _US, min(suboperations.remaining, 0xFFFF))
        body += _element(0x1021, _US, min(suboperations.completed, 0xFFFF))
        body += _element(0x1022, _US, min(suboperations.failed, 0xFFFF))
        body += _element(0x1023, _US, min(suboperations.warning, 0xFFFF))
    return _element(0x0000, _UL, len(body)) + body


@dataclass
class SubOperations:
    """Counts of the C-STORE sub-operations of a C-MOVE or C-GET (PS3.4 C.4.2.1.5)."""

    remaining: int | None
    completed: int = 0
    failed: int = 0
    warning: int = 0


def encode_store_rq(
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    *,
    priority: int = 0,
    move_originator_ae: str = "",
    move_originator_message_id: int | None = None,
) -> bytes:
    """Encode a C-STORE-RQ command set (PS3.7 9.3.1.1), followed by a data set."""
    body = _element(0x0002, _UI, sop_class_uid)
    body += _element(0x0100, _US, CommandField.C_STORE_RQ)
    body += _element(0x0110, _US, message_id)
    body += _element(0x0700, _US, priority)
    body += _element(0x0800, _US, DATASET_PRESENT)
    body += _element(0x1000, _UI, sop_instance_uid)
    if move_originator_ae:
        body += _element(0x1030, _AE, move_originator_ae)
    if move_originator_message_id is not None:
        body += _element(0x1031, _US, move_originator_message_id)
    return _element(0x0000, _UL, len(body)) + body
