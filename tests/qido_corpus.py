"""A small query corpus for the QIDO-RS and FHIR tests: four patients, four studies.

Built from :func:`tests.corpus.make_mr_series` (deterministic, nothing downloaded) and
edited with pydicom so the studies differ in every attribute the tests match on: names
with case and accent differences, dates and times around range bounds, two modalities in
one study, accession numbers, series numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.uid import CTImageStorage
from tests.corpus import make_mr_series


@dataclass(frozen=True)
class StudySpec:
    key: str  # short name used by the tests: "A" .. "D"
    patient_name: str
    patient_id: str
    date: str
    time: str
    accession: str
    description: str
    modality: str
    count: int


SPECS = (
    StudySpec("A", "Doe^John", "QP1", "20230105", "101500", "QA1", "MR BRAIN", "MR", 3),
    StudySpec("B", "Buc^Jérôme", "QP2", "20230110", "083000", "QA2", "MR HEAD", "MR", 2),
    StudySpec("C", "DOE^JANE", "QP3", "20230110", "170000", "QA3", "MR KNEE", "MR", 1),
    StudySpec("D", "Smith^Anna Maria", "QP4", "20221231", "235959", "QA4", "OTHER", "OT", 1),
)


@dataclass
class QueryCorpus:
    """The files and the UIDs the tests compare answers with."""

    files: list[Path] = field(default_factory=list)
    study: dict[str, str] = field(default_factory=dict)  # key -> StudyInstanceUID
    series: dict[str, list[str]] = field(default_factory=dict)  # key -> SeriesInstanceUIDs
    instances: dict[str, list[str]] = field(default_factory=dict)  # key -> SOPInstanceUIDs

    def key_of(self, study_uid: str) -> str:
        return next(key for key, uid in self.study.items() if uid == study_uid)


def write_query_corpus(folder: Path) -> QueryCorpus:
    """Write the corpus under ``folder`` (idempotent for a given folder) and describe it."""
    corpus = QueryCorpus()
    for seed, spec in enumerate(SPECS, start=40):
        paths = make_mr_series(folder / spec.key, spec.count, seed=seed, patient_name="X")
        study_uid = ""
        series_uids: list[str] = []
        for index, path in enumerate(paths):
            ds = pydicom.dcmread(path)
            ds.PatientName = spec.patient_name
            ds.PatientID = spec.patient_id
            ds.StudyDate = ds.SeriesDate = spec.date
            ds.StudyTime = ds.SeriesTime = spec.time
            ds.AccessionNumber = spec.accession
            ds.StudyDescription = spec.description
            ds.Modality = spec.modality
            if spec.key == "A" and index == len(paths) - 1:
                # Study A gets a second, CT series: ModalitiesInStudy = CT\MR.
                ds.SeriesInstanceUID = f"{ds.SeriesInstanceUID}.2"
                ds.SeriesNumber = 4
                ds.Modality = "CT"
                ds.SOPClassUID = CTImageStorage
                ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
                ds.SeriesDescription = "ct localizer"
            ds.save_as(path, enforce_file_format=True)
            study_uid = str(ds.StudyInstanceUID)
            if str(ds.SeriesInstanceUID) not in series_uids:
                series_uids.append(str(ds.SeriesInstanceUID))
            corpus.instances.setdefault(spec.key, []).append(str(ds.SOPInstanceUID))
            corpus.files.append(path)
        corpus.study[spec.key] = study_uid
        corpus.series[spec.key] = series_uids
    return corpus
