"""Cross-check QIDO-RS against a real DICOMweb server: Orthanc with its DICOMweb plugin.

The same corpus (tests/qido_corpus.py) goes into Orthanc (REST upload) and into dicomgate
(DCMTK storescu); then every query of ``TABLE`` runs on both, and the answers must agree:
the same matching UIDs, and the same values for every attribute both servers return.

Where they do not agree, ``TABLE`` says which answer Orthanc gives and why, and the test
checks that Orthanc still gives exactly that answer (so a fixed or changed Orthanc shows
up here). Queries are sent as raw query strings (``^ * ? \\ ,`` unencoded) because of the
first difference below. Observed with Debian's Orthanc 1.10.1 and orthanc-dicomweb 1.7:

* Percent-encoded query values are not decoded: ``PatientName=Doe%5EJohn`` (what
  ``requests``, hence dicomweb-client, sends for ``Doe^John``) matches nothing in Orthanc.
  RFC 3986 2.1 makes ``%5E`` and ``^`` the same data. **Orthanc is wrong.**
* Combined datetime matching (PS3.4 C.2.2.2.5.1): ``StudyDate=20230105-20230110&
  StudyTime=100000-090000`` means "from 5 January 10:00 to 10 January 09:00". Orthanc
  matches the two ranges separately, so its time range ends before it starts and nothing
  matches. **Orthanc is wrong.**
* ``fuzzymatching=true``: Orthanc has no fuzzy matching of person names and answers
  literally, without the Warning header PS3.18 8.3.4.1 asks for when a parameter is not
  supported. **Orthanc is wrong** (the missing warning).
* Person names: Orthanc matches PN case-insensitively (``DOE^JOHN`` and ``Doe*`` find
  both Doe^John and DOE^JANE); dicomgate's literal matching is case-sensitive and its fuzzy
  matching is not. PS3.4 C.2.2.2.1 allows both: a choice, not an error.
* UID lists: PS3.18 separates them with commas, which both accept; dicomgate also takes
  the C-FIND form with backslashes, which Orthanc reads as one UID. A superset, not an error.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import GatewayProcess, Orthanc, needs_dcmtk
from tests.qido_corpus import QueryCorpus, write_query_corpus

pytestmark = needs_dcmtk

UID_TAG = {"studies": "0020000D", "series": "0020000E", "instances": "00080018"}
# Attributes only one side returns by design, never compared:
# SpecificCharacterSet (Orthanc echoes the file's; dicomgate answers UTF-8 JSON).
NOT_COMPARED = {"00080005"}


@dataclass(frozen=True)
class Row:
    """One query: path and raw query string ({A} = study A's UID, {A0} its first series ...).

    The query string is sent as written (``^ * ? \\ ,`` unencoded, see the module docstring).
    """

    path: str
    query: str = ""
    orthanc: str | None = None  # Orthanc's different answer: its study keys, e.g. "" or "AC"
    why: str = ""
    ordered: bool = False  # limit/offset pages: the two servers order differently


TABLE = [
    Row("studies"),
    Row("studies", "PatientID=QP2"),
    Row("studies", "PatientName=Doe^John"),
    Row(
        "studies",
        "PatientName=DOE^JOHN",
        orthanc="A",
        why="Orthanc matches PN case-insensitively (PS3.4 C.2.2.2.1 allows both)",
    ),
    Row("studies", "PatientName=Doe*", orthanc="AC", why="PN case-insensitive in Orthanc"),
    Row("studies", "PatientName=D?E^J*", orthanc="AC", why="PN case-insensitive in Orthanc"),
    Row(
        "studies",
        "PatientName=Doe%5EJohn",
        orthanc="",
        why="Orthanc does not percent-decode query values (RFC 3986 2.1): Orthanc is wrong",
    ),
    Row("studies", "AccessionNumber=QA?"),
    Row("studies", "StudyDate=20230101-20230109"),
    Row("studies", "StudyDate=20230110-"),
    Row("studies", "StudyDate=-20221231"),
    Row("studies", "StudyDate=20230110"),
    Row("studies", "StudyTime=080000-120000"),
    Row(
        "studies",
        "StudyDate=20230105-20230110&StudyTime=100000-090000",
        orthanc="",
        why="combined datetime matching: Orthanc matches the two ranges separately",
    ),
    Row("studies", "ModalitiesInStudy=CT"),
    Row("studies", "ModalitiesInStudy=OT"),
    Row("studies", "StudyInstanceUID={B},{D}"),
    Row(
        "studies",
        "StudyInstanceUID={B}\\{D}",
        orthanc="",
        why="a backslash UID list (the C-FIND form) is one UID to Orthanc; dicomgate takes both",
    ),
    Row(
        "studies",
        "PatientName=jerome&fuzzymatching=true",
        orthanc="",
        why="Orthanc has no fuzzy matching and sends no Warning: Orthanc is wrong",
    ),
    Row("studies", "includefield=StudyDescription"),
    Row("studies", "PatientName=Doe^John&includefield=all"),
    Row("studies", "limit=2&offset=1", ordered=True),
    Row("series", "Modality=CT"),
    Row("series", "SeriesNumber=4"),
    Row("series", "PatientID=QP2"),
    Row("studies/{A}/series"),
    Row("studies/{A}/series", "Modality=MR"),
    Row("studies/{A}/series/{A0}/instances"),
    Row("studies/{B}/instances", "InstanceNumber=2"),
    Row("instances", "SOPClassUID=1.2.840.10008.5.1.4.1.1.2"),
    Row("instances", "SOPInstanceUID={a1},{c0}"),
]


def _get(url: str) -> Any:
    """GET ``url`` exactly as written (urllib sends the query string unchanged)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200, url
        return json.loads(response.read() or b"[]")


def _fill(text: str, corpus: QueryCorpus) -> str:
    names: dict[str, str] = {}
    for key in corpus.study:
        names[key] = corpus.study[key]
        for i, uid in enumerate(corpus.series[key]):
            names[f"{key}{i}"] = uid
        for i, uid in enumerate(corpus.instances[key]):
            names[f"{key.lower()}{i}"] = uid
    return text.format(**names)


def _normalise(tag: str, element: dict[str, Any]) -> Any:
    """Comparable value of one element: numbers as numbers, URLs without their base."""
    values = element.get("Value", [])
    if tag == "00081190":
        return [str(v).split("/studies/", 1)[1] for v in values]
    out = []
    for value in values:
        if isinstance(value, str) and element.get("vr") in ("IS", "US"):
            value = int(value)
        out.append(value)
    return out


def _upload(orthanc: Orthanc, files: list[Path]) -> None:
    for path in files:
        request = urllib.request.Request(
            f"http://127.0.0.1:{orthanc.http_port}/instances", data=path.read_bytes(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200


def test_qido_answers_agree_with_orthanc(gateway: Any, orthanc: Orthanc, tmp_path: Path) -> None:
    corpus = write_query_corpus(tmp_path / "corpus")
    gw: GatewayProcess = gateway()
    sent = gw.storescu(corpus.files)
    assert sent.returncode == 0, sent.stdout
    _upload(orthanc, corpus.files)
    ours_base = gw.url("/dicomweb/")
    theirs_base = f"http://127.0.0.1:{orthanc.http_port}/dicom-web/"

    problems: list[str] = []
    for row in TABLE:
        path = _fill(row.path, corpus)
        query = _fill(row.query, corpus)
        level = path.rsplit("/", 1)[-1]
        suffix = f"{path}?{query}" if query else path
        ours_json, theirs_json = _get(ours_base + suffix), _get(theirs_base + suffix)
        ours_uids = [r[UID_TAG[level]]["Value"][0] for r in ours_json]
        theirs_uids = [r[UID_TAG[level]]["Value"][0] for r in theirs_json]
        label = suffix

        if row.orthanc is not None:
            expected = [corpus.study[key] for key in row.orthanc]
            if sorted(theirs_uids) != sorted(expected):
                problems.append(f"{label}: Orthanc no longer answers as documented ({row.why})")
            if sorted(ours_uids) == sorted(theirs_uids):
                problems.append(f"{label}: expected a difference ({row.why}), got none")
            continue
        if row.ordered:
            if len(ours_uids) != len(theirs_uids):
                problems.append(f"{label}: {len(ours_uids)} results, Orthanc {len(theirs_uids)}")
            continue
        if sorted(ours_uids) != sorted(theirs_uids):
            problems.append(f"{label}: UIDs differ: ours {ours_uids}, Orthanc {theirs_uids}")
            continue
        by_uid = {r[UID_TAG[level]]["Value"][0]: r for r in theirs_json}
        for result in ours_json:
            other = by_uid[result[UID_TAG[level]]["Value"][0]]
            for tag in sorted((set(result) & set(other)) - NOT_COMPARED):
                if result[tag].get("vr") != other[tag].get("vr"):
                    problems.append(f"{label}: {tag} vr {result[tag]} vs {other[tag]}")
                elif _normalise(tag, result[tag]) != _normalise(tag, other[tag]):
                    problems.append(f"{label}: {tag} = {result[tag]} vs Orthanc {other[tag]}")
    # Orthanc does not announce that it ignored fuzzymatching (PS3.18 8.3.4.1 asks it to).
    with urllib.request.urlopen(theirs_base + "studies?fuzzymatching=true", timeout=10) as r:
        if r.headers.get("Warning") is not None:
            problems.append("Orthanc now warns about fuzzymatching: update the docstring")
    assert problems == [], "\n".join(problems)
