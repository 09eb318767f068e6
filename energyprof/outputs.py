"""Output paths checked before any work: a run that measures for minutes must not learn at its end
that it cannot write its result. These checks create nothing."""

from __future__ import annotations

import os
from pathlib import Path

from energyprof.errors import EnergyprofError

__all__ = ["OutputPathError", "check_output_file", "check_output_folder"]


class OutputPathError(EnergyprofError, ValueError):
    """An output path that cannot be written (its message names the option, the path and why)."""


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return probe


def _writable_folder(folder: Path, what: str, shown: Path) -> None:
    probe = _nearest_existing(folder)
    if not probe.is_dir():
        raise OutputPathError(f"{what} {shown}: {probe} is a file, not a folder; choose another {what}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {shown}: cannot write in {probe} (permission denied); choose another {what}")


def check_output_file(path: str | os.PathLike[str], what: str = "--out") -> Path:
    """A file path whose folder exists (or can be made) and is writable, and that is not a folder.
    An existing file must be writable (whether it may be replaced is the caller's rule)."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a folder; give a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{what} {path}: the file is not writable (permission denied)")
    _writable_folder(path.parent if str(path.parent) else Path("."), what, path)
    return path


def check_output_folder(path: str | os.PathLike[str], what: str = "--out") -> Path:
    """A folder that exists and is writable, or can be created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} {path} is a file; give a folder")
    _writable_folder(path, what, path)
    return path
