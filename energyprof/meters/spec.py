"""Meter spec strings: ``BACKEND[:key=value,...]``.

Examples: ``nvml:index=0``, ``rapl``, ``rapl:root=/x,domains=package-0``, ``sim:preset=h100,seed=1``,
``stream:tcp=127.0.0.1:9100``, ``auto``. A value may contain ``:`` and ``=``; a ``,`` separates
parameters only when it is followed by ``key=``, so ``stream:exec=python -c "print(1, 2)"`` keeps its
command whole. Keys are case-sensitive identifiers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from energyprof.errors import MeterSpecError

T = TypeVar("T")

_BACKEND_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_SPLIT_RE = re.compile(r",(?=\s*[A-Za-z_][A-Za-z0-9_]*=)")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class MeterSpec:
    backend: str
    params: dict[str, str] = field(default_factory=dict)
    text: str = ""
    _used: set[str] = field(default_factory=set, repr=False)

    # ------------------------------------------------------------ typed access
    def _get(self, key: str, default: T, convert: Callable[[str], T], what: str) -> T:
        self._used.add(key)
        if key not in self.params:
            return default
        raw = self.params[key]
        try:
            return convert(raw)
        except (TypeError, ValueError) as exc:
            raise MeterSpecError(
                f"meter spec {self.text!r}: {key}={raw!r} is not {what} ({exc})"
            ) from None

    def get_str(self, key: str, default: str | None = None) -> str | None:
        return self._get(key, default, str, "a string")

    def get_int(self, key: str, default: int | None = None) -> int | None:
        return self._get(key, default, lambda s: int(s, 0), "an integer (decimal or 0x hex)")

    def get_float(self, key: str, default: float | None = None) -> float | None:
        return self._get(key, default, float, "a number")

    def get_bool(self, key: str, default: bool | None = None) -> bool | None:
        def conv(s: str) -> bool:
            low = s.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("use true/false")

        return self._get(key, default, conv, "a boolean")

    def get_list(self, key: str, default: list[str] | None = None, sep: str = "+") -> list[str] | None:
        """A list value written with ``+`` (``domains=package-0+dram``), since ``,`` separates keys."""
        return self._get(key, default, lambda s: [p for p in s.split(sep) if p], "a list")

    def require(self, key: str, example: str) -> str:
        self._used.add(key)
        if key not in self.params or self.params[key] == "":
            raise MeterSpecError(
                f"meter spec {self.text!r} needs {key}=..., for example {example!r}"
            )
        return self.params[key]

    def check_unused(self, allowed: tuple[str, ...] | None = None) -> None:
        """Raise for keys no getter asked for (typos such as ``indx=0``)."""
        unknown = sorted(set(self.params) - self._used - set(allowed or ()))
        if unknown:
            known = ", ".join(sorted(self._used | set(allowed or ()))) or "none"
            raise MeterSpecError(
                f"meter spec {self.text!r}: unknown key(s) {', '.join(unknown)} for backend "
                f"{self.backend!r}; known keys: {known}"
            )

    def __str__(self) -> str:
        return self.text or format_spec(self.backend, self.params)


def parse_spec(text: str) -> MeterSpec:
    """Parse ``BACKEND[:key=value,...]`` into a :class:`MeterSpec`."""
    if not isinstance(text, str) or not text.strip():
        raise MeterSpecError("empty meter spec; use BACKEND[:key=value,...], e.g. 'rapl' or 'sim:preset=h100'")
    text = text.strip()
    backend, sep, rest = text.partition(":")
    backend = backend.strip().lower()
    if not _BACKEND_RE.match(backend):
        raise MeterSpecError(
            f"meter spec {text!r}: {backend!r} is not a backend name; use BACKEND[:key=value,...]"
        )
    params: dict[str, str] = {}
    if sep and rest.strip():
        for part in _SPLIT_RE.split(rest):
            key, eq, value = part.partition("=")
            key = key.strip()
            if not eq or not _KEY_RE.match(key):
                raise MeterSpecError(
                    f"meter spec {text!r}: {part!r} is not key=value; parameters are written "
                    "BACKEND:key=value,key=value"
                )
            if key in params:
                raise MeterSpecError(f"meter spec {text!r}: key {key!r} is given twice")
            params[key] = value.strip()
    return MeterSpec(backend=backend, params=params, text=text)


def format_spec(backend: str, params: dict[str, object]) -> str:
    if not params:
        return backend
    return backend + ":" + ",".join(f"{k}={v}" for k, v in params.items())
