"""``energyprof demo``: the whole chain of the real commands, in about a minute.

1. open the best real meter (or, when there is none, the simulator, and say so on every line);
2. ``energyprof calibrate --model mlp --quick`` on it: a fitted device profile;
3. ``energyprof validate`` with that profile on the same meter: predicted against measured joules
   for Top-K and CWMP masks, with a report folder;
4. prune one real update (a short training run on digits) with Top-K and with CWMP at the same
   predicted energy, and compare how much of the update each keeps.

Nothing here fits or prices anything of its own: the profile comes from the calibration, every
prediction from the cost map (the cost model), every measurement from the protocol.
"""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Callable

from cwmp.costmap import CostMap
from cwmp.pruner import Budget, Pruner

MODEL = "mlp"


def _pick_meter(meter_spec: str | None, say: Callable[[str], None]) -> str:
    from energyprof.errors import MeterUnavailable
    from energyprof.meters import open_meter

    if meter_spec:
        return meter_spec
    try:
        with open_meter("auto") as meter:
            return meter.info.backend
    except MeterUnavailable as exc:
        say(f"no real meter here ({str(exc)[:160]}...)")
        say("falling back to the simulator: every figure below is SIMULATED, not a measurement")
        return "sim:preset=rpi4"


def run(meter_spec: str | None = None, device: str | None = None, keep_ratio: float = 0.1,
        out: str | Path = "out", progress: bool = True, say: Callable[[str], None] = print,
        allow_device_mismatch: bool = False) -> dict:
    """``device`` None: the kernels run where the meter looks (:func:`energyprof.devices.kernel_device`,
    which calibrate and validate call with the same arguments)."""
    from calibrate.calibration import calibrate
    from cwmp.apps.validate import console_table, model_updates, report_prefix, validate
    from energyprof.models import build_model
    from energyprof.outputs import check_output_folder

    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep ratio {keep_ratio:g} is not a fraction in (0, 1]; 10 % is 0.1")
    check_output_folder(out)
    spec = _pick_meter(meter_spec, say)
    folder = _new_folder(Path(out), f"demo-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    profile_path = folder / "profile.yaml"
    where = f" --device {device}" if device else ""
    say(f"\n[1/3] energyprof calibrate --meter {spec} --model {MODEL} --quick{where} --out {profile_path}")
    try:
        profile = calibrate(spec, models=[MODEL], out=profile_path, device=device, quick=True, progress=progress,
                            say=say, allow_device_mismatch=allow_device_mismatch)
    except BaseException:
        if not any(folder.iterdir()):  # a meter that did not open: no empty folder is left behind
            folder.rmdir()
        raise
    tag = "  [SIMULATED]" if profile.simulated else ""
    say(profile.summary())
    say(f"\n[2/3] energyprof validate --profile {profile_path} --meter {spec} --model {MODEL} "
        f"--report {folder / 'validation'}")
    result = validate(str(profile_path), spec, model=MODEL, device=device, report=folder / "validation",
                      progress=progress, say=say, allow_device_mismatch=allow_device_mismatch)
    say(console_table(result))
    say(f"\n[3/3] one real update of {MODEL}, pruned with Top-K and with CWMP at Top-K's predicted energy "
        f"(keep ratio {keep_ratio:g}){tag}")
    model = build_model(MODEL)
    update, how = model_updates(model, MODEL, "train", seed=1)
    costs = CostMap.from_profile(profile, MODEL, model.named_parameters())
    total_sq = math.fsum(float((u.double() ** 2).sum()) for u in update.values())
    results = {}
    for method in ("topk", "cwmp"):
        res = Pruner(costs, Budget.topk_keep_ratio(keep_ratio), method=method).masks(update)
        kept_sq = math.fsum(float((update[n].double()[m] ** 2).sum()) for n, m in res.masks.items())
        parts = costs.round_joules(res.masks, by_layer=res.joules_by_layer)
        results[method] = {"kept": res.kept, "predicted_j": parts.total_j, "floor_j": parts.floor_j,
                           "mask_j": parts.mask_j, "budget_j": res.budget_j, "norm_kept": kept_sq / total_sq,
                           "kept_by_layer": {n: int(m.sum()) for n, m in res.masks.items()}}
        say(f"  {method:<5} kept {res.kept:>7} entries, a round of {parts.total_j:.4e} J: the floor "
            f"{parts.floor_j:.4e} J (compensation, whatever is kept) + the mask's {parts.mask_j:.4e} J; "
            f"{kept_sq / total_sq:.1%} of the update's squared norm{tag}")
    prefix = report_prefix(profile.simulated)
    say(f"\nprofile:  {profile_path}\nreport:   {result.report}  ({prefix}summary.md, CSV, plots)")
    return {"meter": spec, "simulated": profile.simulated, "profile": str(profile_path),
            "report": str(result.report), "validation": result.summary, "update": how, **results}


def _new_folder(parent: Path, name: str) -> Path:
    """``parent/name``, made here and by no other run: two demos started in the same second get
    ``name`` and ``name-2`` (mkdir is atomic), never one folder."""
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        folder = parent / (name if n == 1 else f"{name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent} already holds {name} and 998 more like it; give another --out")
