"""examples/flower-cwmp runs with Flower's own CLI, as its README says: ``flwr run
examples/flower-cwmp --stream`` on the local simulation runtime (skipped without flwr).

``flwr run`` (flwr 1.42, flwr/cli/local_superlink.py) starts a detached ``flower-superlink
--simulation`` listening on FLWR_LOCAL_SUPERLINK_HTTP_API_PORT (39091) and
FLWR_LOCAL_CONTROL_API_PORT (39093), logging to $FLWR_HOME/local-superlink/superlink.log, and
leaves it running. The test gives it a temporary FLWR_HOME and free ports, so it never meets a
user's SuperLink, and stops the one it started: the process whose command line names that
temporary log file."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "flower-cwmp"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _superlinks_of(flwr_home: Path) -> list[int]:
    """PIDs of flower-superlink processes logging under ``flwr_home`` (only the test's own)."""
    marker = str(flwr_home / "local-superlink")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "flower-superlink" in cmdline and marker in cmdline:
            found.append(int(entry.name))
    return found


def _stop(pids: list[int], wait_s: float = 30.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.5)
    for pid in pids:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the SuperLink through /proc")
def test_flwr_run_runs_the_example_with_mlp_and_cnn(tmp_path):
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent)) or shutil.which("flwr")
    if flwr is None:
        pytest.skip("the flwr command is not installed")
    home = tmp_path / "flwr-home"
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0",
               FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()), FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    try:
        for model in ("mlp", "cnn"):
            run = subprocess.run(
                [flwr, "run", str(EXAMPLE), "--stream", "--run-config", f"num-server-rounds=2 model='{model}'"],
                env=env, capture_output=True, text=True, timeout=600,
            )
            out = run.stdout + run.stderr
            assert run.returncode == 0, out[-3000:]
            assert "CWMP (sim-rpi4, cwmp @ keep ratio 0.05, p=1.0) [SIMULATED profile]" in out, out[-3000:]
            assert "round 2: predicted" in out and "layers opened" in out, out[-3000:]
    finally:
        pids = _superlinks_of(home)
        _stop(pids)
    assert pids, "flwr run started no local SuperLink under the test's FLWR_HOME"
    assert not _superlinks_of(home)
