"""Device profiles: the schema, YAML I/O and lookup by name.

One YAML file per device (schema version 3). It records where its numbers came from (device,
driver, host, torch and toolkit versions, the meter spec and its characteristics, the protocol
settings, the date, the wall time), the global cost coefficients with 95 % intervals and fit
quality, and per-layer tables for named models. Each layer carries both parts of a round:
``compensation_j``, paid every round whatever the mask keeps (error feedback's dense add), and the
masked update phase, which keeping k > 0 entries adds: ``fixed_j + joules_per_update * k +
joules_per_line * lines`` (lines: 64-byte lines holding a kept entry), each with its interval,
``method: measured | predicted`` and fit quality. Schema 2 charged the compensation to ``fixed_j``
(as if the mask chose it) and is refused with the command that regenerates the profile. Every prediction
goes through :mod:`energyprof.costmodel`.

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

from energyprof.costmodel import CostCoefficients, LayerCoefficients, layer_costs_from_global, layer_joules
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
    "FitQuality",
    "ResidualBin",
    "SCHEMA_VERSION",
    "available_profiles",
    "load_profile",
    "save_profile",
    "PROFILE_PATH_ENV",
]

PROFILE_PATH_ENV = "ENERGYPROF_PROFILE_PATH"
SCHEMA_VERSION = 3


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
    torch_version: str | None = None
    meter_spec: str | None = None
    meter: MeterRecord
    protocol: dict[str, Any] = Field(default_factory=dict)
    created: _dt.datetime
    wall_time_s: float | None = None
    method: str = Field(description="how the numbers were obtained, in words")


class FitQuality(_Strict):
    """How well the global model fits the measurements it was fitted to."""

    r2: float
    cv_mape: float = Field(description="cross-validated mean absolute percentage error, as a fraction")
    n_measurements: int


class Coefficients(_Strict):
    """Global cost coefficients of the device (joules, watts, bytes), in the cost model's terms
    (:class:`energyprof.costmodel.CostCoefficients`), each with its 95 % interval."""

    static_power_w: Estimate
    j_per_call: Estimate
    j_per_byte_read: dict[str, Estimate]  # memory level ("cache", "dram") -> J/byte
    j_per_byte_written: dict[str, Estimate]  # contiguous writes
    j_per_line_written: dict[str, Estimate]  # 64-byte lines touched by scattered writes
    j_per_flop: Estimate
    cache_bytes: int = Field(gt=0, description="centre of the cache-to-DRAM transition (working-set bytes)")
    transition_octaves: float = Field(ge=0, description="width of the transition; 0 is a step")
    fit: FitQuality | None = None

    @field_validator("j_per_byte_read", "j_per_byte_written", "j_per_line_written")
    @classmethod
    def _levels(cls, v: dict[str, Estimate]) -> dict[str, Estimate]:
        missing = {"cache", "dram"} - set(v)
        if missing:
            raise ValueError(f"needs the memory levels cache and dram; missing: {', '.join(sorted(missing))}")
        return v

    def cost_coefficients(self) -> CostCoefficients:
        """The point estimates as the cost model takes them."""
        return CostCoefficients(
            j_per_call=self.j_per_call.value,
            j_per_byte_read={k: e.value for k, e in self.j_per_byte_read.items()},
            j_per_byte_written={k: e.value for k, e in self.j_per_byte_written.items()},
            j_per_line_written={k: e.value for k, e in self.j_per_line_written.items()},
            j_per_flop=self.j_per_flop.value,
            cache_bytes=self.cache_bytes,
            transition_octaves=self.transition_octaves,
            static_power_w=self.static_power_w.value,
        )


class LayerCost(_Strict):
    """Cost of one parameter tensor in one round: ``compensation_j`` every round whatever the mask
    keeps (error feedback's ``residual += update``, replayed on its own); then, for keeping k > 0 of
    its ``numel`` update entries, ``fixed_j`` (the sparse kernels' set-up) ``+ joules_per_update * k + joules_per_line * lines +
    joules_per_update_density * k^2 / numel``, where ``lines`` counts the tensor's 64-byte lines that
    hold a kept entry (see :mod:`energyprof.costmodel`). Intervals are 95 %."""

    name: str
    shape: list[int]
    dtype: str
    numel: int = Field(gt=0)
    compensation_j: float = Field(ge=0, description="joules every round pays whatever the mask keeps")
    compensation_ci_low: float
    compensation_ci_high: float
    compensation_method: Literal["measured", "measured-together", "predicted"] = Field(
        default="predicted", description="measured: its own replay; measured-together: its share of the replay of "
        "the model's tensors too small for their own; predicted: from the global coefficients")
    fixed_j: float = Field(ge=0)
    fixed_ci_low: float
    fixed_ci_high: float
    joules_per_update: float = Field(ge=0)
    ci_low: float
    ci_high: float
    joules_per_line: float = Field(default=0.0, ge=0)
    line_ci_low: float = 0.0
    line_ci_high: float = 0.0
    joules_per_update_density: float = Field(default=0.0, ge=0,
                                             description="extra joules per kept entry per unit of density")
    density_ci_low: float = 0.0
    density_ci_high: float = 0.0
    method: Literal["measured", "predicted"]
    r2: float | None = None
    rmse_rel: float | None = Field(default=None, description="relative RMS error of the fit over its windows")
    n_windows: int | None = None
    densities: list[float] = Field(default_factory=list)
    measured_as: str | None = Field(default=None, description="the tensor whose replay was measured (same numel, dtype)")
    reason: str | None = Field(default=None, description="why a layer is predicted rather than measured")

    @model_validator(mode="after")
    def _ordered(self) -> "LayerCost":
        if not self.joules_per_update + self.joules_per_line > 0:
            raise ValueError("keeping an entry must cost something: joules_per_update + joules_per_line must be > 0")
        if math.prod(self.shape) != self.numel:
            raise ValueError(f"numel {self.numel} is not the product of shape {self.shape}")
        for low, value, high, what in (
            (self.compensation_ci_low, self.compensation_j, self.compensation_ci_high, "compensation_j"),
            (self.fixed_ci_low, self.fixed_j, self.fixed_ci_high, "fixed_j"),
            (self.ci_low, self.joules_per_update, self.ci_high, "joules_per_update"),
            (self.line_ci_low, self.joules_per_line, self.line_ci_high, "joules_per_line"),
            (self.density_ci_low, self.joules_per_update_density, self.density_ci_high, "joules_per_update_density"),
        ):
            if not all(math.isfinite(x) for x in (low, value, high)):
                raise ValueError(f"{what} and its interval must be finite")
            if not low <= value <= high:
                raise ValueError(f"the interval of {what} must contain it: {low} <= {value} <= {high}")
        return self

    def coefficients(self) -> LayerCoefficients:
        return LayerCoefficients(self.fixed_j, self.joules_per_update, self.joules_per_line,
                                 self.joules_per_update_density, self.numel, _itemsize(self.dtype),
                                 self.compensation_j)

    def joules(self, kept: int, lines: int) -> float:
        """Predicted joules of keeping ``kept`` entries in ``lines`` lines (the cost model)."""
        return layer_joules(self.fixed_j, self.joules_per_update, self.joules_per_line, kept, lines,
                            self.joules_per_update_density, self.numel)


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


def _itemsize(dtype: str) -> int:
    if dtype not in _ITEMSIZE:
        raise ProfileError(f"dtype {dtype!r} is not supported; use one of {', '.join(_ITEMSIZE)}")
    return _ITEMSIZE[dtype]


class Radio(_Strict):
    """Transmission cost of the device's link: joules per byte sent, and where the figure comes from
    (a datasheet or paper figure is labelled as such; it is not measured by energyprof)."""

    joules_per_byte: float = Field(gt=0)
    source: str = Field(min_length=1, description="where the figure comes from, e.g. 'datasheet: ...'")


class ResidualBin(_Strict):
    """The fit's relative residuals (predicted / measured - 1) of the measurements in one bin of a
    feature: the bin's centre ``x`` (geometric mean), how many, their mean and its 95 % interval."""

    x: float
    n: int = Field(ge=1)
    mean: float
    ci_low: float
    ci_high: float


class DeviceProfile(_Strict):
    schema_version: Literal[3] = SCHEMA_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    simulated: bool
    provenance: Provenance
    coefficients: Coefficients
    models: dict[str, ModelCosts] = Field(default_factory=dict)
    radio: Radio | None = None
    quality: Literal["ok", "poor"] | None = Field(
        default=None, description="the calibration's own verdict (None: not assessed, older files)")
    quality_reason: str | None = Field(default=None, description="why the quality is poor: cause and remedy")
    fit_residuals: dict[str, list[ResidualBin]] = Field(
        default_factory=dict, description="the fit's residuals binned by working_set_bytes, density, layer_numel")

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

    def predict_layer(self, numel: int, dtype: str) -> LayerCoefficients:
        """Per-layer costs of a tensor of ``numel`` entries predicted from the global coefficients:
        the cost model applied to the update phase's counts."""
        if numel <= 0:
            raise ProfileError(f"numel must be > 0, got {numel}")
        _itemsize(dtype)
        return layer_costs_from_global(self.coefficients.cost_coefficients(), numel, dtype)

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
            f"  per launch        {_fmt(c.j_per_call, 'J')}",
        ]
        for level in ("cache", "dram"):
            lines.append(f"  read  {level:<11} {_fmt(c.j_per_byte_read[level], 'J/byte')}")
            lines.append(f"  write {level:<11} {_fmt(c.j_per_byte_written[level], 'J/byte')}")
            lines.append(f"  line  {level:<11} {_fmt(c.j_per_line_written[level], 'J/line')}")
        lines.append(f"  per FLOP          {_fmt(c.j_per_flop, 'J')}")
        lines.append(f"  cache            {c.cache_bytes / 2**20:.4g} MiB, transition {c.transition_octaves:g} octaves")
        if c.fit:
            lines.append(f"  fit              R^2 {c.fit.r2:.5f}, cross-validated MAPE {c.fit.cv_mape:.2%} "
                         f"over {c.fit.n_measurements} measurements")
        if self.radio:
            lines.append(f"  radio            {self.radio.joules_per_byte:.4g} J/byte ({self.radio.source})")
        if self.quality == "poor":
            lines.append(f"  QUALITY POOR     {self.quality_reason}")
        for model, costs in sorted(self.models.items()):
            measured = sum(layer.method == "measured" for layer in costs.layers)
            lines.append(f"  model {model}: {len(costs.layers)} layers ({measured} measured, "
                         f"{len(costs.layers) - measured} predicted)")
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
    version = data.get("schema_version")
    if version != SCHEMA_VERSION and isinstance(version, int):
        raise ProfileError(_old_schema_message(path, version, data))
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err["loc"]) or "(top level)"
            line = _line_of(text_of(path), err["loc"])
            problems.append(f"{where}{f' (line {line})' if line else ''}: {err['msg']}")
        raise ProfileError(f"profile {path} is invalid: {'; '.join(problems)}") from None


def text_of(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the YAML node at ``loc`` (pydantic's error location), or of its nearest
    existing parent."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            found = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if found is None:
                break
            node = found[1]
            line = found[0].start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and 0 <= key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def save_profile(profile: DeviceProfile, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write atomically. An existing file is replaced only with ``overwrite=True``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        # mkstemp makes the file 0600; a profile is an ordinary file: 0666 less the umask, like open()
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
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


def _old_schema_message(path: Any, version: int, data: dict[str, Any]) -> str:
    """Why an older profile is refused, with the command that regenerates it."""
    why = {1: "it has no per-layer costs",
           2: "it charges error feedback's compensation (paid every round on every tensor) to each layer's "
              "fixed_j, as if the mask chose it"}.get(version, "its fields differ")
    prov = data.get("provenance") if isinstance(data.get("provenance"), dict) else {}
    spec = prov.get("meter_spec") or "SPEC"
    models = data.get("models") if isinstance(data.get("models"), dict) else {}
    model_args = " ".join(f"--model {m}" for m in models) or "--model NAME"
    quick = " --quick" if "--quick" in str(prov.get("method", "")) else ""
    shipped = Path(__file__).resolve().parent.parent / "profiles"
    if Path(str(path)).resolve().parent == shipped:
        command = "python -m calibrate.simulated profiles --force"
    else:
        command = f"energyprof calibrate --meter {spec} {model_args}{quick} --out {path} --force"
    return (f"profile {path} has schema_version {version}; this energyprof reads schema_version {SCHEMA_VERSION} "
            f"({why}). Regenerate it: {command}")
