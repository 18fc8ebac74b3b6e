"""Upper-layer PDUs (PS3.8 9.3): A-ASSOCIATE-RQ parsing, AC/RJ/RP/ABORT/P-DATA encoding.

pynetdicom is the independent implementation on the other side of each check.
"""

from __future__ import annotations

import struct

import pytest
from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_items import PresentationContextItemAC, UserInformationItem
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import build_context

from dicomgate.dimse.negotiation import negotiate
from dicomgate.dimse.pdu import (
    APPLICATION_CONTEXT,
    AbortReason,
    AssociateRQ,
    ContextResult,
    PduError,
    PresentationContextAC,
    PresentationContextRQ,
    RejectReason,
    RejectResult,
    RejectSource,
    RoleSelection,
    encode_abort,
    encode_associate_ac,
    encode_associate_rj,
    encode_p_data,
    encode_release_rp,
    parse_associate_rq,
)

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


# -- hand-built A-ASSOCIATE-RQ -------------------------------------------------------------


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _context(context_id: int, abstract: str, syntaxes: list[str]) -> bytes:
    body = bytes([context_id, 0, 0, 0]) + _item(0x30, abstract.encode())
    body += b"".join(_item(0x40, ts.encode()) for ts in syntaxes)
    return _item(0x20, body)


def _rq_body(
    *,
    called: bytes = b"DICOMGATE".ljust(16),
    calling: bytes = b"STORESCU".ljust(16),
    items: bytes | None = None,
) -> bytes:
    """The body (no 6-byte header) of an A-ASSOCIATE-RQ (PS3.8 Table 9-11)."""
    if items is None:
        user = _item(0x51, struct.pack(">I", 16384))
        user += _item(0x52, b"1.2.826.0.1.3680043.9.3811")
        user += _item(0x53, struct.pack(">HH", 3, 1))
        uid = CT_STORAGE.encode()
        user += _item(0x54, struct.pack(">H", len(uid)) + uid + bytes([1, 0]))
        user += _item(0x55, b"HANDMADE_1")
        items = (
            _item(0x10, APPLICATION_CONTEXT.encode())
            + _context(1, CT_STORAGE, [EXPLICIT_LE, IMPLICIT_LE])
            + _context(3, VERIFICATION, [IMPLICIT_LE])
            + _item(0x50, user)
        )
    return struct.pack(">HH", 1, 0) + called + calling + bytes(32) + items


def test_parse_hand_built_rq() -> None:
    rq = parse_associate_rq(_rq_body())
    assert rq.protocol_version == 1
    assert rq.called_ae == "DICOMGATE"
    assert rq.calling_ae == "STORESCU"
    assert rq.raw_called_ae == b"DICOMGATE".ljust(16)
    assert rq.application_context == APPLICATION_CONTEXT
    assert [(c.context_id, c.abstract_syntax, c.transfer_syntaxes) for c in rq.contexts] == [
        (1, CT_STORAGE, [EXPLICIT_LE, IMPLICIT_LE]),
        (3, VERIFICATION, [IMPLICIT_LE]),
    ]
    assert rq.max_pdu_length == 16384
    assert rq.implementation_class_uid == "1.2.826.0.1.3680043.9.3811"
    assert rq.implementation_version_name == "HANDMADE_1"
    assert rq.async_ops == (3, 1)
    assert rq.roles == [RoleSelection(CT_STORAGE, True, False)]


def test_parse_rq_tolerates_padded_uids_and_unknown_items() -> None:
    items = (
        _item(0x10, APPLICATION_CONTEXT.encode() + b"\x00")
        + _item(0x77, b"ignored")  # unknown item types are ignored (PS3.8 9.3.1)
        + _context(1, CT_STORAGE + "\x00", [EXPLICIT_LE + "\x00"])
    )
    rq = parse_associate_rq(_rq_body(items=items))
    assert rq.application_context == APPLICATION_CONTEXT
    assert rq.contexts[0].abstract_syntax == CT_STORAGE
    assert rq.contexts[0].transfer_syntaxes == [EXPLICIT_LE]
    assert rq.max_pdu_length == 0  # no user information: no limit (PS3.8 D.1)


# -- an A-ASSOCIATE-RQ from pynetdicom ------------------------------------------------------


def _pynetdicom_rq() -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = "MODALITY"
    primitive.called_ae_title = "DICOMGATE"
    ct = build_context(CT_STORAGE, [EXPLICIT_LE, IMPLICIT_LE])
    ct.context_id = 1
    mr = build_context(MR_STORAGE, ["1.2.840.10008.1.2.4.80"])
    mr.context_id = 3
    echo = build_context(VERIFICATION, [IMPLICIT_LE])
    echo.context_id = 5
    primitive.presentation_context_definition_list = [ct, mr, echo]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 32768
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = "1.2.3.4.5"
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = "PYNETDICOM_TEST"
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = MR_STORAGE
    role.scu_role = True
    role.scp_role = True
    primitive.user_information = [max_length, class_uid, version, role]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    raw: bytes = pdu.encode()
    return raw


def test_parse_rq_from_pynetdicom() -> None:
    raw = _pynetdicom_rq()
    assert raw[0] == 0x01
    (length,) = struct.unpack_from(">I", raw, 2)
    assert length == len(raw) - 6
    rq = parse_associate_rq(raw[6:])
    assert rq.called_ae == "DICOMGATE"
    assert rq.calling_ae == "MODALITY"
    assert rq.application_context == APPLICATION_CONTEXT
    assert [(c.context_id, c.abstract_syntax, c.transfer_syntaxes) for c in rq.contexts] == [
        (1, CT_STORAGE, [EXPLICIT_LE, IMPLICIT_LE]),
        (3, MR_STORAGE, ["1.2.840.10008.1.2.4.80"]),
        (5, VERIFICATION, [IMPLICIT_LE]),
    ]
    assert rq.max_pdu_length == 32768
    assert rq.implementation_class_uid == "1.2.3.4.5"
    assert rq.implementation_version_name == "PYNETDICOM_TEST"
    assert rq.roles == [RoleSelection(MR_STORAGE, True, True)]


# -- A-ASSOCIATE-AC, decoded by pynetdicom --------------------------------------------------


def _decode_ac(raw: bytes) -> A_ASSOCIATE_AC:
    pdu = A_ASSOCIATE_AC()
    pdu.decode(raw)
    return pdu


def test_associate_ac_round_trip_through_pynetdicom() -> None:
    rq = parse_associate_rq(_pynetdicom_rq()[6:])
    contexts = [
        PresentationContextAC(1, ContextResult.ACCEPTANCE, EXPLICIT_LE),
        PresentationContextAC(3, ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED, IMPLICIT_LE),
        PresentationContextAC(5, ContextResult.ACCEPTANCE, IMPLICIT_LE),
    ]
    raw = encode_associate_ac(
        rq,
        contexts,
        max_pdu_length=262144,
        implementation_class_uid="2.25.1234",
        implementation_version_name="DICOMGATE_010",
        roles=[RoleSelection(MR_STORAGE, True, False)],
    )
    assert raw[0] == 0x02
    assert struct.unpack_from(">I", raw, 2)[0] == len(raw) - 6

    ac = _decode_ac(raw)
    assert ac.protocol_version == 1
    assert ac.application_context_name == APPLICATION_CONTEXT
    # PS3.8 Table 9-17: the reserved fields echo the request's AE titles.
    assert ac.called_ae_title.strip() == "DICOMGATE"
    assert ac.calling_ae_title.strip() == "MODALITY"

    items = [i for i in ac.variable_items if isinstance(i, PresentationContextItemAC)]
    assert [(i.context_id, i.result, i.transfer_syntax) for i in items] == [
        (1, 0, EXPLICIT_LE),
        (3, 4, IMPLICIT_LE),
        (5, 0, IMPLICIT_LE),
    ]
    (user,) = [i for i in ac.variable_items if isinstance(i, UserInformationItem)]
    assert user.maximum_length == 262144
    assert user.implementation_class_uid == "2.25.1234"
    assert user.implementation_version_name == "DICOMGATE_010"
    role = user.role_selection[UID(MR_STORAGE)]
    assert (role.scu_role, role.scp_role) == (True, False)

    primitive = ac.to_primitive()
    assert [c.context_id for c in primitive.presentation_context_definition_results_list] == [
        1,
        3,
        5,
    ]


def test_associate_ac_keeps_raw_ae_bytes() -> None:
    rq = parse_associate_rq(_rq_body(called=b"  ODD TITLE     ", calling=b"X".ljust(16)))
    raw = encode_associate_ac(
        rq, [], max_pdu_length=0, implementation_class_uid="1.2", implementation_version_name="V"
    )
    assert raw[10:26] == b"  ODD TITLE     "
    assert raw[26:42] == b"X".ljust(16)
    assert raw[42:74] == bytes(32)
    assert _decode_ac(raw).variable_items  # pynetdicom still decodes it


def test_every_ac_context_has_a_transfer_syntax_subitem() -> None:
    rq = AssociateRQ(called_ae="A", calling_ae="B", raw_called_ae=b"A".ljust(16))
    rq.raw_calling_ae = b"B".ljust(16)
    answers = negotiate([PresentationContextRQ(2, CT_STORAGE, [EXPLICIT_LE])])
    raw = encode_associate_ac(
        rq,
        answers,
        max_pdu_length=0,
        implementation_class_uid="1.2",
        implementation_version_name="V",
    )
    items = [i for i in _decode_ac(raw).variable_items if isinstance(i, PresentationContextItemAC)]
    assert len(items) == 1
    assert items[0].result != 0
    assert items[0].transfer_syntax is not None


# -- fixed PDUs, byte-exact (PS3.8 9.3.4, 9.3.7, 9.3.8) ------------------------------------


def test_associate_rj_bytes() -> None:
    raw = encode_associate_rj(
        RejectResult.PERMANENT, RejectSource.SERVICE_USER, RejectReason.CALLED_AE_NOT_RECOGNIZED
    )
    # type 03, reserved, length 4, reserved, result, source, reason
    assert raw == bytes([0x03, 0x00, 0, 0, 0, 4, 0x00, 0x01, 0x01, 0x07])


def test_associate_rj_transient_presentation() -> None:
    raw = encode_associate_rj(
        RejectResult.TRANSIENT,
        RejectSource.SERVICE_PROVIDER_PRESENTATION,
        RejectReason.LOCAL_LIMIT_EXCEEDED,
    )
    assert raw == bytes([0x03, 0x00, 0, 0, 0, 4, 0x00, 0x02, 0x03, 0x02])


def test_release_rp_bytes() -> None:
    assert encode_release_rp() == bytes([0x06, 0x00, 0, 0, 0, 4, 0, 0, 0, 0])


def test_abort_bytes() -> None:
    # type 07, reserved, length 4, reserved, reserved, source, reason/diag
    assert encode_abort() == bytes([0x07, 0x00, 0, 0, 0, 4, 0, 0, 0x02, 0x00])
    assert encode_abort(AbortReason.UNEXPECTED_PDU) == bytes(
        [0x07, 0x00, 0, 0, 0, 4, 0, 0, 0x02, 0x02]
    )
    assert encode_abort(AbortReason.NOT_SPECIFIED, source=0) == bytes(
        [0x07, 0x00, 0, 0, 0, 4, 0, 0, 0x00, 0x00]
    )


# -- P-DATA-TF fragmentation ---------------------------------------------------------------


def _split_p_data(raw: bytes) -> list[tuple[int, int, int, bytes]]:
    """[(pdu body length, context id, control header, fragment)], one PDV per PDU."""
    out = []
    pos = 0
    while pos < len(raw):
        pdu_type, _, length = struct.unpack_from(">BBI", raw, pos)
        assert pdu_type == 0x04
        body = raw[pos + 6 : pos + 6 + length]
        assert len(body) == length
        (pdv_length,) = struct.unpack_from(">I", body, 0)
        assert pdv_length == length - 4  # a single PDV fills the PDU
        out.append((length, body[4], body[5], body[6:]))
        pos += 6 + length
    return out


@pytest.mark.parametrize("max_pdu", [16, 100, 1000, 16384])
@pytest.mark.parametrize("size", [0, 1, 9, 10, 11, 994, 995, 5000])
@pytest.mark.parametrize("command", [True, False])
def test_p_data_fragmentation(max_pdu: int, size: int, command: bool) -> None:
    payload = bytes(i % 251 for i in range(size))
    pdus = _split_p_data(encode_p_data(3, payload, command=command, max_pdu_length=max_pdu))
    assert b"".join(p[3] for p in pdus) == payload
    for i, (length, context_id, control, _) in enumerate(pdus):
        assert length <= max_pdu  # PS3.8 D.1: the limit is on the PDU's variable field
        assert context_id == 3
        assert control & 0x01 == (1 if command else 0)
        assert bool(control & 0x02) == (i == len(pdus) - 1)  # last-fragment bit
        assert control & 0xFC == 0
    if size:
        assert all(p[3] for p in pdus)  # no empty fragments
        assert len(pdus) == -(-size // (max_pdu - 6))  # as few PDUs as the limit allows


@pytest.mark.parametrize("max_pdu", [1, 5, 6, -1])
def test_p_data_refuses_a_limit_that_cannot_carry_data(max_pdu: int) -> None:
    # A PDV item header is 6 bytes (PS3.8 9.3.5): never a PDU larger than the peer accepts
    # (it used to fall back to 1 MiB fragments).
    with pytest.raises(ValueError, match="cannot carry"):
        encode_p_data(1, b"abc", command=True, max_pdu_length=max_pdu)


def test_p_data_smallest_limit_carries_one_byte_per_pdu() -> None:
    pdus = _split_p_data(encode_p_data(1, b"abc", command=False, max_pdu_length=7))
    assert [(p[0], p[3]) for p in pdus] == [(7, b"a"), (7, b"b"), (7, b"c")]
    assert [p[2] for p in pdus] == [0, 0, 2]


def test_p_data_unlimited_uses_one_pdu_for_small_payload() -> None:
    pdus = _split_p_data(encode_p_data(1, b"x" * 70000, command=False, max_pdu_length=0))
    assert len(pdus) == 1
    assert pdus[0][2] == 0x02


# -- malformed A-ASSOCIATE-RQ --------------------------------------------------------------


def test_rq_shorter_than_fixed_fields() -> None:
    with pytest.raises(PduError):
        parse_associate_rq(_rq_body()[:67])
    with pytest.raises(PduError):
        parse_associate_rq(b"")


def test_rq_item_length_past_end() -> None:
    body = bytearray(_rq_body())
    # The application context item is the first variable item, at offset 68.
    body[70:72] = struct.pack(">H", 0xFFF0)
    with pytest.raises(PduError, match="past"):
        parse_associate_rq(bytes(body))


def test_rq_truncated_in_item_header() -> None:
    with pytest.raises(PduError):
        parse_associate_rq(_rq_body() + b"\x20\x00")


def test_rq_truncated_inside_presentation_context() -> None:
    context = _context(1, CT_STORAGE, [EXPLICIT_LE])
    # The item's own length still fits, but a sub-item inside it claims more.
    broken = bytearray(context)
    broken[10:12] = struct.pack(">H", 200)  # abstract syntax sub-item length
    items = _item(0x10, APPLICATION_CONTEXT.encode()) + bytes(broken)
    with pytest.raises(PduError):
        parse_associate_rq(_rq_body(items=items))


def test_rq_presentation_context_item_too_short() -> None:
    items = _item(0x10, APPLICATION_CONTEXT.encode()) + _item(0x20, b"\x01\x00")
    with pytest.raises(PduError):
        parse_associate_rq(_rq_body(items=items))


def test_rq_without_application_context() -> None:
    items = _context(1, CT_STORAGE, [EXPLICIT_LE]) + _item(0x50, b"")
    with pytest.raises(PduError, match="application context"):
        parse_associate_rq(_rq_body(items=items))


def test_rq_with_a_presentation_context_id_twice() -> None:
    # PS3.8 9.3.2.2: a context ID identifies one presentation context of the association;
    # an A-ASSOCIATE-AC answering two contexts of one ID could not say which is which.
    items = (
        _item(0x10, APPLICATION_CONTEXT.encode())
        + _context(1, VERIFICATION, [IMPLICIT_LE])
        + _context(1, CT_STORAGE, [EXPLICIT_LE])
        + _item(0x50, _item(0x51, struct.pack(">I", 16384)))
    )
    with pytest.raises(PduError, match="presentation context ID 1 proposed twice") as info:
        parse_associate_rq(_rq_body(items=items))
    assert info.value.reason == AbortReason.INVALID_PDU_PARAMETER_VALUE


def test_pdu_error_carries_abort_reason() -> None:
    with pytest.raises(PduError) as info:
        parse_associate_rq(b"\x00" * 10)
    assert info.value.reason in set(AbortReason)


# -- role selection and extended negotiation (issue #5) ------------------------------------

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def _user_info_rq(sub_items: bytes) -> bytes:
    body = struct.pack(">HH", 1, 0) + b"DICOMGATE".ljust(16) + b"GETSCU".ljust(16) + bytes(32)
    body += _item(0x10, APPLICATION_CONTEXT.encode())
    body += _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, CT_STORAGE.encode()))
    body += _item(0x50, _item(0x51, struct.pack(">I", 16384)) + sub_items)
    return body


def test_role_selection_and_extended_negotiation_are_parsed() -> None:
    uid = CT_STORAGE.encode()
    find = STUDY_ROOT_FIND.encode()
    rq = parse_associate_rq(
        _user_info_rq(
            _item(0x54, struct.pack(">H", len(uid)) + uid + bytes([0, 1]))
            + _item(0x56, struct.pack(">H", len(find)) + find + bytes([0, 1, 1]))
        )
    )
    assert rq.roles == [RoleSelection(CT_STORAGE, False, True)]
    assert [(e.sop_class_uid, e.info) for e in rq.extended] == [(STUDY_ROOT_FIND, b"\x00\x01\x01")]


@pytest.mark.parametrize(
    "sub",
    [
        _item(0x54, b"\x00"),  # shorter than its fixed fields
        _item(0x54, struct.pack(">H", 40) + b"1.2" + b"\x00\x01"),  # UID length runs over
        _item(0x56, struct.pack(">H", 40) + b"1.2"),
    ],
)
def test_malformed_negotiation_sub_items_are_refused(sub: bytes) -> None:
    with pytest.raises(PduError):
        parse_associate_rq(_user_info_rq(sub))


def test_ac_carries_role_and_extended_answers_for_pynetdicom() -> None:
    from pynetdicom.pdu_items import (
        SCP_SCU_RoleSelectionSubItem,
        SOPClassExtendedNegotiationSubItem,
    )

    from dicomgate.dimse.pdu import ExtendedNegotiation

    rq = parse_associate_rq(_user_info_rq(b""))
    raw = encode_associate_ac(
        rq,
        [PresentationContextAC(1, ContextResult.ACCEPTANCE, EXPLICIT_LE)],
        max_pdu_length=16384,
        implementation_class_uid="1.2.3",
        implementation_version_name="DG",
        roles=[RoleSelection(CT_STORAGE, False, True)],
        extended=[ExtendedNegotiation(STUDY_ROOT_FIND, bytes([0, 1, 1, 0]))],
    )
    ac = A_ASSOCIATE_AC()
    ac.decode(raw)
    user = next(i for i in ac.variable_items if isinstance(i, UserInformationItem))
    role = next(i for i in user.user_data if isinstance(i, SCP_SCU_RoleSelectionSubItem))
    assert (role.uid, role.scu_role, role.scp_role) == (UID(CT_STORAGE), False, True)
    ext = next(i for i in user.user_data if isinstance(i, SOPClassExtendedNegotiationSubItem))
    assert ext.sop_class_uid == UID(STUDY_ROOT_FIND)
    assert ext.service_class_application_information == bytes([0, 1, 1, 0])


def test_pdv_pdu_encoding() -> None:
    from dicomgate.dimse.pdu import encode_pdv_pdu

    raw = encode_pdv_pdu(3, b"abcd", command=False, last=True)
    assert raw == struct.pack(">BBIIBB", 4, 0, 10, 6, 3, 2) + b"abcd"
    assert encode_pdv_pdu(1, b"", command=True, last=False)[-1] == 1


def test_pdv_pdu_header_is_the_encoded_pdu_without_its_fragment() -> None:
    from dicomgate.dimse.pdu import encode_pdv_pdu, pdv_pdu_header

    fragment = memoryview(bytes(range(200)))[17:117]
    header = pdv_pdu_header(5, len(fragment), command=False, last=False)
    assert header + bytes(fragment) == encode_pdv_pdu(5, fragment, command=False, last=False)
    assert header == struct.pack(">BBIIBB", 4, 0, 106, 102, 5, 0)
