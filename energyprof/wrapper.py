"""``energyprof measure``: run a command under a meter window, as a process wrapper should.

* SIGTERM, SIGINT, SIGHUP and SIGQUIT sent to energyprof are forwarded to the command. A signal the
  terminal sent to the whole foreground process group (Ctrl-C, Ctrl-\\) already reached the command
  and is not sent twice; the kernel tells the two apart (``si_code`` SI_KERNEL for the terminal's).
  A signal ignored when energyprof started (a shell's background job has SIGINT ignored unless
  ``set -m``) stays ignored, as a shell would have it.
* The wrapper waits for the command whatever arrives, ends the window and reports. Its exit status
  is the command's, or 128+N when the command died of signal N (as a shell reports it).
* Never an orphan: on Linux the command gets SIGTERM if energyprof itself dies (``PR_SET_PDEATHSIG``),
  and any error of energyprof's own while the command runs terminates and reaps it.

The signals are blocked in energyprof and waited for with ``sigwaitinfo``, so no handler runs
in the middle of a meter read; the command starts with the signal mask energyprof had.
"""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from energyprof.errors import EnergyprofError

__all__ = ["CommandError", "HeldSignals", "Outcome", "run_measured", "exit_status"]

FORWARDED = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, n))
SI_KERNEL = 0x80  # Linux siginfo si_code of a signal the kernel sent (the terminal's, to its foreground group)
PR_SET_PDEATHSIG = 1


class CommandError(EnergyprofError):
    """The command could not be started; ``exit_code`` is what a shell exits with (126, 127)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Outcome:
    returncode: int  # Popen's: negative -N when the command died of signal N
    measurement: Any
    forwarded: list[str] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        return exit_status(self.returncode)

    @property
    def signal(self) -> str | None:
        return _name(-self.returncode) if self.returncode < 0 else None


def exit_status(returncode: int) -> int:
    """A shell's status for a Popen return code: the code, or 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _child_setup(mask: Any) -> Callable[[], None]:
    prctl = None
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            prctl = None

    def setup() -> None:  # runs in the forked child, before exec
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    return setup


def _start(command: Sequence[str], stdout: Any, mask: Any) -> subprocess.Popen:
    try:
        return subprocess.Popen(list(command), stdout=stdout, preexec_fn=_child_setup(mask))
    except FileNotFoundError:
        raise CommandError(f"command not found: {command[0]}", 127) from None
    except PermissionError:
        raise CommandError(f"command is not executable: {command[0]} (permission denied)", 126) from None
    except OSError as exc:
        what = {errno.E2BIG: "the command line is too long for the system (E2BIG)",
                errno.ENAMETOOLONG: "the command's name is too long",
                errno.ENOEXEC: "the file is not an executable this system can run (no #! line?)"}.get(
                    exc.errno, exc.strerror or str(exc))
        shown = command[0] if len(command[0]) <= 80 else command[0][:77] + "..."
        raise CommandError(f"cannot run {shown}: {what}", 126) from None


class HeldSignals:
    """Block the forwarded signals (and SIGCHLD) in this thread, and so in every thread it starts
    afterwards (a meter's sampler): enter it before opening the meter, so that no thread takes a
    SIGTERM's default action while the command runs. Leaving drops what is pending and restores
    the mask."""

    def __enter__(self) -> "HeldSignals":
        self.watched = {s for s in FORWARDED if signal.getsignal(s) is not signal.SIG_IGN} | {signal.SIGCHLD}
        self.old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.watched)
        return self

    def __exit__(self, *exc: object) -> None:
        while signal.sigtimedwait(self.watched, 0) is not None:
            pass
        signal.pthread_sigmask(signal.SIG_SETMASK, self.old_mask)


def run_measured(command: Sequence[str], meter: Any, held: HeldSignals, stdout: Any = None,
                 window: str = "command") -> Outcome:
    """Run ``command`` inside meter window ``window`` (see the module docstring), with ``held``
    entered before ``meter`` was opened. ``stdout``: where the command's standard output goes
    (None: energyprof's own)."""
    forwarded: list[str] = []
    proc: subprocess.Popen | None = None
    try:
        meter.begin(window)
        try:
            proc = _start(command, stdout, held.old_mask)
        except BaseException:
            meter.discard(window)
            raise
        while proc.poll() is None:
            # no timeout: SIGCHLD (blocked since before the command started, so never lost) ends the
            # wait when the command exits. (CPython's sigtimedwait returns an uninitialised siginfo
            # when a stop/continue interrupts it past its timeout, a phantom signal; sigwaitinfo
            # just waits again.)
            info = signal.sigwaitinfo(held.watched)
            if info.si_signo == signal.SIGCHLD:
                continue
            if info.si_code != SI_KERNEL:  # sent to energyprof (kill): the command has not had it
                proc.send_signal(info.si_signo)
                forwarded.append(_name(info.si_signo))
        measurement = meter.end(window)
        return Outcome(proc.returncode, measurement, forwarded)
    except BaseException:
        if proc is not None and proc.poll() is None:  # an error of ours: never leave the command behind
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise
