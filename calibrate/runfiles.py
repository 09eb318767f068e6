"""The files of one calibration run beside ``--out``, and the rules that keep two runs apart.

* ``<out>.lock``: an advisory lock (``fcntl.flock``) held for the whole run. A second run on the
  same ``--out`` (plain, ``--resume`` or ``--force``) is refused at once with the holder's PID. The
  holder removes the file when it ends; a run killed outright leaves it behind unlocked, and the
  next run takes it (the kernel drops a dead process's locks).
* ``<out>.calibration.json`` and ``<out>.measurements.csv`` of a new run are created exclusively
  (``O_EXCL``), under the lock, after the old ones (``--force``) were moved aside. The CSV stays
  open for the run: every row goes to the file this run created, whatever happens to the path.
* ``--resume`` reads the CSV through :func:`read_rows`, which checks every line (field count, every
  number finite, the id one of this plan's and not seen before, the row the plan's item). A bad line
  is refused with its ``file:line`` and the exact command that deletes the bad lines; the next
  ``--resume`` measures them again. Nothing bad is ever fitted.
"""

from __future__ import annotations

import csv
import math
import os
import shlex
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable

from energyprof.counts import WorkCounts
from energyprof.errors import EnergyprofError

__all__ = ["CalibrationError", "CalibrationInterrupted", "RunLocked", "RunLock", "CsvAppender", "read_rows",
           "row_problem", "check_output_path", "REQUIRED_COLUMNS"]


class CalibrationError(EnergyprofError):
    """A calibration that cannot start or continue (its message says what to do)."""


class CalibrationInterrupted(CalibrationError):
    """Ctrl-C (SIGINT) during a calibration: what finished is saved; exit status 130, as a shell says."""

    exit_code = 130


class RunLocked(CalibrationError):
    """Another calibration holds the lock of this ``--out``."""


# ---------------------------------------------------------------------------- output folder
def check_output_path(out: Path, what: str = "--out") -> None:
    """Refuse, before any work, a profile path that cannot be written. Creates nothing."""
    from energyprof.outputs import check_output_file

    check_output_file(out, what)


# ---------------------------------------------------------------------------- the lock
class RunLock:
    """``fcntl.flock`` on ``<out>.lock``, non-blocking; the file holds the holder's PID."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = self.out.with_name(self.out.name + ".lock")
        self.fd: int | None = None

    def _holder(self, fd: int) -> str:
        try:
            text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        except OSError:
            text = ""
        return text if text.isdigit() else "unknown"

    def acquire(self) -> "RunLock":
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise RunLocked(
                    f"another calibration (PID {holder}) is writing {self.out} (lock {self.path}); wait for it to "
                    f"finish, or stop it (kill {holder}) and continue with --resume, or choose another --out"
                ) from None
            # the file locked must still be the one at the path: a run that ends removes it
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.fd = fd
            return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it (see acquire)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------------- writing rows
class CsvAppender:
    """The run's CSV, opened once (``exclusive``: it must be new) and kept open; each row is
    written, flushed and synced as it finishes."""

    def __init__(self, path: Path, exclusive: bool) -> None:
        self.path = Path(path)
        self._file = open(self.path, "x" if exclusive else "a", newline="")
        self._file.seek(0, os.SEEK_END)

    def append_row(self, row: dict[str, Any]) -> None:
        import pandas as pd

        new = self._file.tell() == 0
        pd.DataFrame([row]).to_csv(self._file, header=new, index=False)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name


# ---------------------------------------------------------------------------- checking rows
COUNT_FIELDS = tuple(f.name for f in fields(WorkCounts))
FINITE_COLUMNS = ("size", "kept", "lines", *COUNT_FIELDS, "joules_per_call", "ci_low_j", "ci_high_j", "se_j",
                  "total_joules_per_call", "seconds_per_call", "idle_power_w", "calls", "windows")
NUMBER_COLUMNS = ("idle_se_w", "idle_windows", "wall_s")  # numbers, NaN allowed (no idle yet, unknown)
REQUIRED_COLUMNS = ("id", "kind", "workload", "dtype", "density", "model", "tensors", *FINITE_COLUMNS,
                    *NUMBER_COLUMNS, "simulated")


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def row_problem(row: dict[str, Any], plan: dict[str, Any] | None = None) -> str | None:
    """What is wrong with one measurement row (a dict of values or of CSV strings), or None.
    ``plan``: id -> PlanItem of the run, to check that the row is that item's."""
    rid = str(row.get("id") or "").strip()
    if not rid:
        return "no id"
    for column in FINITE_COLUMNS:
        v = _number(row.get(column))
        if v is None:
            return f"{column}={row.get(column)!r} is not a number"
        if not math.isfinite(v):
            return f"{column}={row.get(column)!r} is not finite (a measurement that failed)"
    for column in NUMBER_COLUMNS:
        raw = row.get(column)
        if raw in (None, "") or (isinstance(raw, float) and math.isnan(raw)):
            continue
        v = _number(raw)
        if v is None or math.isinf(v):
            return f"{column}={raw!r} is not a number"
    if str(row.get("simulated")) not in ("True", "False", "true", "false"):
        return f"simulated={row.get('simulated')!r} is neither True nor False"
    if plan is not None:
        item = plan.get(rid)
        if item is None and rid.startswith("reference/") and str(row.get("kind")) == "reference":
            return None  # the periodic reference kernel (drift), outside the plan by design
        if item is None:
            return f"id {rid!r} is not in this run's plan"
        if str(row.get("kind")) != item.kind or str(row.get("workload")) != item.workload \
                or _number(row.get("size")) != float(item.size) or str(row.get("dtype")) != item.dtype:
            return f"the row does not describe plan item {rid!r} (kind, workload, size or dtype differ)"
    return None


def read_rows(csv_path: Path, plan: dict[str, Any], repair_then: str) -> tuple[list[int], int]:
    """Check every line of a run's CSV. Returns (line numbers of the good data rows, 1-based; and
    whether a torn last line, a crash's half-written row, was dropped: 0 or 1). Raises
    :class:`CalibrationError` naming each bad line (``file:line: why``) and the command that deletes
    them, followed by ``repair_then`` (the same calibration with --resume, which measures them again)."""
    data = csv_path.read_bytes()
    torn = 0
    if data and not data.endswith(b"\n"):
        # a process killed while appending leaves its last line without a newline: that row is
        # measured again (every finished row ends with one)
        data = data[: data.rfind(b"\n") + 1]
        torn = 1
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        bad = [(line, "bytes that are not text (UTF-8)")]
        text = None
    if text is not None:
        bad = []
        lines = text.splitlines()
        if not lines:
            return [], torn
        header = next(csv.reader([lines[0]]))
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing or len(set(header)) != len(header):
            why = (f"the header lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}" if missing
                   else "the header repeats a column")
            raise CalibrationError(
                f"{csv_path}:1: {why}: this is not a measurements CSV written by energyprof calibrate, or its first "
                f"line was damaged; the rows cannot be read without it. Restore it from a copy, or start over "
                f"keeping the old files aside: {repair_then.replace(' --resume', ' --force')}"
            )
        good: list[int] = []
        seen: dict[str, int] = {}
        for number, raw in enumerate(lines[1:], start=2):
            try:
                values = next(csv.reader([raw]))
            except (csv.Error, StopIteration):
                values = []
            if len(values) != len(header):
                bad.append((number, f"{len(values)} fields where the header has {len(header)} (a torn or garbled "
                                    "line)"))
                continue
            row = dict(zip(header, values))
            problem = row_problem(row, plan)
            rid = row["id"]
            if problem is None and rid in seen:
                problem = f"id {rid!r} again (first on line {seen[rid]}): two runs wrote this file"
            if problem:
                bad.append((number, problem))
                continue
            seen[rid] = number
            good.append(number)
    if bad:
        shown = "\n".join(f"  {csv_path}:{n}: {why}" for n, why in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        script = ";".join(f"{n}d" for n, _ in bad)
        raise CalibrationError(
            f"{len(bad)} bad line(s) in {csv_path}; none is fitted:\n{shown}{more}\n"
            f"delete them (a copy is kept as {csv_path.name}.bak) and measure them again:\n"
            f"  sed -i.bak {shlex.quote(script)} {shlex.quote(str(csv_path))} && {repair_then}"
        )
    return good, torn


def resume_command(meter_spec: str, models: Iterable[str], out: Path, device: str | None, quick: bool,
                   min_layer_numel: int | None, allow_device_mismatch: bool = False) -> str:
    """The command line that continues this run (shown in messages)."""
    parts = ["energyprof", "calibrate", "--meter", meter_spec, "--model", ",".join(models), "--out", str(out)]
    if device is not None:
        parts += ["--device", device]
    if quick:
        parts.append("--quick")
    if min_layer_numel is not None:
        parts += ["--min-layer-numel", str(min_layer_numel)]
    if allow_device_mismatch:
        parts.append("--allow-device-mismatch")
    return " ".join(shlex.quote(p) for p in parts) + " --resume"


def write_new(path: Path, text: str) -> None:
    """Create ``path`` with ``text``; it must not exist (exclusive creation)."""
    with open(path, "x") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def replace_text(path: Path, text: str) -> None:
    """Replace ``path``'s content atomically (a temporary file beside it, then rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
