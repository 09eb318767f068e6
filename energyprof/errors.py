"""The project's own exceptions. Vendor errors (NVML codes, OSError from sysfs, serial and I2C
errors) are mapped to these with a message that names the problem and the fix."""

from __future__ import annotations

from typing import Any


class EnergyprofError(Exception):
    """Base class of every error energyprof raises on purpose."""


class MeterSpecError(EnergyprofError, ValueError):
    """A meter spec string (``BACKEND[:key=value,...]``) is malformed or names unknown keys."""


class MeterUnavailable(EnergyprofError):
    """A backend cannot start here: library missing, no device, no counter tree."""


class MeterNotSupported(MeterUnavailable):
    """The device exists but does not offer what the backend needs (e.g. no energy counter)."""


class MeterPermissionError(MeterUnavailable):
    """The counter exists but this user may not read it."""


class MeterFailure(EnergyprofError):
    """A meter that was working stopped answering or lost its device during a measurement.

    Raised by the measurement protocol, it also says where: ``workload`` (its name), ``window``
    (e.g. ``"kernel window 3 of 4"``) and ``finished``, a pandas DataFrame of the windows that were
    measured before the failure (the rows ``ProtocolResult.table`` would have started with), so a
    caller can keep them. All three are None when the failure came from a meter directly.
    """

    def __init__(self, message: str, *, workload: str | None = None, window: str | None = None,
                 finished: Any = None) -> None:
        super().__init__(message)
        self.workload = workload
        self.window = window
        self.finished = finished


class BadReading(EnergyprofError, ValueError):
    """A line or record from an external meter that cannot be read (not a number, wrong field
    count, corrupt bytes). Sources count and skip it; the message says what is wrong with it."""


class WindowError(EnergyprofError):
    """Misuse of measurement windows: ending a window that was never begun, reusing an open name."""


class NoEnergyObserved(EnergyprofError):
    """A window in which the meter's counter never moved: the window is too short for the meter's
    update period, or the meter is not observing the work. Never reported as zero joules."""
