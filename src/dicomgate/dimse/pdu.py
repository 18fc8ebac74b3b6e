"""Upper-layer PDUs (PS3.8 section 9.3): parsing and encoding, no I/O.

Only what an association acceptor needs: A-ASSOCIATE-RQ is parsed (with its SCP/SCU Role
Selection and SOP Class Extended Negotiation sub-items, PS3.7 D.3.3.4 - D.3.3.5);
A-ASSOCIATE-AC/-RJ, P-DATA-TF, A-RELEASE-RP and A-ABORT are encoded. P-DATA-TF bodies are
not parsed here: the server streams their PDV items straight to disk (see ``server.py``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # PS3.7 A.2.1 DICOM Application Context Name

# The smallest maximum PDU length that can carry data: a P-DATA-TF's variable field holds
# PDV items, each with a 6-byte header (item length 4, context ID 1, control header 1;
# PS3.8 9.3.5, E.2), so below 7 bytes not one byte of a message fits (PS3.8 D.1).
MIN_MAX_PDU_LENGTH = 7


class PduType(IntEnum):
    ASSOCIATE_RQ = 0x01
    ASSOCIATE_AC = 0x02
    ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    RELEASE_RQ = 0x05
    RELEASE_RP = 0x06
    ABORT = 0x07


class ContextResult(IntEnum):
    """Presentation context result (PS3.8 9.3.3.2)."""

    ACCEPTANCE = 0
    USER_REJECTION = 1
    NO_REASON = 2
    ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
    TRANSFER_SYNTAXES_NOT_SUPPORTED = 4


class AbortReason(IntEnum):
    """A-ABORT reasons when the source is the service provider (PS3.8 Table 9-26)."""

    NOT_SPECIFIED = 0
    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    UNRECOGNIZED_PDU_PARAMETER = 4
    UNEXPECTED_PDU_PARAMETER = 5
    INVALID_PDU_PARAMETER_VALUE = 6


class PduError(ValueError):
    """A PDU that violates PS3.8; the association is aborted with ``reason``."""

    def __init__(self, message: str, reason: AbortReason = AbortReason.INVALID_PDU_PARAMETER_VALUE):
        super().__init__(message)
        self.reason = reason


@dataclass
class PresentationContextRQ:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: list[str]


@dataclass
class RoleSelection:
    sop_class_uid: str
    scu_role: bool
    scp_role: bool


@dataclass
class ExtendedNegotiation:
    """SOP Class Extended Negotiation sub-item (PS3.7 D.3.3.5): service-class specific bytes."""

    sop_class_uid: str
    info: bytes


@dataclass
class AssociateRQ:
    """A parsed A-ASSOCIATE-RQ (PS3.8 9.3.2)."""

    called_ae: str
    calling_ae: str
    application_context: str = ""
    contexts: list[PresentationContextRQ] = field(default_factory=list)
    max_pdu_length: int = 0  # 0 = no limit (PS3.8 D.1)
    implementation_class_uid: str = ""
    implementation_version_name: str = ""
    async_ops: tuple[int, int] | None = None
    roles: list[RoleSelection] = field(default_factory=list)
    extended: list[ExtendedNegotiation] = field(default_factory=list)
    protocol_version: int = 1
    raw_called_ae: bytes = b""
    raw_calling_ae: bytes = b""

    def invalid_ae_title(self) -> tuple[RejectReason, str] | None:
        """The A-ASSOCIATE-RJ reason (PS3.8 Table 9-21, source service user) for a called or
        calling AE title that is no AE value at all (:func:`ae_title_problem`), or None."""
        for raw, reason, which in (
            (self.raw_called_ae, RejectReason.CALLED_AE_NOT_RECOGNIZED, "called"),
            (self.raw_calling_ae, RejectReason.CALLING_AE_NOT_RECOGNIZED, "calling"),
        ):
            problem = ae_title_problem(raw)
            if problem is not None:
                return reason, f"{which} AE title {raw!r} {problem}"
        return None


def ae_title_problem(raw: bytes) -> str | None:
    """Why an AE title field is not a value of VR AE, or None when it is one.

    PS3.5 6.2: an AE title is at most 16 characters of the Default Character Repertoire
    (ISO-IR 6) excluding the backslash (5CH) and all control characters; leading and
    trailing spaces are not significant (some senders pad with NULs instead, PS3.8 9.3.2
    asks for spaces: trailing NULs are tolerated). A newline in an AE title would otherwise
    reach the log and the audit trail as it came.
    """
    value = raw.strip(b" \x00")
    for byte in value:
        if byte < 0x20 or byte == 0x7F:
            return "has a control character (PS3.5 6.2)"
        if byte == 0x5C:
            return "has a backslash (PS3.5 6.2)"
        if byte > 0x7F:
            return "is not in the default character repertoire (PS3.5 6.2)"
    return None


def _uid(raw: bytes) -> str:
    return raw.decode("ascii", "replace").rstrip("\x00 ").strip()


def _items(body: bytes, where: str) -> list[tuple[int, bytes]]:
    """Split a run of variable items ``type(1) reserved(1) length(2) value``."""
    out = []
    pos = 0
    while pos < len(body):
        if pos + 4 > len(body):
            raise PduError(f"{where}: truncated item header")
        item_type = body[pos]
        (length,) = struct.unpack_from(">H", body, pos + 2)
        end = pos + 4 + length
        if end > len(body):
            raise PduError(f"{where}: item 0x{item_type:02X} length {length} runs past the PDU")
        out.append((item_type, body[pos + 4 : end]))
        pos = end
    return out


def parse_associate_rq(body: bytes) -> AssociateRQ:
    """Parse the body (after the 6-byte PDU header) of an A-ASSOCIATE-RQ."""
    if len(body) < 68:
        raise PduError("A-ASSOCIATE-RQ shorter than its fixed fields")
    (version,) = struct.unpack_from(">H", body, 0)
    raw_called, raw_calling = body[4:20], body[20:36]
    rq = AssociateRQ(
        # Spaces pad an AE title (PS3.8 9.3.2); some senders pad with NULs instead.
        called_ae=raw_called.decode("ascii", "replace").strip(" \x00"),
        calling_ae=raw_calling.decode("ascii", "replace").strip(" \x00"),
        protocol_version=version,
        raw_called_ae=raw_called,
        raw_calling_ae=raw_calling,
    )
    for item_type, value in _items(body[68:], "A-ASSOCIATE-RQ"):
        if item_type == 0x10:
            rq.application_context = _uid(value)
        elif item_type == 0x20:
            if len(value) < 4:
                raise PduError("presentation context item too short")
            ctx = PresentationContextRQ(
                context_id=value[0], abstract_syntax="", transfer_syntaxes=[]
            )
            for sub_type, sub in _items(value[4:], "presentation context"):
                if sub_type == 0x30:
                    ctx.abstract_syntax = _uid(sub)
                elif sub_type == 0x40:
                    ctx.transfer_syntaxes.append(_uid(sub))
            if any(c.context_id == ctx.context_id for c in rq.contexts):
                # PS3.8 9.3.2.2 / 7.1.1.13: a presentation context ID identifies one context
                # of the association; the A-ASSOCIATE-AC could not say which one it answers.
                raise PduError(f"presentation context ID {ctx.context_id} proposed twice")
            rq.contexts.append(ctx)
        elif item_type == 0x50:
            _parse_user_info(value, rq)
        # Unknown item types are ignored (PS3.8 9.3.1: "shall be ignored").
    if not rq.application_context:
        raise PduError("A-ASSOCIATE-RQ has no application context item")
    return rq


def _parse_user_info(value: bytes, rq: AssociateRQ) -> None:
    for sub_type, sub in _items(value, "user information"):
        if sub_type == 0x51 and len(sub) == 4:
            (rq.max_pdu_length,) = struct.unpack(">I", sub)
        elif sub_type == 0x52:
            rq.implementation_class_uid = _uid(sub)
        elif sub_type == 0x55:
            rq.implementation_version_name = sub.decode("ascii", "replace").strip()
        elif sub_type == 0x53 and len(sub) == 4:
            rq.async_ops = struct.unpack(">HH", sub)
        elif sub_type == 0x54:
            # PS3.7 D.3.3.4: UID length (2), UID, SCU-role (1), SCP-role (1).
            if len(sub) < 4:
                raise PduError("SCP/SCU role selection sub-item too short")
            (uid_len,) = struct.unpack_from(">H", sub, 0)
            if 2 + uid_len + 2 != len(sub):
                raise PduError("SCP/SCU role selection sub-item: UID length does not fit")
            uid = _uid(sub[2 : 2 + uid_len])
            rq.roles.append(RoleSelection(uid, bool(sub[2 + uid_len]), bool(sub[3 + uid_len])))
        elif sub_type == 0x56:
            # PS3.7 D.3.3.5: UID length (2), UID, service-class application information.
            if len(sub) < 2:
                raise PduError("SOP class extended negotiation sub-item too short")
            (uid_len,) = struct.unpack_from(">H", sub, 0)
            if 2 + uid_len > len(sub):
                raise PduError("SOP class extended negotiation sub-item: UID runs past its end")
            rq.extended.append(
                ExtendedNegotiation(_uid(sub[2 : 2 + uid_len]), bytes(sub[2 + uid_len :]))
            )


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def _uid_bytes(uid: str) -> bytes:
    # UIDs in PDUs are not padded (PS3.8 9.3.2.2: "shall not be padded"), but tolerate peers.
    return uid.encode("ascii")


@dataclass
class PresentationContextAC:
    context_id: int
    result: ContextResult
    transfer_syntax: str


def encode_associate_ac(
    rq: AssociateRQ,
    contexts: list[PresentationContextAC],
    *,
    max_pdu_length: int,
    implementation_class_uid: str,
    implementation_version_name: str,
    roles: list[RoleSelection] | None = None,
    extended: list[ExtendedNegotiation] | None = None,
) -> bytes:
    """Encode an A-ASSOCIATE-AC answering ``rq`` (PS3.8 9.3.3), with the role selection
    and extended negotiation answers (PS3.7 D.3.3.4, D.3.3.5) given."""
    fixed = struct.pack(">HH", 1, 0) + rq.raw_called_ae + rq.raw_calling_ae + bytes(32)
    items = [_item(0x10, _uid_bytes(APPLICATION_CONTEXT))]
    for ctx in contexts:
        sub = _item(0x40, _uid_bytes(ctx.transfer_syntax)) if ctx.transfer_syntax else b""
        items.append(_item(0x21, bytes([ctx.context_id, 0, int(ctx.result), 0]) + sub))
    user = [
        _item(0x51, struct.pack(">I", max_pdu_length)),
        _item(0x52, _uid_bytes(implementation_class_uid)),
    ]
    for role in roles or []:
        uid = _uid_bytes(role.sop_class_uid)
        user.append(
            _item(0x54, struct.pack(">H", len(uid)) + uid + bytes([role.scu_role, role.scp_role]))
        )
    user.append(_item(0x55, implementation_version_name.encode("ascii")))
    for ext in extended or []:
        uid = _uid_bytes(ext.sop_class_uid)
        user.append(_item(0x56, struct.pack(">H", len(uid)) + uid + ext.info))
    items.append(_item(0x50, b"".join(user)))
    return _pdu(PduType.ASSOCIATE_AC, fixed + b"".join(items))


class RejectResult(IntEnum):
    PERMANENT = 1
    TRANSIENT = 2


class RejectSource(IntEnum):
    SERVICE_USER = 1
    SERVICE_PROVIDER_ACSE = 2
    SERVICE_PROVIDER_PRESENTATION = 3


class RejectReason(IntEnum):
    """Reasons, meaning depends on the source (PS3.8 Table 9-21)."""

    NO_REASON = 1
    # source SERVICE_USER
    APPLICATION_CONTEXT_NOT_SUPPORTED = 2
    CALLING_AE_NOT_RECOGNIZED = 3
    CALLED_AE_NOT_RECOGNIZED = 7
    # source SERVICE_PROVIDER_ACSE: 2 = protocol version not supported
    # source SERVICE_PROVIDER_PRESENTATION: 1 = temporary congestion, 2 = local limit exceeded
    LOCAL_LIMIT_EXCEEDED = 2
    TEMPORARY_CONGESTION = 1


def encode_associate_rj(result: RejectResult, source: RejectSource, reason: int) -> bytes:
    return _pdu(PduType.ASSOCIATE_RJ, bytes([0, int(result), int(source), int(reason)]))


def encode_release_rp() -> bytes:
    return _pdu(PduType.RELEASE_RP, bytes(4))


def encode_abort(reason: AbortReason = AbortReason.NOT_SPECIFIED, source: int = 2) -> bytes:
    """A-ABORT; ``source`` 0 = service user, 2 = service provider (PS3.8 9.3.8)."""
    return _pdu(PduType.ABORT, bytes([0, 0, source, int(reason)]))


def encode_p_data(context_id: int, payload: bytes, *, command: bool, max_pdu_length: int) -> bytes:
    """P-DATA-TF PDUs carrying ``payload`` as fragments no larger than the peer accepts.

    ``max_pdu_length`` is the peer's maximum length of a PDU's variable field (PS3.8 D.1);
    0 means no limit, and fragments are then 1 MiB at most. A limit below
    :data:`MIN_MAX_PDU_LENGTH` cannot carry data: ValueError (never a larger PDU than the
    peer accepts; the acceptor refuses such an association at negotiation).
    """
    if max_pdu_length < 0 or 0 < max_pdu_length < MIN_MAX_PDU_LENGTH:
        raise ValueError(f"a maximum PDU length of {max_pdu_length} cannot carry a PDV item")
    # Each PDV item costs 4 (length) + 2 (context id, control header) bytes.
    limit = min(max_pdu_length - 6, 1 << 20) if max_pdu_length else 1 << 20
    out = []
    pos = 0
    while True:
        chunk = payload[pos : pos + limit]
        pos += len(chunk)
        last = pos >= len(payload)
        control = (1 if command else 0) | (2 if last else 0)
        pdv = struct.pack(">IBB", len(chunk) + 2, context_id, control) + chunk
        out.append(_pdu(PduType.P_DATA_TF, pdv))
        if last:
            return b"".join(out)


def pdv_pdu_header(context_id: int, size: int, *, command: bool, last: bool) -> bytes:
    """The 12 bytes in front of a ``size``-byte fragment of a message: the P-DATA-TF PDU
    header and its one PDV item's header (PS3.8 9.3.5). A sender writes the fragment after
    it as it is (a memoryview of the file's bytes: no copy per fragment)."""
    control = (1 if command else 0) | (2 if last else 0)
    return struct.pack(">BBIIBB", PduType.P_DATA_TF, 0, size + 6, size + 2, context_id, control)


def encode_pdv_pdu(
    context_id: int, data: bytes | memoryview, *, command: bool, last: bool
) -> bytes:
    """One P-DATA-TF PDU holding one PDV item: a fragment of a message (PS3.8 9.3.5).

    The caller keeps ``len(data)`` within the peer's maximum PDU length minus 6.
    """
    return pdv_pdu_header(context_id, len(data), command=command, last=last) + bytes(data)
