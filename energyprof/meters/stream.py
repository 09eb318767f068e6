"""Line-stream power meters: any instrument or script that prints one sample per line.

``stream:tcp=HOST:PORT``, ``stream:serial=/dev/ttyUSB0,baud=115200``, ``stream:exec=COMMAND``,
``stream:file=PATH`` (followed like ``tail -f``: only lines written after opening count).

Line format: ``watts`` or ``timestamp_s,watts`` (comma or white space between the fields);
blank lines and lines starting with ``#`` are ignored. The first valid line fixes the format.
Anything else (headers, text, NaN, three columns, a line longer than 4 KiB, bytes that are not
UTF-8) is a bad line: it is skipped and counted (``bad_lines`` in each window's details).

Time base. Lines without a timestamp are stamped when they arrive. Timestamps are the sender's
clock, in seconds, from any origin (Unix time, seconds since the logger started...). They are
mapped onto the local monotonic clock by ``local = sender_t + offset``, where ``offset`` is the
smallest ``arrival - sender_t`` seen over the last ``clock_horizon_s`` (30 s) of arrivals: the
least-delayed recent sample defines the offset, so delivery delays and bursts (a buffered pipe)
never shift samples, a sample is never placed after its own arrival, and a sender clock that
drifts against ours is followed within the horizon. A sender timestamp that goes backwards
(clock stepped back, logger restarted) starts the mapping afresh from that sample; a step forward
moves the offset down at once. Both count in ``clock_jumps`` (an offset change of more than
1 s). A repeated timestamp is dropped (``dropped_samples``). ``timestamps=arrival`` ignores the
sender's timestamps and stamps every line on arrival.
"""

from __future__ import annotations

import collections
import math
import os
import re
import select
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterator

from energyprof.errors import BadReading, MeterFailure, MeterSpecError, MeterUnavailable
from energyprof.meters.base import MeterInfo, Probe
from energyprof.meters.sampled import SampledMeter, SampledOptions, SampleSource
from energyprof.meters.spec import MeterSpec

__all__ = ["parse_line", "SenderClock", "StreamSource", "open_from_spec", "probe"]

MAX_LINE_BYTES = 4096
_READ_TIMEOUT_S = 0.1
_FIELDS = re.compile(r"[,\s]+")
_SOURCES = ("tcp", "serial", "exec", "file")
_EXAMPLES = "stream:tcp=127.0.0.1:9100, stream:serial=/dev/ttyUSB0,baud=115200, stream:exec=COMMAND or stream:file=PATH"


def parse_line(text: str | bytes) -> tuple[float | None, float] | None:
    """``(timestamp or None, watts)`` of one line (text, or raw bytes in UTF-8), None for a blank or
    ``#`` line; :class:`BadReading` (a ValueError) naming the problem otherwise."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadReading(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    s = text.strip()
    if not s or s.startswith("#"):
        return None
    fields = _FIELDS.split(s)
    if len(fields) > 2:
        raise BadReading(f"{len(fields)} fields, expected 'watts' or 'timestamp_s,watts'")
    try:
        values = [float(f) for f in fields]
    except ValueError:
        bad = next(f for f in fields if not _is_float(f))
        raise BadReading(f"{bad[:40]!r} is not a number; expected 'watts' or 'timestamp_s,watts'") from None
    if not all(math.isfinite(v) for v in values):
        raise BadReading("not a finite number (nan or inf); expected 'watts' or 'timestamp_s,watts'")
    return (values[0], values[1]) if len(values) == 2 else (None, values[0])


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class SenderClock:
    """Maps a sender's timestamps onto the local monotonic clock (see the module doc)."""

    def __init__(self, horizon_s: float = 30.0, jump_s: float = 1.0) -> None:
        self.horizon_s = horizon_s
        self.jump_s = jump_s
        self.jumps = 0
        self._envelope: collections.deque[tuple[float, float]] = collections.deque()  # (arrival, offset)
        self._last_sender: float | None = None
        self._offset: float | None = None

    def map(self, sender_t: float, arrival: float) -> float:
        if self._last_sender is not None and sender_t < self._last_sender:
            self._envelope.clear()  # the sender's clock went backwards: start over
        self._last_sender = sender_t
        candidate = arrival - sender_t
        env = self._envelope
        while env and env[-1][1] >= candidate:
            env.pop()
        env.append((arrival, candidate))
        while env[0][0] < arrival - self.horizon_s:
            env.popleft()
        offset = env[0][1]
        if self._offset is not None and abs(offset - self._offset) > self.jump_s:
            self.jumps += 1
        self._offset = offset
        return sender_t + offset


# --------------------------------------------------------------------------- transports
class _Transport(ABC):
    """Raw bytes from the hardware boundary. ``read`` returns bytes, or None when nothing came
    within its short timeout; it raises MeterFailure when the stream ends or breaks."""

    description: str

    @abstractmethod
    def read(self) -> bytes | None: ...

    @abstractmethod
    def close(self) -> None: ...


class _TcpTransport(_Transport):
    def __init__(self, address: str, connect_timeout_s: float) -> None:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise MeterSpecError(f"tcp={address!r} is not HOST:PORT, e.g. tcp=127.0.0.1:9100")
        self.description = f"tcp {host}:{port}"
        try:
            self._sock = socket.create_connection((host.strip("[]"), int(port)), timeout=connect_timeout_s)
        except OSError as exc:
            raise MeterUnavailable(
                f"cannot connect to {host}:{port}: {exc}; is the meter's server running and listening there?"
            ) from exc
        self._sock.settimeout(_READ_TIMEOUT_S)

    def read(self) -> bytes | None:
        try:
            data = self._sock.recv(65536)
        except socket.timeout:
            return None
        except OSError as exc:
            raise MeterFailure(f"connection lost: {exc}") from exc
        if not data:
            raise MeterFailure("the server closed the connection")
        return data

    def close(self) -> None:
        self._sock.close()


class _SerialTransport(_Transport):
    def __init__(self, port: str, baud: int) -> None:
        import serial  # pyserial

        self.description = f"serial {port} at {baud} baud"
        try:
            self._port = serial.serial_for_url(port, baudrate=baud, timeout=_READ_TIMEOUT_S)
        except (serial.SerialException, ValueError) as exc:
            raise MeterUnavailable(f"cannot open serial port {port}: {exc}") from exc

    def read(self) -> bytes | None:
        import serial

        try:
            data = self._port.read(max(1, self._port.in_waiting))
        except (serial.SerialException, OSError) as exc:
            raise MeterFailure(f"serial port failed (unplugged?): {exc}") from exc
        return data or None

    def close(self) -> None:
        self._port.close()


class _ExecTransport(_Transport):
    """A command's stdout. Python children get PYTHONUNBUFFERED=1 so lines are not held back."""

    def __init__(self, command: str) -> None:
        argv = shlex.split(command)
        if not argv:
            raise MeterSpecError(f"exec= needs a command, e.g. {_EXAMPLES}")
        self.description = f"command {command!r}"
        self._stderr = tempfile.TemporaryFile()
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        except OSError as exc:
            self._stderr.close()
            raise MeterUnavailable(f"cannot run {argv[0]!r}: {exc}") from exc

    def read(self) -> bytes | None:
        fd = self._proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], _READ_TIMEOUT_S)
        if not ready:
            return None
        data = os.read(fd, 65536)
        if data:
            return data
        status = self._proc.wait()
        self._stderr.seek(0)
        tail = self._stderr.read()[-500:].decode("utf-8", "replace").strip()
        raise MeterFailure(f"the command exited with status {status}" + (f": {tail}" if tail else ""))

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc.stdout.close()
        self._stderr.close()


class _FileTransport(_Transport):
    """Follows a file like ``tail -F``: starts at its end, reopens it when rotated or truncated."""

    def __init__(self, path: str) -> None:
        self.description = f"file {path}"
        self._path = path
        try:
            self._file = open(path, "rb")
        except OSError as exc:
            raise MeterUnavailable(f"cannot read {path}: {exc}") from exc
        self._file.seek(0, os.SEEK_END)

    def read(self) -> bytes | None:
        data = self._file.read(65536)
        if data:
            return data
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            st = None  # being rotated: keep reading the old file until a new one appears
        if st is not None:
            if st.st_ino != os.fstat(self._file.fileno()).st_ino:
                self._file.close()
                self._file = open(self._path, "rb")
                return None
            if st.st_size < self._file.tell():
                self._file.seek(0)
                return None
        time.sleep(_READ_TIMEOUT_S / 5)
        return None

    def close(self) -> None:
        self._file.close()


# --------------------------------------------------------------------------- source
class StreamSource(SampleSource):
    """Turns a transport's bytes into samples (parsing, time base, counters)."""

    def __init__(
        self,
        transport: _Transport,
        use_timestamps: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._transport = transport
        self.description = transport.description
        self._use_timestamps = use_timestamps
        self._clock = clock
        self._sender_clock = SenderClock()
        self._timestamped: bool | None = None  # fixed by the first valid line
        self._stop = threading.Event()
        self._bad_lines = 0
        self.last_bad_line: str | None = None

    def samples(self) -> Iterator[tuple[float, float]]:
        pending = b""
        overlong = False  # discarding an overlong line up to its newline
        try:
            while not self._stop.is_set():
                chunk = self._transport.read()
                if chunk is None:
                    continue
                arrival = self._clock()
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                if overlong and lines:
                    lines.pop(0)  # the rest of the overlong line
                    overlong = False
                if len(pending) > MAX_LINE_BYTES:
                    if not overlong:
                        self._bad(pending, "line longer than 4 KiB")
                    overlong, pending = True, b""
                for raw in lines:
                    sample = self._parse(raw, arrival)
                    if sample is not None:
                        yield sample
        finally:
            self._transport.close()

    def _parse(self, raw: bytes, arrival: float) -> tuple[float, float] | None:
        try:
            parsed = parse_line(raw.decode("utf-8"))
        except ValueError as exc:  # includes UnicodeDecodeError
            self._bad(raw, str(exc))
            return None
        if parsed is None:
            return None
        stamp, watts = parsed
        has_stamp = stamp is not None
        if self._timestamped is None:
            self._timestamped = has_stamp
        if has_stamp != self._timestamped:
            expected = "timestamp_s,watts" if self._timestamped else "watts"
            self._bad(raw, f"expected '{expected}' like the first line")
            return None
        if stamp is None or not self._use_timestamps:
            return arrival, watts
        return self._sender_clock.map(stamp, arrival), watts

    def _bad(self, raw: bytes, why: str) -> None:
        self._bad_lines += 1
        self.last_bad_line = f"{raw[:80].decode('utf-8', 'replace')!r} ({why})"

    def close(self) -> None:
        self._stop.set()

    def counters(self) -> dict[str, int]:
        return {"bad_lines": self._bad_lines, "clock_jumps": self._sender_clock.jumps}


# --------------------------------------------------------------------------- spec
def _transport_factory(spec: MeterSpec) -> Callable[[], _Transport]:
    """Read the source keys (no side effects); the returned function connects."""
    given = {key: spec.get_str(key) for key in _SOURCES}
    given = {key: value for key, value in given.items() if value is not None}
    baud = spec.get_int("baud", 115200)
    connect_timeout_s = spec.get_float("connect_timeout_s", 5.0)
    if len(given) != 1:
        what = "no source" if not given else f"{len(given)} sources ({', '.join(given)})"
        raise MeterSpecError(f"meter spec {spec.text!r} gives {what}; give exactly one: {_EXAMPLES}")
    (key, value), = given.items()
    if not value:
        raise MeterSpecError(f"meter spec {spec.text!r}: {key}= is empty; use one of {_EXAMPLES}")
    if key == "tcp":
        return lambda: _TcpTransport(value, connect_timeout_s)
    if key == "serial":
        return lambda: _SerialTransport(value, baud)
    if key == "exec":
        return lambda: _ExecTransport(value)
    return lambda: _FileTransport(value)


def open_from_spec(spec: MeterSpec, **kwargs: Any) -> SampledMeter:
    options = SampledOptions.from_spec(spec, default_rate_hz=None)
    timestamps = spec.get_str("timestamps", "sender")
    if timestamps not in ("sender", "arrival"):
        raise MeterSpecError(f"meter spec {spec.text!r}: timestamps must be 'sender' or 'arrival', got {timestamps!r}")
    connect = _transport_factory(spec)
    spec.check_unused()
    source = StreamSource(connect(), use_timestamps=timestamps == "sender")
    info = MeterInfo(
        backend="stream",
        scope=options.scope,
        kind="sampled",
        update_period_s=None,  # measured: the median interval of recent samples
        resolution_j=None,
        simulated=False,
        domains=(options.scope,),
        details={
            "time_base": "sender timestamps mapped by the lower envelope of arrival delay"
            if timestamps == "sender"
            else "arrival time",
        },
    )
    return SampledMeter(source, info, options, **kwargs)


def probe(spec: MeterSpec) -> Any:

    given = {key: spec.params[key] for key in _SOURCES if spec.params.get(key)}
    if len(given) != 1:
        return Probe("stream", False, f"no stream source given; use {_EXAMPLES}")
    (key, value), = given.items()
    if key == "tcp":
        host, _, port = value.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=1.0).close()
        except (OSError, ValueError) as exc:
            return Probe("stream", False, f"cannot connect to {value}: {exc}")
        return Probe("stream", True, f"{value} accepts connections")
    if key == "exec":
        try:
            program = shlex.split(value)[0]
        except (ValueError, IndexError):
            return Probe("stream", False, f"exec={value!r} is not a command line")
        found = shutil.which(program)
        return Probe("stream", bool(found), f"{program} found at {found}" if found else f"{program!r} not found on PATH")
    if not os.path.exists(value):
        hint = " (USB serial adapter plugged in? Bluetooth bound with rfcomm?)" if key == "serial" else ""
        return Probe("stream", False, f"{value} does not exist{hint}")
    if not os.access(value, os.R_OK | (os.W_OK if key == "serial" else 0)):
        return Probe("stream", False, f"{value} exists but this user may not open it (group dialout?)")
    return Probe("stream", True, f"{value} exists and is readable")
