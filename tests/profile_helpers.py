"""Build per-layer table entries for test profiles (validated by the profile schema like a file)."""

from __future__ import annotations

import math

from calibrate.profile import DeviceProfile, load_profile


def layer_entry(name: str, shape: list[int], joules_per_update: float, fixed_j: float = 0.0,
                method: str = "measured", ci: tuple[float, float] | None = None, compensation_j: float = 0.0,
                **extra) -> dict:
    low, high = ci if ci else (joules_per_update, joules_per_update)
    return {"name": name, "shape": list(shape), "dtype": extra.pop("dtype", "float32"), "numel": math.prod(shape),
            "compensation_j": compensation_j, "compensation_ci_low": compensation_j,
            "compensation_ci_high": compensation_j, "fixed_j": fixed_j, "fixed_ci_low": fixed_j, "fixed_ci_high": fixed_j,
            "joules_per_update": joules_per_update, "ci_low": low, "ci_high": high, "method": method, **extra}


def profile_with_layers(model: str, layers: list[dict], base: str = "sim-h100") -> DeviceProfile:
    """A shipped simulated profile with ``layers`` as the table of ``model``."""
    data = load_profile(base).model_dump()
    data["models"] = {model: {"description": "test table (SIMULATED)", "layers": layers}}
    return DeviceProfile.model_validate(data)
