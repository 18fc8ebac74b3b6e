"""``dicomgate process``: run a pipeline over files and folders, writing the results.

The same steps as a route's ``pipeline:`` (built by :func:`dicomgate.processing.pipeline.build`),
for batch work: de-identify a research export, transcode an archive folder. Outputs keep
the input's relative path under OUT; a step that makes several instances of one (``split``)
writes ``NAME-1.dcm``, ``NAME-2.dcm`` ... Files that are not DICOM are skipped and counted.
The same input and pipeline always give the same output.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dicomgate.dimse.scu import UnreadableDicom, iter_candidate_files, scan_file
from dicomgate.errors import ConfigError, DicomgateError
from dicomgate.processing.base import ProcessingError, StepContext
from dicomgate.processing.pipeline import Pipeline, build

__all__ = ["BatchSummary", "OutputUnusable", "load_pipeline", "process_paths"]


class OutputUnusable(DicomgateError):
    """The output folder cannot be created or written (a usage error: nothing is written)."""


def load_pipeline(path: Path) -> Pipeline:
    """A pipeline file: a YAML list of steps, or ``{pipeline: [...]}``; ConfigError if bad."""
    try:
        data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path} is not valid YAML: {exc}") from exc
    if isinstance(data, dict) and set(data) == {"pipeline"}:
        data = data["pipeline"]
    if not isinstance(data, list) or not data:
        raise ConfigError("pipeline", "expected a non-empty list of steps")
    return build(data, "pipeline", StepContext(environ=os.environ, base_dir=path.parent))


@dataclass
class BatchSummary:
    processed: int = 0  # input instances processed
    written: int = 0  # output instances written
    failed: int = 0
    skipped: int = 0  # not DICOM
    failures: list[tuple[str, str]] = field(default_factory=list)
    elapsed: float = 0.0

    def describe(self) -> str:
        rate = self.processed / self.elapsed if self.elapsed > 0 else 0.0
        lines = [
            f"{self.processed} processed ({self.written} written), {self.failed} failed,"
            f" {self.skipped} skipped (not DICOM) in {self.elapsed:.1f} s ({rate:.0f}/s)"
        ]
        lines += [f"  {path}: {reason}" for path, reason in self.failures[:20]]
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more")
        return "\n".join(lines)


def _target(source: Path, root: Path, out: Path, n: int, total: int) -> Path:
    rel = source.relative_to(root) if root.is_dir() else Path(source.name)
    if total > 1:
        rel = rel.with_name(f"{rel.stem}-{n + 1}{rel.suffix or '.dcm'}")
    return out / rel


def _work_dir(out: Path) -> tempfile.TemporaryDirectory[str]:
    """Create ``out`` if missing and a work folder inside it (so that results are moved,
    not copied, into place); :class:`OutputUnusable` with the reason when it cannot be."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryDirectory(prefix=".dicomgate-process-", dir=out)
    except FileExistsError:
        raise OutputUnusable(f"output folder {out}: a file of that name exists") from None
    except OSError as exc:
        raise OutputUnusable(
            f"output folder {out}: cannot create or write it: {exc.strerror or exc}"
        ) from None


def process_paths(
    pipeline: Pipeline,
    inputs: list[Path],
    out: Path,
    progress: Callable[[int], None] | None = None,
) -> BatchSummary:
    """Process every DICOM file under ``inputs`` into ``out``; :class:`OutputUnusable`
    before anything is read when ``out`` cannot be created or written."""
    summary = BatchSummary()
    started = time.monotonic()
    with _work_dir(out) as tmp:
        for root in inputs:
            for source in iter_candidate_files([root]):
                if out in source.parents:
                    continue  # never re-read our own outputs
                try:
                    if scan_file(source) is None:
                        summary.skipped += 1
                        continue
                    outputs = pipeline.process_file(source, Path(tmp))
                except (ProcessingError, UnreadableDicom, OSError) as exc:
                    summary.failed += 1
                    summary.failures.append((str(source), str(exc)))
                    continue
                finally:
                    if progress is not None:
                        progress(1)
                try:
                    for n, output in enumerate(outputs):
                        target = _target(source, root, out, n, len(outputs))
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.move(output.path, target)
                        summary.written += 1
                except OSError as exc:  # e.g. a file where the output's sub-folder goes
                    summary.failed += 1
                    summary.failures.append((str(source), f"cannot write: {exc.strerror or exc}"))
                    continue
                summary.processed += 1
    summary.elapsed = time.monotonic() - started
    return summary


def run_batch(pipeline_file: Path, inputs: list[Path], out: Path, show_progress: bool) -> int:
    """The ``dicomgate process`` command: prints the summary; exit code 0 or 1."""
    pipeline = load_pipeline(pipeline_file)
    if show_progress and sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import Progress

        total = sum(1 for _ in iter_candidate_files(inputs))
        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("processing", total=total)
            summary = process_paths(pipeline, inputs, out, lambda n: bar.advance(task, n))
    else:
        summary = process_paths(pipeline, inputs, out)
    print(summary.describe())
    return 1 if summary.failed else 0
