"""The local Query/Retrieve SCP (issue #5) against real DCMTK peers.

``findscu``, ``movescu`` and ``getscu`` are the clients; a DCMTK ``storescp`` is the move
destination. One gateway, loaded once per module with a small hand-made corpus whose
values the query table below is written against, serves the read-only tests; tests that
change configuration start their own.
"""

from __future__ import annotations

import itertools
import re
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from tests.conftest import AE_TITLE, GatewayProcess, dcmtk_env, free_port, needs_dcmtk

pytestmark = [pytest.mark.timeout(180), needs_dcmtk]

UID_ROOT = "1.2.826.0.1.3680043.10.1234."  # fixed UIDs so that the table can name them
STUDY_ROOT = "-S"
PATIENT_ROOT = "-P"

# patient id, name, birth date, sex, study uid, date, time, accession, description,
# [(series uid, modality, number, sop class, instances)]
CORPUS: list[tuple[str, str, str, str, str, str, str, str, str, list[Any]]] = [
    (
        "P1",
        "DOE^JOHN",
        "19700101",
        "M",
        UID_ROOT + "1",
        "20230105",
        "101500",
        "ACC1",
        "MR BRAIN",
        [
            (UID_ROOT + "1.1", "MR", 1, MRImageStorage, 3),
            (UID_ROOT + "1.2", "CT", 2, CTImageStorage, 1),
        ],
    ),
    (
        "P2",
        "SMITH^ANNA",
        "19800202",
        "F",
        UID_ROOT + "2",
        "20230110",
        "083000",
        "ACC2",
        "CT CHEST",
        [(UID_ROOT + "2.1", "CT", 1, CTImageStorage, 2)],
    ),
    (
        "P1",
        "DOE^JOHN",
        "19700101",
        "M",
        UID_ROOT + "3",
        "20220101",
        "120000",
        "ACC3",
        "CT KNEE",
        [(UID_ROOT + "3.1", "CT", 1, CTImageStorage, 1)],
    ),
]
ALL_INSTANCES = sum(n for *_, series in CORPUS for *_, n in series)


def write_corpus(folder: Path) -> list[Path]:
    """The corpus as Part 10 files (explicit VR little endian, 16x16 pixels)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for pid, name, birth, sex, study_uid, day, tm, acc, desc, all_series in CORPUS:
        for series_uid, modality, number, sop_class, count in all_series:
            for i in range(1, count + 1):
                sop_uid = f"{series_uid}.{i}"
                ds = Dataset()
                ds.file_meta = FileMetaDataset()
                ds.file_meta.MediaStorageSOPClassUID = sop_class
                ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds.SpecificCharacterSet = "ISO_IR 100"
                ds.SOPClassUID = sop_class
                ds.SOPInstanceUID = sop_uid
                ds.PatientID, ds.PatientName = pid, name
                ds.PatientBirthDate, ds.PatientSex = birth, sex
                ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study_uid, day, tm
                ds.AccessionNumber, ds.StudyDescription, ds.StudyID = acc, desc, acc
                ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber = series_uid, modality, number
                ds.InstanceNumber = i
                ds.Rows = ds.Columns = 16
                ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
                ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
                ds.PixelRepresentation = 0
                ds.PixelData = (np.arange(256, dtype=np.uint16) * i).tobytes()
                path = folder / f"{sop_uid}.dcm"
                ds.save_as(path, enforce_file_format=True)
                paths.append(path)
    return paths


# -- DCMTK clients ---------------------------------------------------------------------------


@dataclass
class Answer:
    """What a DCMTK Q/R client printed and returned."""

    returncode: int
    output: str
    responses: list[Dataset]

    def statuses(self) -> list[int]:
        """Status codes of every response, from the tool's --debug dump of each message."""
        found = re.findall(r"DIMSE Status\s*:\s*0x([0-9A-Fa-f]{4})", self.output)
        return [int(code, 16) for code in found]

    @property
    def final(self) -> int:
        assert self.statuses(), self.output[-3000:]
        return self.statuses()[-1]

    def counts(self) -> list[tuple[int, ...]]:
        """(remaining, completed, failed, warning) of each C-MOVE/C-GET response."""
        out = []
        for block in self.output.split("INCOMING DIMSE MESSAGE")[1:]:
            numbers = re.findall(
                r"(Remaining|Completed|Failed|Warning) Suboperations\s*:\s*(\w+)", block
            )
            if numbers:
                got = dict(numbers)
                out.append(
                    tuple(
                        int(got[k]) if got.get(k, "none").isdigit() else -1
                        for k in ("Remaining", "Completed", "Failed", "Warning")
                    )
                )
        return out

    def values(self, keyword: str) -> list[str]:
        return [str(ds.get(keyword, "")) for ds in self.responses]


def _keys(keys: dict[str, str]) -> list[str]:
    out = []
    for key, value in keys.items():
        out += ["-k", f"{key}={value}" if value is not None else key]
    return out


def findscu(
    gw: GatewayProcess,
    model: str,
    keys: dict[str, str],
    out: Path,
    *extra: str,
    aet: str = "FINDSCU",
    query_file: Path | None = None,
) -> Answer:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    proc = subprocess.run(
        ["findscu", "-d", "-to", "20", model, "-aet", aet, "-aec", gw.ae_title, "-X"]
        + ["-od", str(out), *extra, *_keys(keys), "127.0.0.1", str(gw.dimse_port)]
        + ([str(query_file)] if query_file else []),
        env=dcmtk_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        check=False,
    )
    responses = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    return Answer(proc.returncode, proc.stdout, responses)


def movescu(
    gw: GatewayProcess,
    model: str,
    keys: dict[str, str],
    destination: str,
    *extra: str,
    aet: str = "MOVESCU",
) -> Answer:
    proc = subprocess.run(
        [
            "movescu",
            "-d",
            "-to",
            "30",
            model,
            "-aet",
            aet,
            "-aec",
            gw.ae_title,
            "-aem",
            destination,
            *extra,
            *_keys(keys),
            "127.0.0.1",
            str(gw.dimse_port),
        ],
        env=dcmtk_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
        check=False,
    )
    return Answer(proc.returncode, proc.stdout, [])


def getscu(gw: GatewayProcess, model: str, keys: dict[str, str], out: Path, *extra: str) -> Answer:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [
            "getscu",
            "-d",
            "-to",
            "30",
            model,
            "-aet",
            "GETSCU",
            "-aec",
            gw.ae_title,
            "-od",
            str(out),
            *extra,
            *_keys(keys),
            "127.0.0.1",
            str(gw.dimse_port),
        ],
        env=dcmtk_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
        check=False,
    )
    return Answer(proc.returncode, proc.stdout, [])


class StoreSCP:
    """A DCMTK storescp on a free port writing into ``folder``."""

    def __init__(self, folder: Path, aet: str, fork: bool = False) -> None:
        self.folder, self.aet, self.port = folder, aet, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "storescp",
                *(["--fork"] if fork else []),  # a process per association: parallel ones
                "--output-directory",
                str(folder),
                "-aet",
                self.aet,
                str(self.port),
            ],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("storescp did not start")

    def files(self) -> dict[str, Path]:
        return {
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
            for p in self.folder.iterdir()
            if p.is_file()
        }

    def clear(self) -> None:
        for path in self.folder.iterdir():
            path.unlink()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def start_gateway(root: Path, extra: dict[str, Any] | None = None) -> GatewayProcess:
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    dimse: dict[str, Any] = {"ae_title": AE_TITLE, "host": "127.0.0.1", "port": free_port()}
    dimse.update(extra or {})
    gw = GatewayProcess(
        root=root,
        config={
            "storage": {"path": str(data)},
            "database": {"url": f"sqlite:///{data}/index.db"},
            "dimse": dimse,
            "http": {"host": "127.0.0.1", "port": free_port()},
        },
    )
    gw.start()
    return gw


@dataclass
class Site:
    gw: GatewayProcess
    scp: StoreSCP
    files: dict[str, Path]  # SOP Instance UID -> the file sent


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("qr")
    paths = write_corpus(root / "corpus")
    scp = StoreSCP(root / "scp", "ARCHIVE")
    gw = start_gateway(
        root / "gw",
        {"move_destinations": {"ARCHIVE": {"host": "127.0.0.1", "port": scp.port}}},
    )
    try:
        sent = gw.storescu(paths)
        assert sent.returncode == 0, sent.stdout
        assert gw.index.count_instances() == ALL_INSTANCES
        gw.close_index()
        yield Site(gw, scp, {p.stem: p for p in paths})
    finally:
        gw.close_index()
        code = gw.terminate()
        scp.stop()
        assert code == 0, gw.log_tail()


def assert_serving(gw: GatewayProcess) -> None:
    """The gateway still answers a C-ECHO after whatever a test did."""
    assert gw.running(), gw.log_tail()
    echo = gw.echoscu()
    assert echo.returncode == 0, echo.stdout + echo.stderr


def dataset_bytes(path: Path) -> bytes:
    """A Part 10 file's data set, without preamble and File Meta (which receivers rewrite)."""
    from dicomgate.dimse.qr import dataset_offset

    return path.read_bytes()[dataset_offset(path) :]


# -- C-FIND: the query table -----------------------------------------------------------------

S1, S2, S3 = UID_ROOT + "1", UID_ROOT + "2", UID_ROOT + "3"

# (model, level, keys, returned key, expected values in arrival order)
QUERIES: list[tuple[str, str, dict[str, str], str, list[str]]] = [
    # PATIENT level (Patient Root only)
    (PATIENT_ROOT, "PATIENT", {"PatientID": "*", "PatientName": ""}, "PatientName",
     ["DOE^JOHN", "SMITH^ANNA"]),
    (PATIENT_ROOT, "PATIENT", {"PatientName": "SMITH*", "PatientID": ""}, "PatientID", ["P2"]),
    (PATIENT_ROOT, "PATIENT", {"PatientSex": "M", "NumberOfPatientRelatedStudies": ""},
     "NumberOfPatientRelatedStudies", ["2"]),
    (PATIENT_ROOT, "PATIENT", {"PatientBirthDate": "19750101-", "PatientID": ""}, "PatientID",
     ["P2"]),
    # STUDY level, both models
    (STUDY_ROOT, "STUDY", {"StudyInstanceUID": ""}, "StudyInstanceUID", [S1, S2, S3]),
    (STUDY_ROOT, "STUDY", {"PatientName": "DOE^JOHN", "StudyInstanceUID": ""},
     "StudyInstanceUID", [S1, S3]),
    (STUDY_ROOT, "STUDY", {"PatientName": "doe*", "StudyInstanceUID": ""}, "StudyInstanceUID",
     []),  # case-sensitive
    (STUDY_ROOT, "STUDY", {"StudyDate": "20230101-20231231", "AccessionNumber": ""},
     "AccessionNumber", ["ACC1", "ACC2"]),
    (STUDY_ROOT, "STUDY", {"StudyDate": "-20221231", "AccessionNumber": ""}, "AccessionNumber",
     ["ACC3"]),
    (STUDY_ROOT, "STUDY", {"StudyInstanceUID": f"{S2}\\{S3}", "StudyDescription": ""},
     "StudyDescription", ["CT CHEST", "CT KNEE"]),
    (STUDY_ROOT, "STUDY", {"ModalitiesInStudy": "MR", "StudyInstanceUID": ""},
     "StudyInstanceUID", [S1]),
    (STUDY_ROOT, "STUDY", {"StudyDescription": "CT ?NEE", "NumberOfStudyRelatedInstances": ""},
     "NumberOfStudyRelatedInstances", ["1"]),
    (STUDY_ROOT, "STUDY", {"StudyInstanceUID": S1, "ModalitiesInStudy": ""}, "ModalitiesInStudy",
     ["['CT', 'MR']"]),
    (PATIENT_ROOT, "STUDY", {"PatientID": "P1", "StudyInstanceUID": ""}, "StudyInstanceUID",
     [S1, S3]),
    (STUDY_ROOT, "STUDY", {"StudyTime": "0800-0900", "StudyInstanceUID": ""}, "StudyInstanceUID",
     [S2]),
    # SERIES level
    (STUDY_ROOT, "SERIES", {"StudyInstanceUID": S1, "SeriesInstanceUID": "", "Modality": ""},
     "Modality", ["MR", "CT"]),
    (STUDY_ROOT, "SERIES", {"StudyInstanceUID": S1, "Modality": "CT", "SeriesNumber": ""},
     "SeriesNumber", ["2"]),
    (PATIENT_ROOT, "SERIES", {"PatientID": "P1", "StudyInstanceUID": S1,
     "NumberOfSeriesRelatedInstances": "", "SeriesInstanceUID": f"{S1}.1"},
     "NumberOfSeriesRelatedInstances", ["3"]),
    # IMAGE level
    (STUDY_ROOT, "IMAGE", {"StudyInstanceUID": S1, "SeriesInstanceUID": f"{S1}.1",
     "SOPInstanceUID": "", "InstanceNumber": ""}, "InstanceNumber", ["1", "2", "3"]),
    (PATIENT_ROOT, "IMAGE", {"PatientID": "P2", "StudyInstanceUID": S2,
     "SeriesInstanceUID": f"{S2}.1", "SOPInstanceUID": f"{S2}.1.2"}, "SOPInstanceUID",
     [f"{S2}.1.2"]),
    (STUDY_ROOT, "IMAGE", {"SOPClassUID": MRImageStorage, "SOPInstanceUID": ""},
     "SOPInstanceUID", [f"{S1}.1.1", f"{S1}.1.2", f"{S1}.1.3"]),
]  # fmt: skip


@pytest.mark.parametrize(("model", "level", "keys", "key", "expected"), QUERIES)
def test_find_query_table(
    site: Site,
    tmp_path: Path,
    model: str,
    level: str,
    keys: dict[str, str],
    key: str,
    expected: list[str],
) -> None:
    answer = findscu(site.gw, model, {"QueryRetrieveLevel": level, **keys}, tmp_path)
    assert answer.returncode == 0, answer.output[-2000:]
    assert answer.final == 0x0000
    assert answer.statuses()[:-1] == [0xFF00] * len(expected)
    got = [str(ds[key].value) if key in ds else "" for ds in answer.responses]
    assert got == expected
    for ds in answer.responses:
        assert ds.QueryRetrieveLevel == level
        # Exactly the keys asked, plus the unique keys of the level and the levels above.
        unique = {"PATIENT": {"PatientID"}, "STUDY": {"StudyInstanceUID"}}.get(
            level, {"StudyInstanceUID", "SeriesInstanceUID"}
        )
        if level == "IMAGE":
            unique = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"}
        if model == PATIENT_ROOT and level != "PATIENT":  # the top level's key (PS3.4 C.6.1)
            unique = unique | {"PatientID"}
        assert {e.keyword for e in ds} == set(keys) | unique | {"QueryRetrieveLevel"}


@pytest.mark.parametrize(
    ("level", "keys", "patient_ids"),
    [
        ("STUDY", {"StudyInstanceUID": ""}, ["P1", "P2", "P1"]),
        ("SERIES", {"StudyInstanceUID": S1, "SeriesInstanceUID": ""}, ["P1", "P1"]),
        (
            "IMAGE",
            {"StudyInstanceUID": S2, "SeriesInstanceUID": f"{S2}.1", "SOPInstanceUID": ""},
            ["P2", "P2"],
        ),
    ],
)
def test_find_patient_root_answers_carry_patient_id(
    site: Site, tmp_path: Path, level: str, keys: dict[str, str], patient_ids: list[str]
) -> None:
    """Patient Root matches below PATIENT level hold Patient ID even when it was not asked
    (the unique key of the level above, PS3.4 C.6.1); Study Root matches do not."""
    identifier = {"QueryRetrieveLevel": level, **keys}
    answer = findscu(site.gw, PATIENT_ROOT, identifier, tmp_path / "p")
    assert answer.final == 0x0000, answer.output[-2000:]
    assert answer.values("PatientID") == patient_ids
    study_root = findscu(site.gw, STUDY_ROOT, identifier, tmp_path / "s")
    assert study_root.final == 0x0000
    assert len(study_root.responses) == len(patient_ids)
    assert all("PatientID" not in ds for ds in study_root.responses)


def test_find_optional_keys_and_character_set(site: Site, tmp_path: Path) -> None:
    keys = {
        "QueryRetrieveLevel": "STUDY",
        "StudyInstanceUID": S2,
        "RetrieveAETitle": "",  # answered with our AE title
        "PatientWeight": "",  # not held by the index: not returned, warning status
    }
    answer = findscu(site.gw, STUDY_ROOT, keys, tmp_path)
    assert answer.statuses() == [0xFF01, 0x0000]
    (ds,) = answer.responses
    assert ds.RetrieveAETitle == AE_TITLE
    assert "PatientWeight" not in ds
    assert "SpecificCharacterSet" not in ds  # every value is ASCII


def test_find_sequence_matching(site: Site, tmp_path: Path) -> None:
    item = Dataset()
    item.RequestedProcedureID = ""
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = S2
    ds.SeriesInstanceUID = ""
    ds.RequestAttributesSequence = [item]
    query = tmp_path / "query.dcm"
    ds.save_as(query, implicit_vr=True, little_endian=True)
    answer = findscu(site.gw, STUDY_ROOT, {}, tmp_path / "out", query_file=query)
    assert answer.statuses() == [0xFF00, 0x0000], answer.output[-2000:]
    (found,) = answer.responses
    assert len(found.RequestAttributesSequence) == 1
    assert "RequestedProcedureID" in found.RequestAttributesSequence[0]


@pytest.mark.parametrize(
    ("model", "keys", "status", "comment"),
    [
        (STUDY_ROOT, {"PatientName": ""}, 0xA900, "no Query/Retrieve Level"),
        (STUDY_ROOT, {"QueryRetrieveLevel": "FOO", "PatientName": ""}, 0xC000, "unknown"),
        (STUDY_ROOT, {"QueryRetrieveLevel": "PATIENT", "PatientID": ""}, 0xA900, "no PATIENT"),
        (STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyDate": "2023"}, 0xC000, "YYYYMMDD"),
        (STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2/x"}, 0xC000, "UID"),
        (PATIENT_ROOT, {"QueryRetrieveLevel": "SERIES", "SeriesNumber": "two"}, 0xC000, "integer"),
    ],
)
def test_find_bad_identifiers(
    site: Site, tmp_path: Path, model: str, keys: dict[str, str], status: int, comment: str
) -> None:
    answer = findscu(site.gw, model, keys, tmp_path)
    assert answer.statuses() == [status], answer.output[-2000:]
    assert comment in answer.output
    assert answer.responses == []
    assert_serving(site.gw)


def test_find_refusal_keeps_the_requesters_value_out_of_the_log(site: Site, tmp_path: Path) -> None:
    # The comment goes back to the requester with the value it sent; the log line (rule 5:
    # no patient data in logs) says what was wrong without it.
    before = site.gw.log_count("find.refused")
    answer = findscu(
        site.gw,
        STUDY_ROOT,
        {"QueryRetrieveLevel": "STUDY", "PatientBirthDate": "1923-04-17-x"},
        tmp_path,
    )
    assert answer.statuses() == [0xC000], answer.output[-2000:]
    assert "1923-04-17-x" in answer.output
    site.gw.wait_log("find.refused", before + 1)
    refused = [line for line in site.gw.log_text().splitlines() if "find.refused" in line]
    assert refused and "PatientBirthDate" in refused[-1]
    assert "1923" not in site.gw.log_text()


# -- C-MOVE -----------------------------------------------------------------------------------


def test_move_study_to_storescp_byte_identical(site: Site) -> None:
    site.scp.clear()
    answer = movescu(
        site.gw, STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": S1}, "ARCHIVE"
    )
    assert answer.returncode == 0, answer.output[-2000:]
    assert answer.final == 0x0000
    assert answer.counts()[-1] == (-1, 4, 0, 0)
    received = site.scp.files()
    assert set(received) == {f"{S1}.1.1", f"{S1}.1.2", f"{S1}.1.3", f"{S1}.2.1"}
    for uid, path in received.items():
        assert dataset_bytes(path) == dataset_bytes(site.files[uid])
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        assert meta.get("SourceApplicationEntityTitle", AE_TITLE) == AE_TITLE


def test_move_series_and_image_levels_in_patient_root(site: Site) -> None:
    site.scp.clear()
    keys = {
        "QueryRetrieveLevel": "IMAGE",
        "PatientID": "P2",
        "StudyInstanceUID": S2,
        "SeriesInstanceUID": f"{S2}.1",
        "SOPInstanceUID": f"{S2}.1.2",
    }
    answer = movescu(site.gw, PATIENT_ROOT, keys, "ARCHIVE")
    assert answer.final == 0x0000, answer.output[-2000:]
    assert set(site.scp.files()) == {f"{S2}.1.2"}


def test_move_pending_responses_carry_counts(site: Site) -> None:
    site.scp.clear()
    keys = {"QueryRetrieveLevel": "PATIENT", "PatientID": "P1"}
    answer = movescu(site.gw, PATIENT_ROOT, keys, "ARCHIVE")
    assert answer.final == 0x0000, answer.output[-2000:]
    assert answer.counts()[-1] == (-1, 5, 0, 0)  # final: no Remaining (PS3.4 C.4.2.3.1)
    assert len(site.scp.files()) == 5


@pytest.mark.parametrize(
    ("keys", "destination", "status"),
    [
        ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": S1}, "NOWHERE", 0xA801),
        ({"QueryRetrieveLevel": "STUDY", "PatientName": "DOE*"}, "ARCHIVE", 0xA900),
        ({"QueryRetrieveLevel": "WARD", "StudyInstanceUID": S1}, "ARCHIVE", 0xC000),
        ({"StudyInstanceUID": S1}, "ARCHIVE", 0xA900),
    ],
)
def test_move_refusals(site: Site, keys: dict[str, str], destination: str, status: int) -> None:
    site.scp.clear()
    answer = movescu(site.gw, STUDY_ROOT, keys, destination)
    assert answer.statuses() == [status], answer.output[-2000:]
    assert site.scp.files() == {}
    assert_serving(site.gw)


def test_move_of_nothing_succeeds_with_zero_counts(site: Site) -> None:
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": UID_ROOT + "99"}
    answer = movescu(site.gw, STUDY_ROOT, keys, "ARCHIVE")
    assert answer.statuses() == [0x0000]
    assert answer.counts()[-1] == (-1, 0, 0, 0)


# -- C-GET ------------------------------------------------------------------------------------


def test_get_series_into_getscu_folder(site: Site, tmp_path: Path) -> None:
    keys = {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": S1, "SeriesInstanceUID": S1 + ".1"}
    answer = getscu(site.gw, STUDY_ROOT, keys, tmp_path)
    assert answer.returncode == 0, answer.output[-2000:]
    assert answer.final == 0x0000
    assert answer.counts()[-1][1:] == (3, 0, 0)  # getscu prints an absent Remaining as 0
    files = sorted(tmp_path.iterdir())
    assert len(files) == 3
    for path in files:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(path) == dataset_bytes(site.files[uid])


def test_get_in_patient_root_with_small_pdus(site: Site, tmp_path: Path) -> None:
    # 4 KiB PDUs: every instance (~1 KB of pixels) still fits, the 16 KiB ones take several.
    keys = {"QueryRetrieveLevel": "PATIENT", "PatientID": "P2"}
    answer = getscu(site.gw, PATIENT_ROOT, keys, tmp_path, "--max-pdu", "4096")
    assert answer.final == 0x0000, answer.output[-2000:]
    assert len(list(tmp_path.iterdir())) == 2


def test_get_refusals_keep_the_gateway_serving(site: Site, tmp_path: Path) -> None:
    answer = getscu(site.gw, STUDY_ROOT, {"QueryRetrieveLevel": "STUDY"}, tmp_path)
    assert answer.statuses() == [0xA900], answer.output[-2000:]
    assert list(tmp_path.iterdir()) == []
    assert_serving(site.gw)


# -- bad input from a scripted peer -----------------------------------------------------------

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


def _c_find_rq(message_id: int, sop_class: str) -> bytes:
    from tests.integration.test_dimse_bad_input import _element

    elements = (
        _element(0x00000002, sop_class.encode())
        + _element(0x00000100, struct.pack("<H", 0x0020))
        + _element(0x00000110, struct.pack("<H", message_id))
        + _element(0x00000700, struct.pack("<H", 0))
        + _element(0x00000800, struct.pack("<H", 0x0000))
    )
    return _element(0x00000000, struct.pack("<I", len(elements))) + elements


@pytest.mark.parametrize(
    ("identifier", "status"),
    [
        (b"\x08\x00\x52\x00\x10\x00\x00\x00STU", 0xC000),  # element longer than the data set
        (b"\x08\x00\x20\x00\x04\x00\x00\x002023\x08\x00\x52\x00\x06\x00\x00\x00STUDY ", 0xC000),
        (b"\x10\x00\x10\x00\x00\x00\x00\x00", 0xA900),  # no Query/Retrieve Level
        # the last element's value cut short (length 4, 1 byte): was matched as "D"
        (b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY \x10\x00\x10\x00\x04\x00\x00\x00D", 0xC000),
    ],
)
def test_find_malformed_identifier_bytes(site: Site, identifier: bytes, status: int) -> None:
    from tests.integration.test_dimse_bad_input import RawPeer, p_data, parse_command

    peer = RawPeer(site.gw.dimse_port)
    try:
        peer.associate(AE_TITLE, [(1, STUDY_ROOT_FIND, [IMPLICIT_LE])])
        assert peer.accepted == {1: IMPLICIT_LE}
        peer.send(p_data(1, _c_find_rq(5, STUDY_ROOT_FIND), command=True))
        peer.send(p_data(1, identifier, command=False))
        answer = peer.read_pdu()
        command = parse_command(answer.body[6:])
        assert struct.unpack("<H", command[0x00000100])[0] == 0x8020
        assert struct.unpack("<H", command[0x00000120])[0] == 5
        assert struct.unpack("<H", command[0x00000900])[0] == status
        assert command[0x00000902]  # an ErrorComment says why
        peer.release()
    finally:
        peer.close()
    assert_serving(site.gw)


# -- C-CANCEL ---------------------------------------------------------------------------------


def _fake_instances(count: int) -> list[Any]:
    """Index rows without files (C-FIND answers from the index only)."""
    from datetime import UTC, datetime

    from dicomgate.index.db import StoredInstance
    from dicomgate.index.extract import extract_record

    rows = []
    for i in range(count):
        ds = Dataset()
        ds.PatientID, ds.PatientName = "BULK", "BULK^PATIENT"
        ds.StudyInstanceUID = UID_ROOT + "500"
        ds.SeriesInstanceUID = UID_ROOT + "500.1"
        ds.SOPInstanceUID = f"{UID_ROOT}500.1.{i + 1}"
        ds.SOPClassUID = CTImageStorage
        ds.Modality, ds.InstanceNumber = "CT", i + 1
        rows.append(
            StoredInstance(
                record=extract_record(ds),
                relpath=f"bulk/{i}.dcm",
                size=100,
                sha256="ab" * 32,
                transfer_syntax_uid=ExplicitVRLittleEndian,
                calling_ae="BULK",
                called_ae=AE_TITLE,
                source_ip="127.0.0.1",
                received_via="dimse",
                received_at=datetime.now(UTC),
            )
        )
    return rows


def test_find_cancel_mid_query(tmp_path: Path) -> None:
    from dicomgate.config import DuplicatePolicy

    gw = start_gateway(tmp_path / "gw")
    try:
        gw.index.record(_fake_instances(5000), DuplicatePolicy.KEEP_BOTH)
        gw.close_index()
        keys = {"QueryRetrieveLevel": "IMAGE", "SOPInstanceUID": "", "InstanceNumber": ""}
        answer = findscu(gw, STUDY_ROOT, keys, tmp_path / "out", "--cancel", "3")
        statuses = answer.statuses()
        assert statuses[-1] == 0xFE00, answer.output[-2000:]  # Matching terminated: cancel
        assert 3 <= statuses.count(0xFF00) < 5000
        assert "cancel requested" in gw.log_text()
        # The same query runs to its end afterwards: 5000 matches, then success.
        full = findscu(gw, STUDY_ROOT, keys, tmp_path / "full")
        assert full.final == 0x0000
        assert len(full.responses) == 5000
        assert_serving(gw)
    finally:
        gw.close_index()
        assert gw.terminate() == 0, gw.log_tail()


# -- access control ---------------------------------------------------------------------------


def test_access_control_per_service(tmp_path: Path, site: Site) -> None:
    allow = {"store": ["CT*"], "find": ["VIEWER*"], "move": ["VIEWER*"], "get": ["VIEWER*"]}
    gw = start_gateway(
        tmp_path / "gw",
        {
            "allow": allow,
            "move_destinations": {"ARCHIVE": {"host": "127.0.0.1", "port": site.scp.port}},
        },
    )
    files = [site.files[f"{S2}.1.1"], site.files[f"{S2}.1.2"]]
    try:
        refused = gw.storescu(files, "-d", "-aet", "STORESCU")
        assert "0x0124" in refused.stdout, refused.stdout[-2000:]  # Refused: Not Authorized
        assert "may not store" in gw.log_text()
        assert gw.index.count_instances() == 0
        stored = gw.storescu(files, "-aet", "CT_SCANNER")
        assert stored.returncode == 0, stored.stdout
        assert gw.index.count_instances() == 2
        gw.close_index()

        study = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": S2}
        assert findscu(gw, STUDY_ROOT, study, tmp_path / "f1").statuses() == [0x0124]
        allowed = findscu(gw, STUDY_ROOT, study, tmp_path / "f2", aet="VIEWER1")
        assert allowed.statuses() == [0xFF00, 0x0000]

        site.scp.clear()
        assert movescu(gw, STUDY_ROOT, study, "ARCHIVE").statuses() == [0x0124]
        assert site.scp.files() == {}
        moved = movescu(gw, STUDY_ROOT, study, "ARCHIVE", aet="VIEWER2")
        assert moved.final == 0x0000
        assert len(site.scp.files()) == 2

        got = getscu(gw, STUDY_ROOT, study, tmp_path / "g")  # calling AE GETSCU
        assert got.statuses() == [0x0124]
        assert list((tmp_path / "g").iterdir()) == []
        assert "get.refused" in gw.log_text()
        assert_serving(gw)
    finally:
        gw.close_index()
        assert gw.terminate() == 0, gw.log_tail()


# -- partial failure, unreachable destination, C-GET conversion -------------------------------


def test_move_partial_failure_and_unreachable_destination(tmp_path: Path) -> None:
    scp = StoreSCP(tmp_path / "scp", "ARCHIVE")
    gw = start_gateway(
        tmp_path / "gw",
        {
            "move_destinations": {
                "ARCHIVE": {"host": "127.0.0.1", "port": scp.port},
                "DOWN": {"host": "127.0.0.1", "port": free_port()},
            },
            "move_timeout": 5,
        },
    )
    paths = write_corpus(tmp_path / "corpus")
    try:
        assert gw.storescu(paths).returncode == 0
        lost = gw.index.instance(f"{S2}.1.1")
        assert lost is not None
        gw.stored_path(lost).unlink()  # its file is gone: that sub-operation fails
        gw.close_index()
        study = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": S2}
        answer = movescu(gw, STUDY_ROOT, study, "ARCHIVE")
        assert answer.final == 0xB000, answer.output[-2000:]
        assert answer.counts()[-1] == (-1, 1, 1, 0)
        final = answer.output.rsplit("INCOMING DIMSE MESSAGE", 1)[1]
        assert f"{S2}.1.1" in final  # Failed SOP Instance UID List (0008,0058)
        assert set(scp.files()) == {f"{S2}.1.2"}

        down = movescu(
            gw, STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": S1}, "DOWN"
        )
        assert down.final == 0xA702, down.output[-2000:]
        assert down.counts()[-1] == (-1, 0, 4, 0)
        assert_serving(gw)
    finally:
        gw.close_index()
        scp.stop()
        assert gw.terminate() == 0, gw.log_tail()


def test_get_converts_what_the_requestor_did_not_accept(tmp_path: Path) -> None:
    from tests.conftest import bundled_file

    gw = start_gateway(tmp_path / "gw")
    rle = bundled_file("MR_small_RLE.dcm")
    try:
        from tests.conftest import DICOMGATE

        sent = subprocess.run(  # our SCU proposes the file's own syntax: stored as RLE
            [
                DICOMGATE,
                "send",
                str(rle),
                "--to",
                f"127.0.0.1:{gw.dimse_port}",
                "--aec",
                AE_TITLE,
                "--no-progress",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        uid = str(pydicom.dcmread(rle, stop_before_pixels=True).SOPInstanceUID)
        row = gw.index.instance(uid)
        assert row is not None and row["transfer_syntax_uid"] == "1.2.840.10008.1.2.5"
        gw.close_index()
        keys = {
            "QueryRetrieveLevel": "IMAGE",
            "StudyInstanceUID": str(pydicom.dcmread(rle, stop_before_pixels=True).StudyInstanceUID),
            "SeriesInstanceUID": "*",
            "SOPInstanceUID": uid,
        }
        out = tmp_path / "got"
        answer = getscu(gw, STUDY_ROOT, keys, out)  # getscu proposes uncompressed only
        assert answer.final == 0x0000, answer.output[-3000:]
        (received,) = list(out.iterdir())
        ds = pydicom.dcmread(received)
        assert ds.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
        assert np.array_equal(ds.pixel_array, pydicom.dcmread(rle).pixel_array)
        # The same instance, converted: its identity is the one the C-STORE-RQ announced
        # (pydicom's decompress() gives a new SOP Instance UID unless told not to).
        assert ds.SOPInstanceUID == uid == ds.file_meta.MediaStorageSOPInstanceUID
    finally:
        gw.close_index()
        assert gw.terminate() == 0, gw.log_tail()


# -- dicomgate find / move (SCU commands) -----------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    from tests.conftest import DICOMGATE

    return subprocess.run(
        [DICOMGATE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**dcmtk_env(), "COLUMNS": "250"},
    )


def test_cli_find_prints_a_table_and_fails_with_the_status(site: Site) -> None:
    port = str(site.gw.dimse_port)
    found = _cli("find", "127.0.0.1", port, "--aec", AE_TITLE, "-k", "PatientName=DOE*")
    assert found.returncode == 0, found.stderr
    assert S1 in found.stdout and S3 in found.stdout and S2 not in found.stdout
    assert "ACC1" in found.stdout and "2 matches" in found.stdout
    series = _cli(
        "find", "127.0.0.1", port, "--aec", AE_TITLE, "--level", "SERIES", "--model", "patient",
        "-k", "PatientID=P1", "-k", f"StudyInstanceUID={S1}",
    )  # fmt: skip
    assert series.returncode == 0, series.stderr
    assert f"{S1}.1" in series.stdout and f"{S1}.2" in series.stdout
    bad = _cli("find", "127.0.0.1", port, "--aec", AE_TITLE, "-k", "StudyDate=2023")
    assert bad.returncode == 1
    assert "0xC000" in bad.stderr and "YYYYMMDD" in bad.stderr
    usage = _cli("find", "127.0.0.1", port, "--level", "PATIENT")
    assert usage.returncode == 2 and "--model patient" in usage.stderr
    unknown = _cli("find", "127.0.0.1", port, "-k", "NoSuchKeyword=1")
    assert unknown.returncode == 2


def test_cli_move_summary_and_exit_codes(site: Site) -> None:
    site.scp.clear()
    port = str(site.gw.dimse_port)
    moved = _cli(
        "move", "127.0.0.1", port, "--aec", AE_TITLE, "--dest", "ARCHIVE",
        "-k", f"StudyInstanceUID={S2}",
    )  # fmt: skip
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert "moved 2 to ARCHIVE" in moved.stdout and "failed 0" in moved.stdout
    assert set(site.scp.files()) == {f"{S2}.1.1", f"{S2}.1.2"}
    unknown = _cli(
        "move", "127.0.0.1", port, "--aec", AE_TITLE, "--dest", "NOWHERE",
        "-k", f"StudyInstanceUID={S2}",
    )  # fmt: skip
    assert unknown.returncode == 1
    assert "0xA801" in unknown.stdout
    down = _cli("move", "127.0.0.1", "1", "--dest", "X", "-k", f"StudyInstanceUID={S2}")
    assert down.returncode == 1 and "refused" in down.stderr


def test_move_to_a_configured_dimse_destination(tmp_path: Path) -> None:
    """A `type: dimse` destination is a move destination under its AE title."""
    scp = StoreSCP(tmp_path / "scp", "PACS2")
    root = tmp_path / "gw"
    root.mkdir()
    data = root / "data"
    gw = GatewayProcess(
        root=root,
        config={
            "storage": {"path": str(data)},
            "database": {"url": f"sqlite:///{data}/index.db"},
            "dimse": {"ae_title": AE_TITLE, "host": "127.0.0.1", "port": free_port()},
            "http": {"host": "127.0.0.1", "port": free_port()},
            "destinations": {
                "pacs": {
                    "type": "dimse",
                    "ae_title": "PACS2",
                    "host": "127.0.0.1",
                    "port": scp.port,
                }
            },
        },
    )
    gw.start()
    try:
        assert gw.storescu(write_corpus(tmp_path / "corpus")).returncode == 0
        study = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": S1}
        answer = movescu(gw, STUDY_ROOT, study, "PACS2")
        assert answer.final == 0x0000, answer.output[-2000:]
        assert set(scp.files()) == {f"{S1}.1.1", f"{S1}.1.2", f"{S1}.1.3", f"{S1}.2.1"}
        assert movescu(gw, STUDY_ROOT, study, "NOBODY").final == 0xA801
    finally:
        gw.close_index()
        scp.stop()
        assert gw.terminate() == 0, gw.log_tail()


# -- pending counts, cancel and partial failure on a larger study ----------------------------

_MOVE_STUDY_ROOT = "1.2.840.10008.5.1.4.1.2.2.2"
_GET_STUDY_ROOT = "1.2.840.10008.5.1.4.1.2.2.3"
BIG = 100  # instances: six batches of RETRIEVE_BATCH (16) and a rest


@dataclass
class GetAnswer:
    """What a pynetdicom C-GET requestor saw: (status, remaining, completed, failed,
    warning, Failed SOP Instance UID List) per response, and the instances it stored."""

    responses: list[tuple[int, int | None, int, int, int, list[str]]]
    stored: list[str]


def pynetdicom_get(
    gw: GatewayProcess,
    identifier: dict[str, str],
    storage_classes: list[str],
    cancel_after: int | None = None,
) -> GetAnswer:
    """C-GET with pynetdicom as the requestor, taking the SCP role for ``storage_classes``
    only; a C-CANCEL-RQ after ``cancel_after`` pending responses."""
    from pynetdicom import AE, build_role, evt

    ae = AE(ae_title="PYGETSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(_GET_STUDY_ROOT)
    for sop_class in storage_classes:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    stored: list[str] = []

    def on_store(event: Any) -> int:
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    assoc = ae.associate(
        "127.0.0.1",
        gw.dimse_port,
        ae_title=gw.ae_title,
        ext_neg=[build_role(c, scp_role=True) for c in storage_classes],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    ds = Dataset()
    for key, value in identifier.items():
        setattr(ds, key, value)
    responses: list[tuple[int, int | None, int, int, int, list[str]]] = []
    try:
        for status, found in assoc.send_c_get(ds, _GET_STUDY_ROOT, msg_id=7):
            assert "Status" in status, "no C-GET response in time"
            failed_list = found.get("FailedSOPInstanceUIDList", []) if found else []
            remaining = status.get("NumberOfRemainingSuboperations")
            responses.append(
                (
                    int(status.Status),
                    int(remaining) if remaining is not None else None,
                    int(status.get("NumberOfCompletedSuboperations") or 0),
                    int(status.get("NumberOfFailedSuboperations") or 0),
                    int(status.get("NumberOfWarningSuboperations") or 0),
                    [failed_list] if isinstance(failed_list, str) else list(failed_list),
                )
            )
            pendings = sum(1 for r in responses if r[0] == 0xFF00)
            if cancel_after is not None and pendings == cancel_after and status.Status == 0xFF00:
                assoc.send_c_cancel(7, query_model=_GET_STUDY_ROOT)
    finally:
        assoc.release()
    return GetAnswer(responses, stored)


@dataclass
class BigStudy:
    gw: GatewayProcess
    scp: StoreSCP
    study: str
    files: list[Path]


@pytest.fixture
def big_study(tmp_path: Path, corpus: Any) -> Iterator[BigStudy]:
    """A gateway holding one MR study of :data:`BIG` instances, storescp as ARCHIVE."""
    files = corpus.mr("qr-big", BIG, seed=5301)
    scp = StoreSCP(tmp_path / "scp", "ARCHIVE")
    gw = start_gateway(
        tmp_path / "gw",
        {"move_destinations": {"ARCHIVE": {"host": "127.0.0.1", "port": scp.port}}},
    )
    try:
        assert gw.storescu(files).returncode == 0
        gw.close_index()
        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        yield BigStudy(gw, scp, study, files)
    finally:
        gw.close_index()
        scp.stop()
        assert gw.terminate() == 0, gw.log_tail()


def test_move_and_get_pending_responses_carry_sub_operation_counts(
    big_study: BigStudy, tmp_path: Path
) -> None:
    gw, scp, study = big_study.gw, big_study.scp, big_study.study
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}
    moved = movescu(gw, STUDY_ROOT, keys, "ARCHIVE")
    assert moved.final == 0x0000, moved.output[-2000:]
    *pendings, final = moved.counts()
    # One pending response per batch of 16 sub-operations: remaining, completed, 0, 0.
    assert pendings == [(BIG - n, n, 0, 0) for n in range(16, BIG, 16)]
    assert moved.statuses() == [0xFF00] * len(pendings) + [0x0000]
    assert final == (-1, BIG, 0, 0)
    assert len(scp.files()) == BIG

    got = getscu(gw, STUDY_ROOT, keys, tmp_path / "get")
    assert got.final == 0x0000, got.output[-2000:]
    *pendings, final = got.counts()
    assert len(pendings) >= BIG // 16  # every 16 sub-operations (or 0.5 s)
    assert all(r + c == BIG and f == w == 0 for r, c, f, w in pendings)
    assert [c for _, c, _, _ in pendings] == sorted({c for _, c, _, _ in pendings})
    assert final[1:] == (BIG, 0, 0)
    assert len(list((tmp_path / "get").iterdir())) == BIG


def test_move_and_get_cancel(big_study: BigStudy) -> None:
    """movescu --cancel 1 and a pynetdicom C-GET cancelled after its first pending
    response: the final response is 0xFE00 with the counts so far, the rest is not sent."""
    gw, scp, study = big_study.gw, big_study.scp, big_study.study
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}
    scp.clear()
    moved = movescu(gw, STUDY_ROOT, keys, "ARCHIVE", "--cancel", "1")
    assert moved.final == 0xFE00, moved.output[-2000:]
    remaining, completed, failed, warning = moved.counts()[-1]
    assert remaining > 0 and 16 <= completed < BIG and remaining + completed == BIG
    assert failed == warning == 0
    assert len(scp.files()) == completed

    got = pynetdicom_get(gw, keys, [MRImageStorage], cancel_after=1)
    status, remaining_get, completed_get, failed_get, _, _ = got.responses[-1]
    assert status == 0xFE00, got.responses
    assert remaining_get is not None and remaining_get > 0
    assert completed_get + remaining_get == BIG and failed_get == 0
    assert len(got.stored) == completed_get < BIG
    assert gw.log_text().count("cancel requested") >= 2
    assert_serving(gw)


def test_move_over_several_associations(tmp_path: Path, corpus: Any) -> None:
    """dimse.move_destinations.<AE>.max_associations: 3 to a storescp --fork: the study
    goes over three associations at once, every instance byte-identical, the pending
    counts still add up and fall by whole batches, and a C-CANCEL stops all three."""
    files = corpus.mr("qr-parallel", BIG, seed=5302)
    scp = StoreSCP(tmp_path / "scp", "ARCHIVE", fork=True)
    destination = {"host": "127.0.0.1", "port": scp.port, "max_associations": 3}
    gw = start_gateway(tmp_path / "gw", {"move_destinations": {"ARCHIVE": destination}})
    try:
        assert gw.storescu(files).returncode == 0
        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}
        moved = movescu(gw, STUDY_ROOT, keys, "ARCHIVE")
        assert moved.final == 0x0000, moved.output[-2000:]
        assert gw.log_text().count("association to c-move:ARCHIVE established") == 3
        received = scp.files()
        sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
        assert received.keys() == sent.keys()
        for uid, path in sent.items():
            assert pydicom.dcmread(received[uid]).PixelData == pydicom.dcmread(path).PixelData
        *pendings, final = moved.counts()
        assert final == (-1, BIG, 0, 0)
        remaining = [r for r, _, _, _ in pendings]
        assert remaining == sorted(set(remaining), reverse=True)
        assert all(r + c == BIG and f == w == 0 for r, c, f, w in pendings)
        completed = [0] + [c for _, c, _, _ in pendings]
        steps = {b - a for a, b in itertools.pairwise(completed)}
        assert steps <= {16, BIG % 16}  # one pending response per finished batch

        scp.clear()
        cancelled = movescu(gw, STUDY_ROOT, keys, "ARCHIVE", "--cancel", "1")
        assert cancelled.final == 0xFE00, cancelled.output[-2000:]
        remaining, completed, failed, warning = cancelled.counts()[-1]
        assert remaining > 0 and remaining + completed == BIG and failed == warning == 0
        assert len(scp.files()) == completed
        assert_serving(gw)
    finally:
        scp.stop()
        assert gw.terminate() == 0, gw.log_tail()


def test_get_partial_failure(big_study: BigStudy, site: Site, tmp_path: Path) -> None:
    """C-GET 0xB000 with the Failed SOP Instance UID List: a requestor taking the SCP role
    for CT only gets the CT of a CT+MR study; a file missing from the store fails alone."""
    mixed = pynetdicom_get(
        site.gw, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": S1}, [CTImageStorage]
    )
    status, _, completed, failed, _, failed_uids = mixed.responses[-1]
    assert (status, completed, failed) == (0xB000, 1, 3), mixed.responses
    assert sorted(failed_uids) == [f"{S1}.1.{i}" for i in (1, 2, 3)]  # the MR instances
    assert mixed.stored == [f"{S1}.2.1"]

    gw, study = big_study.gw, big_study.study
    lost_uid = str(pydicom.dcmread(big_study.files[10], stop_before_pixels=True).SOPInstanceUID)
    lost = gw.index.instance(lost_uid)
    assert lost is not None
    gw.stored_path(lost).unlink()
    gw.close_index()
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}
    got = getscu(gw, STUDY_ROOT, keys, tmp_path / "get")
    assert got.final == 0xB000, got.output[-2000:]
    assert got.counts()[-1][1:] == (BIG - 1, 1, 0)
    assert len(list((tmp_path / "get").iterdir())) == BIG - 1
    # getscu 3.6.7 does not print the final response's data set: the list, with pynetdicom.
    listed = pynetdicom_get(gw, keys, [MRImageStorage])
    assert listed.responses[-1][0] == 0xB000
    assert listed.responses[-1][5] == [lost_uid]
    assert len(listed.stored) == BIG - 1 and lost_uid not in listed.stored
    assert_serving(gw)


def test_move_whose_sub_operations_had_warnings_ends_with_warning(
    tmp_path: Path, corpus: Any
) -> None:
    """A destination that stores each instance with a warning (0xB007, data set does not
    match SOP class, stored anyway): the C-MOVE ends with 0xB000, not Success, which
    PS3.4 C.4.2.1.5 keeps for "all sub-operations completed successfully"."""
    from pynetdicom import evt

    files = corpus.mr("qr-warn", 3, seed=5311)
    answered: list[str] = []

    def on_store(event: evt.Event) -> int:
        answered.append(str(event.request.AffectedSOPInstanceUID))
        return 0xB007

    server, gw = _gateway_moving_to_pynetdicom(tmp_path, "WARNSCP", on_store)
    try:
        assert gw.storescu(files).returncode == 0
        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}
        moved = movescu(gw, STUDY_ROOT, keys, "WARNSCP")
        assert moved.final == 0xB000, moved.output[-2000:]
        assert moved.counts()[-1] == (-1, 0, 0, 3)  # completed 0, failed 0, warning 3
        assert len(answered) == 3
    finally:
        server.shutdown()
        gw.close_index()
        assert gw.terminate() == 0, gw.log_tail()


def test_find_combines_date_and_time_only_when_negotiated(tmp_path: Path, corpus: Any) -> None:
    """StudyDate=20230105-20230107 with StudyTime=1000-1200: without extended negotiation the
    two ranges are matched each on its own (PS3.4 C.2.2.2.5: 10:00-12:00 on any of those
    days); an SCU that negotiated combined date-time matching (byte 1, C.5.1.1.2) asks for
    5 January 10:00 to 7 January 12:00. Before, the combined form was always applied."""
    from pynetdicom import AE
    from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation

    find = "1.2.840.10008.5.1.4.1.2.2.1"
    studies = {}
    dated = (("A", "20230105", "110000", 5321), ("B", "20230107", "080000", 5322))
    for key, day, tm, seed in dated:
        path = corpus.mr(f"qr-dt-{key}", 1, seed=seed)[0]
        ds = pydicom.dcmread(path)
        ds.StudyDate, ds.StudyTime = day, tm
        ds.save_as(path, enforce_file_format=True)
        studies[key] = (path, str(ds.StudyInstanceUID))
    gw = start_gateway(tmp_path / "gw")

    def found(combined: bool) -> set[str]:
        ae = AE(ae_title="DTFIND")
        ae.add_requested_context(find, "1.2.840.10008.1.2.1")
        extended = []
        if combined:
            item = SOPClassExtendedNegotiation()
            item.sop_class_uid = find
            item.service_class_application_information = bytes([0, 1, 0])
            extended = [item]
        assoc = ae.associate("127.0.0.1", gw.dimse_port, ae_title=AE_TITLE, ext_neg=extended)
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        query.StudyDate, query.StudyTime = "20230105-20230107", "1000-1200"
        uids = set()
        try:
            for status, identifier in assoc.send_c_find(query, find):
                if status is not None and status.Status in (0xFF00, 0xFF01):
                    uids.add(str(identifier.StudyInstanceUID))
        finally:
            assoc.release()
        return uids

    try:
        assert gw.storescu([path for path, _ in studies.values()]).returncode == 0
        assert found(combined=False) == {studies["A"][1]}
        assert found(combined=True) == {studies["A"][1], studies["B"][1]}
    finally:
        gw.close_index()
        assert gw.terminate() == 0, gw.log_tail()


def test_move_cancel_interrupts_the_batch_being_sent(tmp_path: Path, corpus: Any) -> None:
    """A C-CANCEL-MOVE after the first pending response (16 sent) to a destination taking
    0.1 s an instance: the gateway stops before the next instance, not after the next batch
    of 16 (PS3.4 C.4.2.3.1: the SCP shall interrupt the sub-operations)."""
    from pynetdicom import evt

    files = corpus.mr("qr-cancel-slow", 40, seed=5331)
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        time.sleep(0.1)
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    server, gw = _gateway_moving_to_pynetdicom(tmp_path, "SLOWSCP", on_store)
    try:
        assert gw.storescu(files).returncode == 0
        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}
        moved = movescu(gw, STUDY_ROOT, keys, "SLOWSCP", "--cancel", "1")
        assert moved.final == 0xFE00, moved.output[-2000:]
        remaining, completed, failed, _ = moved.counts()[-1]
        # The cancel came during the second batch: a few more at most, not all 16.
        assert 16 <= completed < 24, moved.counts()
        assert remaining + completed == 40 and failed == 0
        assert len(received) == completed
    finally:
        server.shutdown()
        gw.close_index()
        assert gw.terminate() == 0, gw.log_tail()


def _gateway_moving_to_pynetdicom(
    tmp_path: Path, aet: str, on_store: Callable[[Any], int]
) -> tuple[Any, GatewayProcess]:
    """A pynetdicom MR storage SCP answering with ``on_store`` and a gateway whose move
    destination ``aet`` it is."""
    from pynetdicom import AE, evt

    scp_ae = AE(ae_title=aet)
    scp_ae.add_supported_context("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1")
    port = free_port()
    server = scp_ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    gw = start_gateway(
        tmp_path / "gw", {"move_destinations": {aet: {"host": "127.0.0.1", "port": port}}}
    )
    return server, gw
