"""pyRAPL as an independent cross-check of the ``rapl`` backend (``pyrapl``).

pyRAPL (powerapi-ng, last release 2019) is an optional extra: ``pip install 'energyprof[pyrapl]'``.
It reads the same powercap files through its own code, package and DRAM zones only, from the fixed
path ``/sys/class/powercap``. It does not handle counter wrap-around: this backend refuses a window
in which a counter went backwards instead of reporting a wrong number, so keep cross-check windows
short against the wrap time (minutes at full load on most Intel parts), and use ``rapl`` for real work.

Its wheel also installs a top-level ``tests`` package into site-packages, which can shadow a
project's own ``tests`` package; install it in a separate virtual environment, or remove
``site-packages/tests`` afterwards.

Domains: ``package-N`` and ``dram-N`` per socket; the total is packages + dram.
"""

from __future__ import annotations

from typing import Any

from energyprof.errors import (
    MeterFailure,
    MeterPermissionError,
    MeterSpecError,
    MeterUnavailable,
)
from energyprof.meters.base import CounterMeter, MeterInfo, Probe
from energyprof.meters.spec import MeterSpec, parse_spec

__all__ = ["PyRaplMeter", "INSTALL_HINT", "open_from_spec", "probe"]

INSTALL_HINT = (
    "install it with: pip install 'energyprof[pyrapl]' (warning: pyRAPL's wheel puts a stray top-level "
    "'tests' package into site-packages that can shadow your own tests; use a separate virtual "
    "environment or delete site-packages/tests afterwards)"
)


def _import_pyrapl() -> Any:
    try:
        import pyRAPL  # type: ignore[import-not-found]
    except ImportError as exc:
        raise MeterUnavailable(
            f"pyRAPL is not installed ({exc.__class__.__name__}); it is an optional cross-check of the "
            f"'rapl' backend: {INSTALL_HINT}"
        ) from None
    return pyRAPL


def _open_sensor(pyrapl: Any, sockets: list[int] | None) -> Any:
    try:
        return pyrapl.Sensor(devices=None, socket_ids=sockets)
    except PermissionError as exc:
        raise MeterPermissionError(
            f"pyRAPL cannot read {getattr(exc, 'filename', None) or 'energy_uj'}: permission denied (RAPL "
            "counters are root-only since Linux 5.10, CVE-2020-8694); run as root or see "
            "'energyprof detect' for the rapl backend's chmod/udev fix"
        ) from None
    except FileNotFoundError as exc:
        raise MeterUnavailable(
            f"pyRAPL found no RAPL interface ({exc.filename or exc}): /sys/class/powercap has no intel-rapl "
            "zones (typical in a VM or container)"
        ) from None
    except Exception as exc:
        name = type(exc).__name__
        if name.startswith("PyRAPL"):
            raise MeterUnavailable(
                f"pyRAPL cannot record energy here ({name}{': ' + str(exc) if str(exc) else ''}); "
                "/sys/class/powercap/intel-rapl has no usable package zone (typical in a VM or container)"
            ) from None
        raise


class PyRaplMeter(CounterMeter):
    """Package and DRAM energy read through pyRAPL's ``Sensor`` (a cross-check, no wrap handling)."""

    def __init__(self, sockets: list[int] | None = None, sync_device: Any = None) -> None:
        super().__init__(sync_device=sync_device)
        self._pyrapl = _import_pyrapl()
        self._sensor = _open_sensor(self._pyrapl, sockets)
        first = self._raw()
        self._slots = [i for i, v in enumerate(first) if v >= 0]
        if not self._slots:
            raise MeterUnavailable("pyRAPL opened but reports no package or DRAM counter")
        self._origin = {i: first[i] for i in self._slots}
        self._last = dict(self._origin)
        names = [self._name(i) for i in self._slots]
        self._info = MeterInfo(
            backend="pyrapl",
            scope="+".join(sorted({n.split("-")[0] for n in names}, key=["package", "dram"].index)),
            kind="counter",
            update_period_s=0.001,
            resolution_j=1e-6,
            simulated=False,
            domains=tuple(names),
            details={
                "pyrapl_version": getattr(self._pyrapl, "__version__", None),
                "note": "cross-check of the rapl backend; pyRAPL does not handle counter wrap-around",
            },
        )

    @staticmethod
    def _name(slot: int) -> str:
        socket, device = divmod(slot, 2)  # pyRAPL: (pkg 0, dram 0, pkg 1, dram 1, ...)
        return f"{'package' if device == 0 else 'dram'}-{socket}"

    def _raw(self) -> list[float]:
        try:
            return [float(v) for v in self._sensor.energy()]
        except PermissionError as exc:
            raise MeterFailure(f"pyRAPL lost read access during the measurement: {exc}") from None
        except (OSError, ValueError) as exc:
            raise MeterFailure(f"pyRAPL stopped answering ({type(exc).__name__}: {exc}); the window is void") from None

    def read_counters(self) -> dict[str, float]:
        raw = self._raw()
        out: dict[str, float] = {}
        for i in self._slots:
            if raw[i] < self._last[i]:
                raise MeterFailure(
                    f"the {self._name(i)} counter went backwards under pyRAPL ({self._last[i]:.0f} -> "
                    f"{raw[i]:.0f} uJ): it wrapped, and pyRAPL cannot unwrap it. Use the 'rapl' backend, "
                    "which tracks wraps in the background"
                )
            self._last[i] = raw[i]
            out[self._name(i)] = (raw[i] - self._origin[i]) * 1e-6
        return out

    @property
    def info(self) -> MeterInfo:
        return self._info


def _params(spec: MeterSpec) -> dict[str, Any]:
    raw = spec.get_list("sockets")
    sockets = None
    if raw is not None:
        try:
            sockets = [int(s) for s in raw]
        except ValueError:
            raise MeterSpecError(f"meter spec {spec.text!r}: sockets= takes socket numbers joined by '+'") from None
    spec.check_unused()
    return {"sockets": sockets}


def open_from_spec(spec: MeterSpec, **kwargs: Any) -> PyRaplMeter:
    """``pyrapl[:sockets=0+1]``."""
    return PyRaplMeter(**_params(spec), **kwargs)


def probe(spec: MeterSpec | None = None) -> Any:

    params = _params(spec if spec is not None else parse_spec("pyrapl"))
    try:
        pyrapl = _import_pyrapl()
        _open_sensor(pyrapl, params["sockets"])
    except MeterUnavailable as exc:
        return Probe("pyrapl", False, str(exc))
    return Probe(
        "pyrapl",
        True,
        f"pyRAPL {getattr(pyrapl, '__version__', '?')} can read RAPL (cross-check only: no wrap handling; "
        "prefer 'rapl')",
    )
