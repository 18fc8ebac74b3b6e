"""DIMSE command sets (PS3.7 section 9.3 and Annex E): decode and encode group 0000.

Command sets are always Implicit VR Little Endian (PS3.7 6.3.1).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

NO_DATASET = 0x0101  # CommandDataSetType "no data set present" (PS3.7 E.1-1)


class CommandField(IntEnum):
    C_STORE_RQ = 0x0001
    C_STORE_RSP = 0x8001
    C_GET_RQ = 0x0010
    C_FIND_RQ = 0x0020
    C_MOVE_RQ = 0x0021
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
    """Statuses used by our SCP (PS3.4 B.2.3 Storage, PS3.7 C)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: Data Set does not match SOP Class
    CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand
    DUPLICATE_SOP_INSTANCE = 0x0111  # PS3.7 C.5.6, used under storage.duplicates: reject
    UNRECOGNIZED_OPERATION = 0x0211  # PS3.7 C.4.2
    SOP_CLASS_NOT_SUPPORTED = 0x0122  # PS3.7 C.5.4 Refused: SOP Class not Supported
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_INVOCATION = 0x0210
    MISTYPED_ARGUMENT = 0x0212


# (element number, VR) of the group 0000 elements we read or write.
_UI, _US, _UL, _AE, _LO = "UI", "US", "UL", "AE", "LO"
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
    0x0902: ("ErrorComment", _LO),
    0x1000: ("AffectedSOPInstanceUID", _UI),
    0x1001: ("RequestedSOPInstanceUID", _UI),
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
    )


def _element(element: int, vr: str, value: str | int) -> bytes:
    if vr == _US:
        data = struct.pack("<H", int(value))
    elif vr == _UL:
        data = struct.pack("<I", int(value))
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
) -> bytes:
    """Encode a response command set without a data set (C-STORE-RSP, C-ECHO-RSP ...)."""
    body = b""
    if sop_class_uid:
        body += _element(0x0002, _UI, sop_class_uid)
    body += _element(0x0100, _US, command_field)
    body += _element(0x0120, _US, message_id_responded)
    body += _element(0x0800, _US, NO_DATASET)
    body += _element(0x0900, _US, status)
    if error_comment:
        body += _element(0x0902, _LO, error_comment[:64])
    if sop_instance_uid:
        body += _element(0x1000, _UI, sop_instance_uid)
    return _element(0x0000, _UL, len(body)) + body
