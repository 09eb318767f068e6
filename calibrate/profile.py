"""Device profiles: the schema, YAML I/O and lookup by name.

One YAML file per device. It records where its numbers came from (device, driver, host, toolkit
version, the meter and its characteristics, the protocol, the date), global cost coefficients with
95 % intervals, and per-layer tables for named models (joules per kept update entry).

Loading validates the schema and names the wrong field. Writes are atomic and never replace an
existing file unless asked. Shipped profiles live in the repository's top-level ``profiles/`` folder
and are installed as package data (``energyprof._profiles``); both an editable install and a wheel
install find them by name.
"""

from __future__ import annotations

import datetime as _dt
import importlib.resources
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from energyprof.errors import EnergyprofError

__all__ = [
    "ProfileError",
    "Estimate",
    "MeterRecord",
    "Provenance",
    "Coefficients",
    "LayerCost",
    "ModelCosts",
    "Radio",
    "DeviceProfile",
    "UpdateEntryModel",
    "available_profiles",
    "load_profile",
    "save_profile",
    "PROFILE_PATH_ENV",
]

PROFILE_PATH_ENV = "ENERGYPROF_PROFILE_PATH"
SCHEMA_VERSION = 1


class ProfileError(EnergyprofError):
    """A profile that cannot be found, parsed, validated or written."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Estimate(_Strict):
    """A fitted value with its 95 % interval (equal bounds for exact, e.g. simulator, values)."""

    value: float
    ci_low: float
    ci_high: float

    @model_validator(mode="after")
    def _ordered(self) -> "Estimate":
        for name in ("value", "ci_low", "ci_high"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite")
        if not self.ci_low <= self.value <= self.ci_high:
            raise ValueError(
                f"interval must contain the value: ci_low={self.ci_low} <= value={self.value} <= ci_high={self.ci_high}"
            )
        return self

    @classmethod
    def exact(cls, value: float) -> "Estimate":
        return cls(value=value, ci_low=value, ci_high=value)


class MeterRecord(_Strict):
    backend: str
    scope: str
    kind: str
    update_period_s: float | None = None
    averaging_window_s: float | None = None
    resolution_j: float | None = None
    simulated: bool
    details: dict[str, Any] = Field(default_factory=dict)


class Provenance(_Strict):
    device: str
    driver: str | None = None
    host: str
    toolkit_version: str
    meter: MeterRecord
    protocol: dict[str, Any] = Field(default_factory=dict)
    created: _dt.datetime
    method: str = Field(description="how the numbers were obtained, in words")


class Coefficients(_Strict):
    """Global cost coefficients of the device (joules, watts, bytes)."""

    static_power_w: Estimate
    j_per_byte_written: dict[str, Estimate]  # memory level ("cache", "dram") -> J/byte
    j_per_byte_read: dict[str, Estimate] = Field(default_factory=dict)
    j_per_flop: Estimate
    cache_bytes: int = Field(gt=0, description="working sets up to this size are priced at the cache level")

    @field_validator("j_per_byte_written")
    @classmethod
    def _levels(cls, v: dict[str, Estimate]) -> dict[str, Estimate]:
        missing = {"cache", "dram"} - set(v)
        if missing:
            raise ValueError(f"needs the memory levels cache and dram; missing: {', '.join(sorted(missing))}")
        return v


class LayerCost(_Strict):
    """Cost of keeping k update entries of one parameter tensor in one step:
    ``fixed_j`` (touching the layer at all) ``+ joules_per_update * k``."""

    name: str
    shape: list[int]
    dtype: str
    fixed_j: float = Field(default=0.0, ge=0)
    joules_per_update: float = Field(gt=0)
    ci_low: float
    ci_high: float
    method: Literal["measured", "predicted"] = "measured"
    r2: float | None = None
    n_windows: int | None = None

    @model_validator(mode="after")
    def _ordered(self) -> "LayerCost":
        if not self.ci_low <= self.joules_per_update <= self.ci_high:
            raise ValueError("interval must contain joules_per_update")
        return self

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class ModelCosts(_Strict):
    description: str = ""
    layers: list[LayerCost]

    @field_validator("layers")
    @classmethod
    def _unique(cls, v: list[LayerCost]) -> list[LayerCost]:
        seen: set[str] = set()
        for layer in v:
            if layer.name in seen:
                raise ValueError(f"layer {layer.name!r} appears twice")
            seen.add(layer.name)
        return v


_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


class UpdateEntryModel(_Strict):
    """What keeping one update entry costs in counts, used to predict a layer's cost from the
    global coefficients: write the value into the layer, write value + index into the send buffer,
    read the update value, and the arithmetic of applying it."""

    index_bytes: int = 8  # int64 index in the send buffer
    flops: int = 2  # one multiply-add per kept entry

    def counts(self, dtype: str) -> tuple[int, int, int]:
        """(bytes written, bytes read, FLOPs) per kept entry."""
        if dtype not in _ITEMSIZE:
            raise ProfileError(f"dtype {dtype!r} is not supported; use one of {', '.join(_ITEMSIZE)}")
        item = _ITEMSIZE[dtype]
        return 2 * item + self.index_bytes, item, self.flops


class Radio(_Strict):
    """Transmission cost of the device's link: joules per byte sent, and where the figure comes from
    (a datasheet or paper figure is labelled as such; it is not measured by energyprof)."""

    joules_per_byte: float = Field(gt=0)
    source: str = Field(min_length=1, description="where the figure comes from, e.g. 'datasheet: ...'")


class DeviceProfile(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    simulated: bool
    provenance: Provenance
    coefficients: Coefficients
    entry_model: UpdateEntryModel = Field(default_factory=UpdateEntryModel)
    models: dict[str, ModelCosts] = Field(default_factory=dict)
    radio: Radio | None = None

    @model_validator(mode="after")
    def _simulated_is_carried(self) -> "DeviceProfile":
        if self.provenance.meter.simulated and not self.simulated:
            raise ValueError("the meter was simulated, so the profile must say simulated: true")
        return self

    # ------------------------------------------------------------------ costs
    def layer_costs(self, model: str) -> dict[str, LayerCost]:
        if model not in self.models:
            known = ", ".join(sorted(self.models)) or "none"
            raise ProfileError(
                f"profile {self.name!r} has no per-layer table for model {model!r} (models: {known}); "
                "calibrate that model on this device, or allow predicted costs"
            )
        return {layer.name: layer for layer in self.models[model].layers}

    def predict_joules_per_update(self, numel: int, dtype: str) -> float:
        """Joules per kept entry of a tensor of ``numel`` elements, from the global coefficients."""
        if numel <= 0:
            raise ProfileError(f"numel must be > 0, got {numel}")
        written, read, flops = self.entry_model.counts(dtype)
        level = "cache" if numel * _ITEMSIZE[dtype] <= self.coefficients.cache_bytes else "dram"
        c = self.coefficients
        j_read = c.j_per_byte_read.get(level)
        return (
            written * c.j_per_byte_written[level].value
            + read * (j_read.value if j_read else 0.0)
            + flops * c.j_per_flop.value
        )

    # ------------------------------------------------------------------ text
    def summary(self) -> str:
        p, c = self.provenance, self.coefficients
        lines = [
            f"profile {self.name}" + ("  [SIMULATED]" if self.simulated else ""),
            f"  device   {p.device}" + (f" (driver {p.driver})" if p.driver else ""),
            f"  meter    {p.meter.backend} ({p.meter.scope}), simulated={p.meter.simulated}",
            f"  created  {p.created.isoformat()} on {p.host} with energyprof {p.toolkit_version}",
            f"  method   {p.method}",
            f"  static power      {_fmt(c.static_power_w, 'W')}",
        ]
        for level, est in sorted(c.j_per_byte_written.items()):
            lines.append(f"  write {level:<6} {_fmt(est, 'J/byte')}")
        for level, est in sorted(c.j_per_byte_read.items()):
            lines.append(f"  read  {level:<6} {_fmt(est, 'J/byte')}")
        lines.append(f"  per FLOP          {_fmt(c.j_per_flop, 'J')}")
        for model, costs in sorted(self.models.items()):
            lines.append(f"  model {model}: {len(costs.layers)} layers")
        return "\n".join(lines)

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


def _fmt(e: Estimate, unit: str) -> str:
    return f"{e.value:.4g} {unit}  [{e.ci_low:.4g}, {e.ci_high:.4g}]"


# ---------------------------------------------------------------------- lookup and I/O
def _search_dirs() -> list[Path]:
    dirs: list[Path] = []
    for part in os.environ.get(PROFILE_PATH_ENV, "").split(os.pathsep):
        if part:
            dirs.append(Path(part))
    # a source checkout or editable install: the top-level profiles/ folder beside the packages
    checkout = Path(__file__).resolve().parent.parent / "profiles"
    if checkout.is_dir():
        dirs.append(checkout)
    # a wheel install: the same files installed as package data
    try:
        packaged = importlib.resources.files("energyprof._profiles")
        if packaged.is_dir():
            dirs.append(Path(str(packaged)))
    except (ModuleNotFoundError, TypeError, NotADirectoryError):
        pass
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def available_profiles() -> dict[str, Path]:
    """Profile name -> file; earlier search folders win ($ENERGYPROF_PROFILE_PATH first)."""
    found: dict[str, Path] = {}
    for d in _search_dirs():
        if not d.is_dir():
            continue
        for f in sorted(d.glob("*.yaml")):
            found.setdefault(f.stem, f)
    return found


def load_profile(name_or_path: str | os.PathLike[str]) -> DeviceProfile:
    """Load a profile by name (``sim-h100``) or by path; validation errors name the field."""
    text = os.fspath(name_or_path)
    path = Path(text)
    if not (path.suffix in (".yaml", ".yml") or os.sep in text or path.is_file()):
        profiles = available_profiles()
        if text not in profiles:
            known = ", ".join(sorted(profiles)) or "none"
            raise ProfileError(
                f"no profile named {text!r} (found: {known}); give a YAML path, or add its folder to "
                f"${PROFILE_PATH_ENV}"
            )
        path = profiles[text]
    if not path.is_file():
        raise ProfileError(f"profile file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ProfileError(f"profile {path} is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ProfileError(f"profile {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:  # e.g. a date that does not exist, nesting too deep
        raise ProfileError(f"profile {path} is not valid YAML: {type(exc).__name__}: {exc}") from None
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"profile {path} must be a YAML mapping, got {type(data).__name__}")
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise ProfileError(f"profile {path} is invalid: {problems}") from None


def save_profile(profile: DeviceProfile, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write atomically. An existing file is replaced only with ``overwrite=True``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(profile.to_yaml())
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # fails if target exists: no window where it could be clobbered
            except FileExistsError:
                raise ProfileError(
                    f"{target} already exists; choose another path or ask to overwrite it "
                    "(overwrite=True, or --force on the command line)"
                ) from None
            os.unlink(tmp)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
