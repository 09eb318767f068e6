"""Where the battery meter reads its power_supply files: this machine's sysfs, or an Android device's
over adb (``adb -s SERIAL exec-out``). The files, their units and meaning are the kernel's
(Documentation/ABI/testing/sysfs-class-power); see :mod:`energyprof.meters.battery`."""

from __future__ import annotations

import errno
import os
import shlex
import subprocess
import threading

from energyprof.errors import MeterUnavailable

__all__ = ["Files", "AdbFiles", "LOCAL"]


class Files:
    """Where the power_supply files are read: this machine's sysfs (or a tree under ``root``)."""

    description = "this machine"

    def read(self, path: str) -> str:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def prefetch(self, paths: list[str]) -> None:
        """Read ``paths`` in one go before they are read one by one (a no-op for local files)."""


class AdbFiles(Files):
    """The files of an Android device, read over adb (``adb -s SERIAL exec-out``): each poll is one
    round trip that reads every file it needs (``prefetch``), since a round trip takes tens of
    milliseconds over Wi-Fi. The phone must not be on a USB cable to a computer (it would charge):
    use wireless debugging (``adb pair``, ``adb connect``)."""

    _MARK = "@energyprof@"

    def __init__(self, serial: str, adb: str = "adb", timeout_s: float = 5.0) -> None:
        self.serial, self.adb, self.timeout_s = serial, adb, timeout_s
        self.description = f"adb device {serial}"
        self._cache = threading.local()
        self.measuring = False  # set once the meter is open: errors are then retried, not fatal

    def _run(self, script: str) -> str:
        argv = [self.adb, "-s", self.serial, "exec-out", script]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s, check=False)
        except FileNotFoundError:
            raise MeterUnavailable(f"{self.adb} not found: install Android's platform-tools (adb)") from None
        except subprocess.TimeoutExpired:
            raise OSError(errno.ETIMEDOUT, f"adb -s {self.serial} did not answer within {self.timeout_s:g} s") from None
        if done.returncode != 0 and not done.stdout:
            said = (done.stderr or "").strip().splitlines()
            if self.measuring:  # a Wi-Fi hiccup: the polling core retries until max_gap_s
                raise OSError(errno.ECOMM, f"adb -s {self.serial}: {said[-1] if said else done.returncode}")
            raise MeterUnavailable(f"adb -s {self.serial}: {said[-1] if said else f'exit status {done.returncode}'}; "
                                   "check 'adb devices' (wireless debugging: adb pair / adb connect)")
        return done.stdout

    def prefetch(self, paths: list[str]) -> None:
        quoted = " ".join(shlex.quote(p) for p in paths)
        out = self._run(f'for f in {quoted}; do v=$(cat "$f" 2>&1) && echo "{self._MARK}OK $v" '
                        f'|| echo "{self._MARK}ERR $v"; done')
        answers = out.split(self._MARK)[1:]  # one "OK value" or "ERR message" per path, in order
        self._cache.values = dict(zip(paths, (answer.strip() for answer in answers)))

    def read(self, path: str) -> str:
        cache = getattr(self._cache, "values", None) or {}
        line = cache.pop(path, None)
        if line is None:
            self.prefetch([path])
            line = self._cache.values.pop(path, "ERR no answer")
        status, _, value = line.partition(" ")
        if status == "OK":
            return value.strip()
        if "Permission denied" in value:
            raise PermissionError(errno.EACCES, f"{value.strip()} (the adb shell user may not read it)", path)
        if "No such file" in value:
            raise FileNotFoundError(errno.ENOENT, value.strip(), path)
        raise OSError(errno.EIO, value.strip(), path)

    def listdir(self, path: str) -> list[str]:
        out = self._run(f"ls -1 {shlex.quote(path)} 2>/dev/null && echo {self._MARK}")
        if self._MARK not in out:
            raise FileNotFoundError(errno.ENOENT, "not found on the device", path)
        return [l.strip() for l in out.split(self._MARK)[0].splitlines() if l.strip()]

    def isdir(self, path: str) -> bool:
        return self._MARK in self._run(f"[ -d {shlex.quote(path)} ] && echo {self._MARK}")

    def exists(self, path: str) -> bool:
        return self._MARK in self._run(f"[ -e {shlex.quote(path)} ] && echo {self._MARK}")


LOCAL = Files()
