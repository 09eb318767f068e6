"""SIGINT as a terminal's foreground job has it, for the tests that send it to a child.

A job a shell starts in the background without job control (``cmd &`` in a script, as a CI runner
or a ``nohup`` may start the test run) inherits SIGINT ignored, and so does every process it
starts (signal(7): ignored dispositions survive fork and execve). energyprof keeps an inherited
ignore, as a shell does, so a test that checks what Ctrl-C does gives its child the default
disposition first, whatever the runner inherited."""

from __future__ import annotations

import signal


def sigint_default() -> None:
    """``preexec_fn`` for ``subprocess.Popen``: SIGINT back to its default action in the child."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
