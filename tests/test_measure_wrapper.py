"""`energyprof measure` as a process wrapper (issue 18, rows 5, 7 and 10): signals reach the command,
the status of a command killed by signal N is 128+N, the command is never left running, and its
stdout stays out of --json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.sigint import sigint_default

ROOT = Path(__file__).resolve().parent.parent
METER = "sim:preset=rpi4,noise_w=0"


def start(*args: str, **kw) -> subprocess.Popen:
    kw.setdefault("preexec_fn", sigint_default)  # as in a terminal, whatever the test runner inherited
    return subprocess.Popen([sys.executable, "-m", "energyprof", "measure", "--meter", METER, *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too (reaped by init later)
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)  # the command is in its sleep
    return int(path.read_text())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_energyprof_reaches_the_command_and_the_report_is_written(tmp_path, signum):
    pidfile = tmp_path / "pid"
    proc = start("--json", "--", "sh", "-c", f"echo $$ > {pidfile}; exec sleep 60")
    child = wait_for(pidfile, proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    result = json.loads(out)
    assert result["returncode"] == 128 + signum and result["signal"] == signal.Signals(signum).name
    assert result["forwarded_signals"] == [signal.Signals(signum).name] and result["simulated"] is True
    assert not alive(child)


def test_a_command_killed_by_a_signal_gives_128_plus_n():
    r = subprocess.run([sys.executable, "-m", "energyprof", "measure", "--meter", METER, "--", "sh", "-c",
                        "kill -USR1 $$"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 128 + signal.SIGUSR1, r.stderr
    assert "killed by SIGUSR1" in r.stdout


def test_the_command_is_not_left_running_when_energyprof_is_killed_outright(tmp_path):
    pidfile = tmp_path / "pid"
    proc = subprocess.Popen([sys.executable, "-m", "energyprof", "measure", "--meter", METER, "--", "sh", "-c",
                             f"echo $$ > {pidfile}; exec sleep 600"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    child = wait_for(pidfile, proc)
    try:
        proc.kill()  # SIGKILL: no handler runs; the kernel's parent-death signal ends the command
        proc.wait(timeout=60)
        deadline = time.monotonic() + 20
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child), "the command was left running, orphaned"
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)


def test_the_commands_stdout_stays_out_of_json_and_output_file_keeps_it_apart(tmp_path):
    r = subprocess.run([sys.executable, "-m", "energyprof", "measure", "--meter", METER, "--json", "--", "sh", "-c",
                        "echo hello from the command"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["command"][0] == "sh"  # stdout is exactly one JSON object
    assert "hello from the command" in r.stderr
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "energyprof", "measure", "--meter", METER, "--json", "--output",
                        str(report), "--", "sh", "-c", "echo hello"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout == "hello\n"
    assert json.loads(report.read_text())["returncode"] == 0


def test_commands_that_cannot_run_are_one_line(tmp_path):
    script = tmp_path / "script.sh"
    script.write_text("echo hi\n")  # not executable
    for command, status, text in (
        ([str(script)], 126, "not executable"),
        (["x" * 5000], 126, "name is too long"),  # longer than NAME_MAX
        (["no-such-command-xyz"], 127, "command not found"),
    ):
        r = subprocess.run([sys.executable, "-m", "energyprof", "measure", "--meter", METER, "--", *command],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == status, (command[0][:20], r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and text in lines[0] and "Traceback" not in r.stderr, r.stderr[:300]


def test_a_command_line_over_the_kernels_limit_is_one_line(capsys):
    from energyprof.cli import main

    # one argument longer than the kernel's limit (MAX_ARG_STRLEN, 128 KiB): exec fails with E2BIG
    assert main(["measure", "--meter", METER, "--", "sh", "-c", "true", "y" * 300_000]) == 126
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the command line is too long" in err[0]


COUNT_SIGINTS = """
import signal, sys, time
ready, out = sys.argv[1], sys.argv[2]
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
open(ready, "w").write("1")
seen = []  # si_code of every SIGINT: 128 (SI_KERNEL) from the terminal, 0 (SI_USER) from kill()
first = signal.sigtimedwait({signal.SIGINT}, 60)
if first is not None:
    seen.append(first.si_code)
    deadline = time.monotonic() + 1.5  # a second, forwarded SIGINT would arrive meanwhile
    while (left := deadline - time.monotonic()) > 0:
        more = signal.sigtimedwait({signal.SIGINT}, left)
        if more is not None:
            seen.append(more.si_code)
open(out, "w").write(",".join(map(str, seen)))
"""


def test_ctrl_c_from_the_terminal_reaches_the_command_once(tmp_path):
    """The terminal sends SIGINT to its whole foreground process group (energyprof and the command):
    energyprof must not send it a second time. A pseudo-terminal with the standard line discipline
    (ISIG: the INTR character, ^C, raises SIGINT; termios(3)) plays the terminal."""
    import fcntl
    import termios

    ready, out = tmp_path / "ready", tmp_path / "count"
    master, slave = os.openpty()

    def controlling_terminal():
        sigint_default()
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([sys.executable, "-m", "energyprof", "measure", "--meter", METER, "--json", "--output",
                             str(tmp_path / "report.txt"), "--", sys.executable, "-c", COUNT_SIGINTS, str(ready),
                             str(out)], cwd=ROOT, stdin=slave, stdout=slave, stderr=slave,
                            preexec_fn=controlling_terminal)
    os.close(slave)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.write(master, b"\x03")  # Ctrl-C
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert out.read_text() == "128"  # the terminal's SIGINT, once; none from energyprof
    report = json.loads((tmp_path / "report.txt").read_text())
    assert report["returncode"] == 0 and "forwarded_signals" not in report
