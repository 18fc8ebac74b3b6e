"""A route's ``pipeline:``: build the steps from the config, run them on a file.

Steps are looked up by name in :data:`STEPS` (``module:Class``, imported when first used).
``build`` turns the YAML list into a :class:`Pipeline` or raises :class:`ConfigError` naming
the key (``routes[2].pipeline[0].deidentify.options``). :meth:`Pipeline.process_file` reads
a stored file, runs the steps and writes each output as a Part 10 file (file meta derived
from the output data set); it is what the delivery workers and ``dicomgate process`` call.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydantic import ValidationError
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError

from dicomgate import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomgate.errors import ConfigError
from dicomgate.processing.base import ProcessingError, Step, StepContext

__all__ = ["STEPS", "Output", "Pipeline", "build"]

#: Step name -> "module:Class" (imported on first use, so a step's codecs load only if used).
STEPS: dict[str, str] = {
    "deidentify": "dicomgate.processing.deidentify:Deidentify",
    "standardize": "dicomgate.processing.standardize:Standardize",
    "transcode": "dicomgate.processing.transcode:Transcode",
    "split": "dicomgate.processing.split:Split",
}


def _step_class(name: str, key: str) -> type[Step]:
    target = STEPS.get(name)
    if target is None:
        raise ConfigError(key, f"unknown step {name!r}; use one of {', '.join(STEPS)}")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise ConfigError(key, f"step {name!r} is not available in this version") from None
    cls: type[Step] = getattr(module, class_name)
    return cls


def _format(exc: ValidationError, key: str) -> ConfigError:
    err = exc.errors()[0]
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    return ConfigError(key + loc, msg)


def build(
    spec: Sequence[Mapping[str, Any]], key: str, context: StepContext | None = None
) -> Pipeline:
    """The pipeline of a ``pipeline:`` list; ``key`` names it in errors (``routes[0].pipeline``)."""
    context = context or StepContext(environ=os.environ)
    steps: list[Step] = []
    for i, item in enumerate(spec):
        item_key = f"{key}[{i}]"
        if not isinstance(item, Mapping) or len(item) != 1:
            raise ConfigError(item_key, "a step is a one-key mapping, e.g. {deidentify: {...}}")
        ((name, settings),) = item.items()
        step_key = f"{item_key}.{name}"
        cls = _step_class(str(name), item_key)
        try:
            config = cls.Config.model_validate(settings if settings is not None else {})
        except ValidationError as exc:
            raise _format(exc, step_key) from None
        step = cls(config, context)
        try:
            step.check()
        except ValueError as exc:
            raise ConfigError(step_key, str(exc)) from None
        steps.append(step)
    return Pipeline(steps, _digest(spec))


def _digest(spec: Sequence[Mapping[str, Any]]) -> str:
    text = json.dumps(list(spec), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Output:
    """One processed instance written to disk."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str
    series_instance_uid: str
    size: int


class Pipeline:
    """Steps run in order; each output of a step goes through the next ones."""

    def __init__(self, steps: Sequence[Step], digest: str = "") -> None:
        self.steps = list(steps)
        self.digest = digest

    def __bool__(self) -> bool:
        return bool(self.steps)

    @property
    def names(self) -> list[str]:
        return [step.name for step in self.steps]

    def run(self, ds: Dataset) -> list[Dataset]:
        """Process one data set (changed in place); raises :class:`ProcessingError`."""
        current = [ds]
        for step in self.steps:
            produced: list[Dataset] = []
            for item in current:
                out = step.apply(item)
                if not out:
                    raise ProcessingError(step.name, "the step produced no instance")
                produced += out
            current = produced
        return current

    def process_file(self, source: Path, out_dir: Path) -> list[Output]:
        """Read ``source`` (a Part 10 file), run the steps, write the outputs into
        ``out_dir`` (created) as ``<n>.dcm``; returns them in order."""
        try:
            ds = pydicom.dcmread(source)
        except (InvalidDicomError, ValueError, EOFError, OSError) as exc:
            raise ProcessingError("unreadable", f"cannot read the stored file: {exc}") from exc
        _check_storable(ds)
        outputs = self.run(ds)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for n, out in enumerate(outputs):
            path = out_dir / f"{n}.dcm"
            write_part10(out, path)
            written.append(
                Output(
                    path=path,
                    sop_class_uid=str(out.SOPClassUID),
                    sop_instance_uid=str(out.SOPInstanceUID),
                    transfer_syntax_uid=str(out.file_meta.TransferSyntaxUID),
                    study_instance_uid=str(out.get("StudyInstanceUID", "")),
                    series_instance_uid=str(out.get("SeriesInstanceUID", "")),
                    size=path.stat().st_size,
                )
            )
        return written


def _check_storable(ds: Dataset) -> None:
    """Refuse a data set without SOP Class or SOP Instance UID (reason ``not_storable``):
    every composite instance has both (PS3.3 C.12.1), and the file meta of its output is
    derived from them (PS3.10 7.1). UIDs found only in the file meta are not used: the
    data set is the truth (PS3.7 9.3.1.1), and a data set without them is not an instance
    (pydicom's ``chrSQEncoding.dcm``: a few attributes and a sequence)."""
    missing = [
        name
        for keyword, name in (
            ("SOPClassUID", "SOP Class UID"),
            ("SOPInstanceUID", "SOP Instance UID"),
        )
        if not str(ds.get(keyword, "") or "").strip()
    ]
    if missing:
        raise ProcessingError(
            "not_storable", f"not a storable instance: no {' or '.join(missing)} in the data set"
        )


def write_part10(ds: Dataset, path: Path | BinaryIO) -> None:
    """Write ``ds`` as a Part 10 file whose file meta matches it (PS3.10 7.1);
    :class:`ProcessingError` (``not_storable``) when it has no SOP Class or Instance UID."""
    _check_storable(ds)
    meta = ds.file_meta if isinstance(getattr(ds, "file_meta", None), FileMetaDataset) else None
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.ImplementationClassUID = pydicom.uid.UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    for private in (
        "SourceApplicationEntityTitle",
        "PrivateInformationCreatorUID",
        "PrivateInformation",
    ):
        if private in meta:  # our arrival context stays with the stored original
            del meta[private]
    ds.save_as(path, enforce_file_format=True)
