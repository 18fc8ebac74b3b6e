"""Association acceptance policy: which AEs, SOP classes and transfer syntaxes we accept."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from enum import Enum

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import sop_class

from dicomgate.dimse.pdu import (
    ContextResult,
    ExtendedNegotiation,
    PresentationContextAC,
    PresentationContextRQ,
    RoleSelection,
)
from dicomgate.store.scan import ACCEPTED_TRANSFER_SYNTAXES

VERIFICATION = "1.2.840.10008.1.1"


class QRModel(Enum):
    """Query/Retrieve information models (PS3.4 C.6) and the levels each one has."""

    PATIENT_ROOT = ("PATIENT", "STUDY", "SERIES", "IMAGE")
    STUDY_ROOT = ("STUDY", "SERIES", "IMAGE")
    PATIENT_STUDY_ONLY = ("PATIENT", "STUDY")  # retired (PS3.4 2004), still sent by old SCUs


class QRService(Enum):
    FIND = "find"
    MOVE = "move"
    GET = "get"


# The Q/R SOP classes we serve (PS3.4 C.6.1.2, C.6.2.2, C.6.3.2 (retired)).
QR_SOP_CLASSES: dict[str, tuple[QRModel, QRService]] = {
    "1.2.840.10008.5.1.4.1.2.1.1": (QRModel.PATIENT_ROOT, QRService.FIND),
    "1.2.840.10008.5.1.4.1.2.1.2": (QRModel.PATIENT_ROOT, QRService.MOVE),
    "1.2.840.10008.5.1.4.1.2.1.3": (QRModel.PATIENT_ROOT, QRService.GET),
    "1.2.840.10008.5.1.4.1.2.2.1": (QRModel.STUDY_ROOT, QRService.FIND),
    "1.2.840.10008.5.1.4.1.2.2.2": (QRModel.STUDY_ROOT, QRService.MOVE),
    "1.2.840.10008.5.1.4.1.2.2.3": (QRModel.STUDY_ROOT, QRService.GET),
    "1.2.840.10008.5.1.4.1.2.3.1": (QRModel.PATIENT_STUDY_ONLY, QRService.FIND),
    "1.2.840.10008.5.1.4.1.2.3.2": (QRModel.PATIENT_STUDY_ONLY, QRService.MOVE),
    "1.2.840.10008.5.1.4.1.2.3.3": (QRModel.PATIENT_STUDY_ONLY, QRService.GET),
}

# Identifiers are small and decoded with pydicom: the two uncompressed little-endian syntaxes
# every Q/R SCU proposes (Implicit VR Little Endian is the default, PS3.5 10.1).
QR_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]
)


# Service classes that are not storage: refused until their SCP exists (Q/R: issue #5).
_NOT_STORAGE: frozenset[str] = frozenset(
    str(uid)
    for group in (
        sop_class._QR_CLASSES,
        sop_class._BASIC_WORKLIST_CLASSES,
        sop_class._STORAGE_COMMITMENT_CLASSES,
        sop_class._PRINT_MANAGEMENT_CLASSES,
        sop_class._PROCEDURE_STEP_CLASSES,
        sop_class._UNIFIED_PROCEDURE_STEP_CLASSES,
        sop_class._RELEVANT_PATIENT_QUERY_CLASSES,
        sop_class._SUBSTANCE_ADMINISTRATION_CLASSES,
        sop_class._APPLICATION_EVENT_CLASSES,
        sop_class._INSTANCE_AVAILABILITY_CLASSES,
        sop_class._MEDIA_CREATION_CLASSES,
        sop_class._DISPLAY_SYSTEM_CLASSES,
        sop_class._RT_MACHINE_VERIFICATION_CLASSES,
        sop_class._STORAGE_MANAGEMENT_CLASSES,
        sop_class._DEFINED_PROCEDURE_CLASSES,
        # Their storage classes are storage; their Information Model FIND/MOVE/GET are not.
        {k: v for k, v in sop_class._HANGING_PROTOCOL_CLASSES.items() if "InformationModel" in k},
        {k: v for k, v in sop_class._COLOR_PALETTE_CLASSES.items() if "InformationModel" in k},
        {k: v for k, v in sop_class._IMPLANT_TEMPLATE_CLASSES.items() if "InformationModel" in k},
        sop_class._PROTOCOL_APPROVAL_CLASSES,
        sop_class._INVENTORY_CLASSES,
    )
    for uid in group.values()
)


def ae_matches(ae_title: str, patterns: Iterable[str]) -> bool:
    """True when ``ae_title`` matches any pattern (``*`` and ``?`` wildcards, case-sensitive

    as AE titles are, PS3.5 6.2). An empty pattern list matches everything.
    """
    patterns = list(patterns)
    if not patterns:
        return True
    return any(_ae_pattern(p.strip()).fullmatch(ae_title) for p in patterns)


@functools.lru_cache(maxsize=1024)
def _ae_pattern(pattern: str) -> re.Pattern[str]:
    """Only ``*`` and ``?`` are wildcards; everything else (``[`` included) is literal."""
    return re.compile(
        "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    )


def is_storage_class(uid: str) -> bool:
    """Storage SOP classes, including private ones we do not know (any non-service UID)."""
    return uid != VERIFICATION and uid not in _NOT_STORAGE and bool(uid)


def negotiate(contexts: list[PresentationContextRQ]) -> list[PresentationContextAC]:
    """Answer each proposed presentation context (PS3.8 9.3.3.2; PS3.7 D.3.3.2)."""
    out = []
    for ctx in contexts:
        if ctx.context_id % 2 == 0:
            # PS3.8 9.3.2.2: context IDs are odd; answer without acceptance (the AC item still
            # carries a transfer syntax sub-item, not significant, PS3.8 Table 9-18).
            out.append(
                PresentationContextAC(
                    ctx.context_id, ContextResult.NO_REASON, ImplicitVRLittleEndian
                )
            )
            continue
        if ctx.abstract_syntax in QR_SOP_CLASSES:
            chosen = next((ts for ts in ctx.transfer_syntaxes if ts in QR_TRANSFER_SYNTAXES), "")
            result = ContextResult.ACCEPTANCE
            if not chosen:
                result = ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED
            out.append(
                PresentationContextAC(ctx.context_id, result, chosen or ImplicitVRLittleEndian)
            )
            continue
        if ctx.abstract_syntax != VERIFICATION and not is_storage_class(ctx.abstract_syntax):
            out.append(
                PresentationContextAC(
                    ctx.context_id,
                    ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED,
                    ImplicitVRLittleEndian,
                )
            )
            continue
        # The sender's order is its preference; take the first syntax we can store.
        chosen = next((ts for ts in ctx.transfer_syntaxes if ts in ACCEPTED_TRANSFER_SYNTAXES), "")
        if chosen:
            out.append(PresentationContextAC(ctx.context_id, ContextResult.ACCEPTANCE, chosen))
        else:
            out.append(
                PresentationContextAC(
                    ctx.context_id,
                    ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED,
                    ImplicitVRLittleEndian,
                )
            )
    return out


def negotiate_roles(roles: list[RoleSelection], accepted: Iterable[str]) -> list[RoleSelection]:
    """Answer the requestor's SCP/SCU Role Selection items (PS3.7 D.3.3.4, PS3.4 C.4.3).

    For a storage SOP class of an accepted context we grant what was proposed: a C-GET
    requestor proposes the SCP role so that we may send it C-STORE-RQs on that context. For
    any other class only the default (requestor SCU) stands. A role the requestor did not
    propose is never granted, and each SOP class is answered once.
    """
    accepted = set(accepted)
    out: dict[str, RoleSelection] = {}
    for role in roles:
        if role.sop_class_uid in out or role.sop_class_uid not in accepted:
            continue
        storage = is_storage_class(role.sop_class_uid) and role.sop_class_uid != VERIFICATION
        out[role.sop_class_uid] = RoleSelection(
            role.sop_class_uid, role.scu_role, role.scp_role and storage
        )
    return list(out.values())


def negotiate_extended(
    items: list[ExtendedNegotiation], accepted: Iterable[str]
) -> list[ExtendedNegotiation]:
    """Answer C-FIND SOP Class Extended Negotiation (PS3.4 C.5.1.1): byte 0 relational
    queries (not supported), byte 1 combined date-time matching (supported), byte 2 fuzzy
    semantic matching of person names (supported), byte 3 timezone adjustment (not
    supported). Other classes get no answer, which means "not supported" (PS3.7 D.3.3.5).
    """
    accepted = set(accepted)
    out: dict[str, ExtendedNegotiation] = {}
    for item in items:
        known = QR_SOP_CLASSES.get(item.sop_class_uid)
        if known is None or known[1] is not QRService.FIND or item.sop_class_uid not in accepted:
            continue
        asked = item.info + bytes(4)
        out.setdefault(
            item.sop_class_uid,
            ExtendedNegotiation(
                item.sop_class_uid,
                bytes([0, 1 if asked[1] else 0, 1 if asked[2] else 0, 0])[: max(len(item.info), 1)],
            ),
        )
    return list(out.values())
