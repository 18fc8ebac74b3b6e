"""Association acceptance policy: calling AE patterns and presentation context answers."""

from __future__ import annotations

import pytest

from dicomgate.dimse.negotiation import (
    QR_SOP_CLASSES,
    QRModel,
    QRService,
    ae_matches,
    is_storage_class,
    negotiate,
    negotiate_extended,
    negotiate_roles,
)
from dicomgate.dimse.pdu import (
    ContextResult,
    ExtendedNegotiation,
    PresentationContextRQ,
    RoleSelection,
)

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
WORKLIST_FIND = "1.2.840.10008.5.1.4.31"
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
PRIVATE_SOP = "1.3.6.1.4.1.99999.1.2.3"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG_LS = "1.2.840.10008.1.2.4.80"
UNKNOWN_TS = "1.3.6.1.4.1.99999.9.9"


# -- ae_matches ----------------------------------------------------------------------------


def test_empty_pattern_list_matches_any() -> None:
    assert ae_matches("ANYTHING", [])
    assert ae_matches("", [])
    assert ae_matches("CT1", iter([]))


@pytest.mark.parametrize(
    ("title", "patterns", "expected"),
    [
        ("CT1", ["CT*"], True),
        ("CT", ["CT*"], True),
        ("MRCT", ["CT*"], False),
        ("MR_1", ["MR_?"], True),
        ("MR_12", ["MR_?"], False),
        ("MR_", ["MR_?"], False),
        ("PACS", ["CT*", "PACS"], True),
        ("PACSX", ["PACS"], False),
        ("X", ["*"], True),
        ("STORESCU", ["STORE?CU"], True),
    ],
)
def test_wildcards(title: str, patterns: list[str], expected: bool) -> None:
    assert ae_matches(title, patterns) is expected


def test_matching_is_case_sensitive() -> None:
    assert not ae_matches("ct1", ["CT*"])
    assert not ae_matches("CT1", ["ct*"])
    assert ae_matches("ct1", ["ct*"])


def test_pattern_spaces_are_not_significant() -> None:
    assert ae_matches("PACS", [" PACS "])


def test_brackets_are_literal() -> None:
    assert ae_matches("SITE[1]", ["SITE[1]"])
    assert not ae_matches("SITE1", ["SITE[1]"])


# -- negotiate -----------------------------------------------------------------------------


def _one(abstract: str, syntaxes: list[str], context_id: int = 1) -> tuple[int, ContextResult, str]:
    (answer,) = negotiate([PresentationContextRQ(context_id, abstract, syntaxes)])
    return answer.context_id, answer.result, answer.transfer_syntax


def test_storage_class_accepted_with_first_supported_syntax() -> None:
    assert _one(CT_STORAGE, [UNKNOWN_TS, JPEG_LS, EXPLICIT_LE]) == (
        1,
        ContextResult.ACCEPTANCE,
        JPEG_LS,
    )
    assert _one(CT_STORAGE, [EXPLICIT_LE, IMPLICIT_LE]) == (
        1,
        ContextResult.ACCEPTANCE,
        EXPLICIT_LE,
    )


@pytest.mark.parametrize(
    "syntax",
    [
        "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
        "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
        "1.2.840.10008.1.2.5",  # RLE Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.55",  # retired JPEG process
    ],
)
def test_stored_as_received_syntaxes_are_accepted(syntax: str) -> None:
    assert _one(CT_STORAGE, [syntax])[1:] == (ContextResult.ACCEPTANCE, syntax)


def test_verification_accepted() -> None:
    assert _one(VERIFICATION, [IMPLICIT_LE], context_id=3) == (
        3,
        ContextResult.ACCEPTANCE,
        IMPLICIT_LE,
    )


@pytest.mark.parametrize("abstract", [WORKLIST_FIND, STORAGE_COMMITMENT])
def test_non_storage_service_rejected(abstract: str) -> None:
    _, result, _ = _one(abstract, [IMPLICIT_LE])
    assert result == ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED
    assert not is_storage_class(abstract)


@pytest.mark.parametrize(
    "abstract",
    [
        "1.2.840.10008.5.1.4.38.2",  # Hanging Protocol Information Model - FIND
        "1.2.840.10008.5.1.4.39.3",  # Color Palette Information Model - MOVE
        "1.2.840.10008.5.1.4.43.4",  # Generic Implant Template Information Model - GET
    ],
)
def test_other_query_retrieve_models_rejected(abstract: str) -> None:
    _, result, _ = _one(abstract, [IMPLICIT_LE])
    assert result == ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED


@pytest.mark.parametrize(
    "abstract",
    [
        "1.2.840.10008.5.1.4.38.1",  # Hanging Protocol Storage
        "1.2.840.10008.5.1.4.1.1.200.1",  # CT Defined Procedure Protocol Storage
        "1.2.840.10008.5.1.4.1.1.201.1",  # Inventory Storage
    ],
)
def test_non_patient_storage_classes_accepted(abstract: str) -> None:
    assert _one(abstract, [EXPLICIT_LE])[1] == ContextResult.ACCEPTANCE


def test_unknown_private_sop_class_accepted_as_storage() -> None:
    assert is_storage_class(PRIVATE_SOP)
    assert _one(PRIVATE_SOP, [EXPLICIT_LE]) == (1, ContextResult.ACCEPTANCE, EXPLICIT_LE)


def test_empty_abstract_syntax_rejected() -> None:
    assert _one("", [IMPLICIT_LE])[1] == ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED


def test_only_unknown_transfer_syntaxes() -> None:
    _, result, _ = _one(CT_STORAGE, [UNKNOWN_TS, "1.2.3"])
    assert result == ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED
    _, result, _ = _one(VERIFICATION, [UNKNOWN_TS])
    assert result == ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED


def test_no_transfer_syntax_proposed() -> None:
    assert _one(CT_STORAGE, [])[1] == ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED


def test_even_context_id_not_accepted() -> None:
    context_id, result, _ = _one(CT_STORAGE, [EXPLICIT_LE], context_id=2)
    assert context_id == 2
    assert result != ContextResult.ACCEPTANCE


def test_answers_keep_order_and_ids() -> None:
    answers = negotiate(
        [
            PresentationContextRQ(1, CT_STORAGE, [EXPLICIT_LE]),
            PresentationContextRQ(3, STUDY_ROOT_FIND, [IMPLICIT_LE]),
            PresentationContextRQ(5, VERIFICATION, [IMPLICIT_LE]),
            PresentationContextRQ(7, CT_STORAGE, [UNKNOWN_TS]),
        ]
    )
    assert [(a.context_id, a.result) for a in answers] == [
        (1, ContextResult.ACCEPTANCE),
        (3, ContextResult.ACCEPTANCE),
        (5, ContextResult.ACCEPTANCE),
        (7, ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED),
    ]
    assert negotiate([]) == []


# -- Query/Retrieve (issue #5) -------------------------------------------------------------

PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ONLY_FIND = "1.2.840.10008.5.1.4.1.2.3.1"


@pytest.mark.parametrize(
    "abstract", [STUDY_ROOT_FIND, PATIENT_ROOT_MOVE, PATIENT_ROOT_GET, STUDY_ONLY_FIND]
)
def test_query_retrieve_accepted_in_uncompressed_little_endian(abstract: str) -> None:
    assert not is_storage_class(abstract)
    assert _one(abstract, [JPEG_LS, EXPLICIT_LE, IMPLICIT_LE]) == (
        1,
        ContextResult.ACCEPTANCE,
        EXPLICIT_LE,
    )
    _, result, _ = _one(abstract, [JPEG_LS])
    assert result == ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED


def test_query_retrieve_models_and_services() -> None:
    assert QR_SOP_CLASSES[STUDY_ROOT_FIND] == (QRModel.STUDY_ROOT, QRService.FIND)
    assert QR_SOP_CLASSES[PATIENT_ROOT_MOVE] == (QRModel.PATIENT_ROOT, QRService.MOVE)
    assert "PATIENT" not in QRModel.STUDY_ROOT.value
    assert QRModel.PATIENT_STUDY_ONLY.value == ("PATIENT", "STUDY")


def test_roles_grant_scp_for_accepted_storage_classes_only() -> None:
    answers = negotiate_roles(
        [
            RoleSelection(CT_STORAGE, False, True),
            RoleSelection(CT_STORAGE, True, True),  # a second item for a class: ignored
            RoleSelection(STUDY_ROOT_FIND, True, True),  # no SCP role for a Q/R class
            RoleSelection(PRIVATE_SOP, False, True),  # not proposed in a context
        ],
        [CT_STORAGE, STUDY_ROOT_FIND],
    )
    assert answers == [
        RoleSelection(CT_STORAGE, False, True),
        RoleSelection(STUDY_ROOT_FIND, True, False),
    ]


def test_extended_negotiation_answers_find_options() -> None:
    answers = negotiate_extended(
        [
            ExtendedNegotiation(STUDY_ROOT_FIND, bytes([1, 1, 1, 1])),
            ExtendedNegotiation(PATIENT_ROOT_MOVE, bytes([1])),  # relational retrieval: no
        ],
        [STUDY_ROOT_FIND, PATIENT_ROOT_MOVE],
    )
    assert answers == [ExtendedNegotiation(STUDY_ROOT_FIND, bytes([0, 1, 1, 0]))]
    short = negotiate_extended([ExtendedNegotiation(STUDY_ROOT_FIND, b"\x01")], [STUDY_ROOT_FIND])
    assert short == [ExtendedNegotiation(STUDY_ROOT_FIND, b"\x00")]
