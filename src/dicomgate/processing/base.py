"""What every processing step is: a small class with one job, configured from YAML.

A step gets a pydicom :class:`Dataset` (a private copy: the stored original is never
touched) and returns the data sets to send on: usually ``[ds]`` changed in place, several
for ``split``, never an empty list (a step that refuses an instance raises
:class:`ProcessingError` instead). Steps are pure functions of (data set, configuration,
secrets): the same input always gives the same output, on every node, so a retried or
re-sent delivery is identical to the first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydicom import Dataset

from dicomgate.errors import DicomgateError
from dicomgate.models import ConfigModel

__all__ = ["ProcessingError", "Step", "StepContext"]


class ProcessingError(DicomgateError):
    """The instance cannot be processed by a step; it is not sent (the job is dead-lettered
    with ``reason``, e.g. ``burned_in_annotation`` or ``cannot_transcode``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class StepContext:
    """What a step may need besides its settings."""

    environ: Mapping[str, str] = field(default_factory=dict)  # secrets (e.g. secret_env)
    base_dir: Path = Path(".")  # relative paths in settings (lookup tables) start here


class Step(ABC):
    """One processing step. Subclasses set ``name`` and ``Config`` and implement ``apply``."""

    name: ClassVar[str]
    Config: ClassVar[type[ConfigModel]]

    def __init__(self, config: Any, context: StepContext) -> None:
        self.config = config
        self.context = context

    @abstractmethod
    def apply(self, ds: Dataset) -> list[Dataset]:
        """Process ``ds`` (it may be changed in place); the data sets to send on."""

    def check(self) -> None:
        """Validate what the config model cannot (files exist, secrets are set); raise
        ``ValueError`` with a message naming the setting. Called once at start-up."""
        return None
