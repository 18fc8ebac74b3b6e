"""Association acceptance policy: which AEs, SOP classes and transfer syntaxes we accept."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from pydicom.uid import AllTransferSyntaxes, ImplicitVRLittleEndian
from pynetdicom import sop_class

from dicomgate.dimse.pdu import ContextResult, PresentationContextAC, PresentationContextRQ

VERIFICATION = "1.2.840.10008.1.1"

# Every transfer syntax pydicom knows, plus retired JPEG processes and Encapsulated
# Uncompressed: we store the bytes as received, so decoding support is not needed to accept.
ACCEPTED_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    [str(uid) for uid in AllTransferSyntaxes]
    + [f"1.2.840.10008.1.2.4.{n}" for n in range(52, 67)]
    + ["1.2.840.10008.1.2.1.98"]
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
