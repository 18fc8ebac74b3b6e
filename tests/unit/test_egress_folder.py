"""Folder destination: path templates, safe names, atomic replace."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from dicomgate.egress.base import Delivery, Outcome
from dicomgate.egress.folder import FolderSender, render_path, safe_component
from dicomgate.egress.models import FolderDestination


@pytest.mark.parametrize(
    ("value", "safe"),
    [
        ("1.2.3", "1.2.3"),
        ("a/b", "a_b"),
        ("..", "__"),
        ("../../etc", "______etc"),
        ("x\x00y\nz", "x_y_z"),
        ("", "UNKNOWN"),
        ("   ", "UNKNOWN"),
        ("back\\slash", "back_slash"),
    ],
)
def test_safe_component(value: str, safe: str) -> None:
    assert safe_component(value) == safe


def test_render_path_fills_keywords(tmp_path: Path) -> None:
    ds = Dataset()
    ds.PatientID = "../x/y"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPInstanceUID = "1.2.3"
    path = render_path(tmp_path, "{PatientID}/{ImageType}/{Modality}/{SOPInstanceUID}.dcm", ds)
    assert path == tmp_path / "___x_y" / "ORIGINAL-PRIMARY" / "UNKNOWN" / "1.2.3.dcm"


def _delivery(path: Path) -> Delivery:
    return Delivery(7, path, "1.2", "1.2.3", "1.2.840.10008.1.2.1", "9.8", "9.8.7", 1, "r")


def test_missing_source_is_retryable_and_names_no_path(tmp_path: Path) -> None:
    sender = FolderSender("share", FolderDestination(type="folder", path=tmp_path / "out"))
    (outcome,) = asyncio.run(sender.send([_delivery(tmp_path / "PATIENT_NAME.dcm")]))
    assert not outcome.delivered and outcome.retryable
    assert "PATIENT_NAME" not in outcome.error


def test_not_dicom_is_not_retryable(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"hello")
    sender = FolderSender("share", FolderDestination(type="folder", path=tmp_path / "out"))
    (outcome,) = asyncio.run(sender.send([_delivery(junk)]))
    assert outcome.delivered is False and outcome.retryable is False


def test_unwritable_target_is_retryable(tmp_path: Path) -> None:
    from tests.conftest import bundled_file

    blocker = tmp_path / "out"
    blocker.write_text("a file where the folder should be")
    sender = FolderSender("share", FolderDestination(type="folder", path=blocker))
    (outcome,) = asyncio.run(sender.send([_delivery(bundled_file("CT_small.dcm"))]))
    assert outcome == Outcome(7, False, True, outcome.error)
    assert outcome.error.startswith("cannot write")
    assert os.listdir(tmp_path) == ["out"]
