"""C-FIND identifier -> QIDO-RS query parameters (``bridge/sources.py``)."""

from __future__ import annotations

from pydicom.dataset import Dataset

from dicomgate.bridge.sources import qido_params, query_string


def test_keys_become_matching_parameters_or_includefield() -> None:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "DOE^J*"
    ds.StudyDate = "20230101-20231231"
    ds.StudyInstanceUID = ["1.2.3", "1.2.4"]
    ds.ModalitiesInStudy = "MR"
    ds.AccessionNumber = "*"
    ds.StudyDescription = ""
    ds.ReferencedStudySequence = []
    params = qido_params(ds)
    assert sorted(params) == sorted(
        [
            ("PatientName", "DOE^J*"),
            ("StudyDate", "20230101-20231231"),
            ("StudyInstanceUID", "1.2.3,1.2.4"),
            ("ModalitiesInStudy", "MR"),
            ("includefield", "AccessionNumber"),
            ("includefield", "StudyDescription"),
            ("includefield", "ReferencedStudySequence"),
        ]
    )


def test_query_string_leaves_wildcards_and_separators_unencoded() -> None:
    text = query_string([("PatientName", "DOE^J?N*"), ("StudyDescription", "MR BRAIN&x")])
    assert text == "PatientName=DOE^J?N*&StudyDescription=MR%20BRAIN%26x"
