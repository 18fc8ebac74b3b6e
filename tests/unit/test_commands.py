"""DIMSE command sets (PS3.7 9.3, Annex E): decode pynetdicom's, encode ours for pydicom."""

from __future__ import annotations

import struct
from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode

from dicomgate.dimse.commands import (
    CommandError,
    CommandField,
    Status,
    decode_command,
    encode_response,
)

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"


def _encode_command(command_set: Dataset) -> bytes:
    raw = encode(command_set, True, True)
    assert raw is not None
    return raw


def _store_rq(with_dataset: bool = True, move_originator: bool = False) -> bytes:
    primitive = C_STORE()
    primitive.MessageID = 7
    primitive.AffectedSOPClassUID = CT_STORAGE
    primitive.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"  # odd length: padded
    primitive.Priority = 2  # LOW
    if move_originator:
        primitive.MoveOriginatorApplicationEntityTitle = "MOVER"
        primitive.MoveOriginatorMessageID = 3
    if with_dataset:
        primitive.DataSet = BytesIO(b"\x08\x00\x16\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return _encode_command(message.command_set)


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, element, len(value)) + value


def test_decode_c_store_rq_from_pynetdicom() -> None:
    command = decode_command(_store_rq())
    assert command.command_field == CommandField.C_STORE_RQ
    assert command.message_id == 7
    assert command.affected_sop_class_uid == CT_STORAGE
    assert command.affected_sop_instance_uid == "1.2.826.0.1.3680043.8.498.1"
    assert command.priority == 2
    assert command.has_dataset is True
    assert command.move_originator_ae == ""
    assert command.move_originator_message_id is None


def test_decode_c_store_rq_with_move_originator() -> None:
    command = decode_command(_store_rq(move_originator=True))
    assert command.move_originator_ae == "MOVER"
    assert command.move_originator_message_id == 3


def test_decode_command_without_dataset() -> None:
    assert decode_command(_store_rq(with_dataset=False)).has_dataset is False


def test_decode_c_echo_rq_from_pynetdicom() -> None:
    primitive = C_ECHO()
    primitive.MessageID = 65535
    primitive.AffectedSOPClassUID = VERIFICATION
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    command = decode_command(_encode_command(message.command_set))
    assert command.command_field == CommandField.C_ECHO_RQ
    assert command.message_id == 65535
    assert command.affected_sop_class_uid == VERIFICATION
    assert command.has_dataset is False


def test_decode_skips_unknown_group_0000_elements() -> None:
    raw = _element(0x0100, struct.pack("<H", 0x0030)) + _element(0x0110, struct.pack("<H", 5))
    raw += _element(0x5010, b"legacy")  # retired Message Set ID
    command = decode_command(raw)
    assert (command.command_field, command.message_id) == (0x0030, 5)


# -- decode errors -------------------------------------------------------------------------


def test_decode_element_past_end() -> None:
    raw = _element(0x0100, struct.pack("<H", 1))
    raw += struct.pack("<HHI", 0, 0x1000, 64) + b"1.2.3"
    with pytest.raises(CommandError, match="past the end"):
        decode_command(raw)


def test_decode_truncated_element_header() -> None:
    raw = _element(0x0100, struct.pack("<H", 1)) + b"\x00\x00\x10"
    with pytest.raises(CommandError, match="header"):
        decode_command(raw)


def test_decode_truncated_pynetdicom_command() -> None:
    raw = _store_rq()
    with pytest.raises(CommandError):
        decode_command(raw[:-3])


@pytest.mark.parametrize("value", [b"", b"\x01", b"\x01\x00\x00\x00"])
def test_decode_wrong_us_length(value: bytes) -> None:
    with pytest.raises(CommandError, match="US"):
        decode_command(_element(0x0100, value))


def test_decode_wrong_ul_length() -> None:
    raw = _element(0x0000, b"\x04\x00") + _element(0x0100, struct.pack("<H", 1))
    with pytest.raises(CommandError, match="UL"):
        decode_command(raw)


def test_decode_element_outside_group_0000() -> None:
    raw = _element(0x0100, struct.pack("<H", 1))
    raw += struct.pack("<HHI", 0x0008, 0x0016, 2) + b"1\x00"
    with pytest.raises(CommandError, match="group 0000"):
        decode_command(raw)


def test_decode_without_command_field() -> None:
    raw = _element(0x0110, struct.pack("<H", 1)) + _element(0x0002, b"1.2.3\x00")
    with pytest.raises(CommandError, match="CommandField"):
        decode_command(raw)
    with pytest.raises(CommandError):
        decode_command(b"")


# -- encode_response, read back by pydicom -------------------------------------------------


def _read(raw: bytes) -> Dataset:
    return read_dataset(BytesIO(raw), is_implicit_VR=True, is_little_endian=True)


def _check_group_length(raw: bytes) -> None:
    tag, length, value = struct.unpack_from("<III", raw, 0)
    assert tag == 0x0000_0000
    assert length == 4
    assert value == len(raw) - 12


def test_encode_c_store_rsp() -> None:
    raw = encode_response(
        CommandField.C_STORE_RSP,
        7,
        Status.SUCCESS,
        sop_class_uid=CT_STORAGE,
        sop_instance_uid="1.2.826.0.1.3680043.8.498.1",
    )
    _check_group_length(raw)
    ds = _read(raw)
    assert ds.CommandGroupLength == len(raw) - 12
    assert ds.CommandField == 0x8001
    assert ds.MessageIDBeingRespondedTo == 7
    assert ds.CommandDataSetType == 0x0101
    assert ds.Status == 0x0000
    assert ds.AffectedSOPClassUID == CT_STORAGE
    assert ds.AffectedSOPInstanceUID == "1.2.826.0.1.3680043.8.498.1"
    assert "ErrorComment" not in ds
    assert "MessageID" not in ds
    # PS3.5 7.1: elements in ascending tag order, each value of even length.
    tags = [elem.tag for elem in ds]
    assert tags == sorted(tags)
    assert len(raw) % 2 == 0


def test_encode_c_echo_rsp_minimal() -> None:
    raw = encode_response(CommandField.C_ECHO_RSP, 65535, Status.SUCCESS)
    _check_group_length(raw)
    ds = _read(raw)
    assert ds.CommandField == 0x8030
    assert ds.MessageIDBeingRespondedTo == 65535
    assert "AffectedSOPClassUID" not in ds
    assert "AffectedSOPInstanceUID" not in ds


def test_encode_failure_with_error_comment() -> None:
    comment = "x" * 100  # LO: at most 64 characters
    raw = encode_response(
        CommandField.C_STORE_RSP, 9, Status.CANNOT_UNDERSTAND, error_comment=comment
    )
    _check_group_length(raw)
    ds = _read(raw)
    assert ds.Status == 0xC000
    assert ds.ErrorComment == "x" * 64


def test_encode_odd_error_comment_is_padded() -> None:
    raw = encode_response(
        CommandField.C_STORE_RSP, 1, Status.OUT_OF_RESOURCES, error_comment="full"
    )
    assert _read(raw).ErrorComment == "full"
    raw = encode_response(CommandField.C_STORE_RSP, 1, Status.OUT_OF_RESOURCES, error_comment="odd")
    _check_group_length(raw)
    assert _read(raw).ErrorComment == "odd"


def test_encoded_response_decodes_with_our_decoder() -> None:
    raw = encode_response(
        CommandField.C_STORE_RSP, 12, Status.DUPLICATE_SOP_INSTANCE, sop_class_uid=CT_STORAGE
    )
    command = decode_command(raw)
    assert command.command_field == CommandField.C_STORE_RSP
    assert command.affected_sop_class_uid == CT_STORAGE
    assert command.has_dataset is False


# -- Query/Retrieve commands (issue #5) ----------------------------------------------------

STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"


def test_decode_c_move_rq_and_c_cancel_from_pynetdicom() -> None:
    from pynetdicom.dimse_messages import C_CANCEL_RQ, C_MOVE_RQ
    from pynetdicom.dimse_primitives import C_CANCEL, C_MOVE

    primitive = C_MOVE()
    primitive.MessageID = 9
    primitive.AffectedSOPClassUID = STUDY_ROOT_MOVE
    primitive.Priority = 0
    primitive.MoveDestination = "ARCHIVE"
    primitive.Identifier = BytesIO(b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ")
    message = C_MOVE_RQ()
    message.primitive_to_message(primitive)
    command = decode_command(_encode_command(message.command_set))
    assert command.command_field == CommandField.C_MOVE_RQ
    assert command.move_destination == "ARCHIVE"
    assert command.has_dataset is True

    cancel = C_CANCEL()
    cancel.MessageIDBeingRespondedTo = 9
    message = C_CANCEL_RQ()
    message.primitive_to_message(cancel)
    command = decode_command(_encode_command(message.command_set))
    assert command.command_field == CommandField.C_CANCEL_RQ
    assert command.message_id_responded_to == 9


def test_encode_move_response_with_counts_reads_in_pydicom() -> None:
    from dicomgate.dimse.commands import SubOperations

    raw = encode_response(
        CommandField.C_MOVE_RSP,
        9,
        Status.PENDING,
        sop_class_uid=STUDY_ROOT_MOVE,
        suboperations=SubOperations(3, 10, 1, 2),
    )
    ds = read_dataset(BytesIO(raw), True, True)
    assert ds.CommandField == 0x8021 and ds.Status == 0xFF00
    assert ds.CommandDataSetType == 0x0101
    assert (
        ds.NumberOfRemainingSuboperations,
        ds.NumberOfCompletedSuboperations,
        ds.NumberOfFailedSuboperations,
        ds.NumberOfWarningSuboperations,
    ) == (3, 10, 1, 2)
    final = read_dataset(
        BytesIO(
            encode_response(
                CommandField.C_MOVE_RSP,
                9,
                Status.SUBOPERATIONS_WITH_FAILURES,
                suboperations=SubOperations(None, 10, 1),
                has_dataset=True,
            )
        ),
        True,
        True,
    )
    assert "NumberOfRemainingSuboperations" not in final  # PS3.4 C.4.2.3.1
    assert final.CommandDataSetType != 0x0101
    assert final.CommandGroupLength == len(raw) - 12 or final.CommandGroupLength > 0


def test_encode_error_response_with_offending_element() -> None:
    raw = encode_response(
        CommandField.C_FIND_RSP,
        2,
        Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
        error_comment="no Query/Retrieve Level (0008,0052)",
        offending_elements=[0x00080052],
    )
    ds = read_dataset(BytesIO(raw), True, True)
    assert ds.OffendingElement == 0x00080052
    assert ds.ErrorComment == "no Query/Retrieve Level (0008,0052)"
    decoded = decode_command(raw)
    assert decoded.status == 0xA900
    assert decoded.message_id_responded_to == 2


def test_encode_store_rq_decodes_in_both() -> None:
    from dicomgate.dimse.commands import encode_store_rq

    raw = encode_store_rq(
        4, CT_STORAGE, "1.2.3.4", move_originator_ae="MOVER", move_originator_message_id=8
    )
    ds = read_dataset(BytesIO(raw), True, True)
    assert ds.CommandGroupLength == len(raw) - 12
    assert ds.MoveOriginatorApplicationEntityTitle == "MOVER"
    command = decode_command(raw)
    assert (command.command_field, command.message_id, command.has_dataset) == (1, 4, True)
    assert command.affected_sop_instance_uid == "1.2.3.4"
    assert command.move_originator_message_id == 8
