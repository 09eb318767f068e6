"""The benchmark's outputs: the rounds CSV, the accuracy-vs-cumulative-energy Pareto plot (PNG) and
the summary (Markdown and a dict for ``--json``).

Summary, for each keep ratio r and each method (Top-K at r; CWMP p=1 and p=2 at Top-K's energy):
final accuracy mean +- std over seeds and final cumulative energy mean +- std; for CWMP also the
energy it needs to reach Top-K's mean final accuracy: the mean (over seeds) cumulative energy at
the first round where its mean accuracy is >= that target, or "never" within the rounds run.

Energy from a simulated profile is SIMULATED: the CSV's first line, its ``simulated`` column, the
plot's title and every summary line say so.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cwmp.apps.federated.experiment import Arm, FLConfig, RoundRecord, arms_of

__all__ = ["summarize", "write_csv", "write_plot", "write_summary", "write_outputs"]

CSV_FIELDS = [
    "method", "p", "ratio", "fixed_budget", "seed", "round", "round_energy_j", "floor_energy_j", "mask_energy_j",
    "radio_energy_j",
    "mean_client_energy_j", "max_client_energy_j", "cumulative_energy_j", "bytes_sent", "kept_fraction",
    "accuracy", "simulated",
]


def _label(simulated: bool) -> str:
    return "SIMULATED energy (simulated device profile, not a measurement)" if simulated else "energy predicted from measured profiles"


def write_csv(records: Sequence[RoundRecord], path: Path, simulated: bool) -> Path:
    """One row per (method, p, ratio, seed, round); the first line is a ``#`` comment saying where
    the energy comes from (read with ``pandas.read_csv(path, comment='#')``)."""
    with open(path, "w", newline="") as f:
        f.write(f"# {_label(simulated)}\n")
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for r in records:
            writer.writerow([
                r.method, "" if r.p is None else f"{r.p:g}", f"{r.ratio:g}", int(r.fixed), r.seed, r.round,
                f"{r.round_energy_j:.6e}", f"{r.floor_energy_j:.6e}", f"{r.mask_energy_j:.6e}",
                f"{r.radio_energy_j:.6e}",
                f"{r.mean_client_energy_j:.6e}", f"{r.max_client_energy_j:.6e}", f"{r.cumulative_energy_j:.6e}",
                r.bytes_sent, f"{r.kept_fraction:.6f}", f"{r.accuracy:.6f}", "SIMULATED" if r.simulated else "measured",
            ])
    return path


def _curves(records: Sequence[RoundRecord], arm: Arm) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(energy[seed, round], accuracy[seed, round], seeds) for one arm; rounds 0..R."""
    by_seed: dict[int, list[RoundRecord]] = defaultdict(list)
    for r in records:
        if arm.matches(r.method, r.ratio, r.p, r.fixed):
            by_seed[r.seed].append(r)
    seeds = sorted(by_seed)
    rows = [sorted(by_seed[s], key=lambda r: r.round) for s in seeds]
    energy = np.array([[r.cumulative_energy_j for r in row] for row in rows])
    accuracy = np.array([[r.accuracy for r in row] for row in rows])
    return energy, accuracy, np.array(seeds), np.array([r.round for r in rows[0]])


def summarize(records: Sequence[RoundRecord], config: FLConfig, fleet_info: list[dict], engine: str,
              command: str = "") -> dict[str, Any]:
    simulated = any(r.simulated for r in records)
    ratios = []
    for ratio in config.ratios:
        arms = [a for a in arms_of(config) if a.ratio == ratio and not a.fixed]
        methods = []
        target = None
        topk_energy = None
        for arm in arms:
            energy, accuracy, seeds, rounds = _curves(records, arm)
            final_acc, final_e = accuracy[:, -1], energy[:, -1]
            entry = {
                "method": arm.method, "p": arm.power, "label": arm.family,
                "final_accuracy_mean": float(final_acc.mean()), "final_accuracy_std": float(final_acc.std(ddof=0)),
                "final_energy_j_mean": float(final_e.mean()), "final_energy_j_std": float(final_e.std(ddof=0)),
                "seeds": [int(s) for s in seeds],
            }
            if arm.method == "topk":
                target, topk_energy = entry["final_accuracy_mean"], entry["final_energy_j_mean"]
            else:
                mean_acc, mean_e = accuracy.mean(0), energy.mean(0)
                reached = np.flatnonzero(mean_acc >= target - 1e-12)
                if reached.size:
                    j = float(mean_e[reached[0]])
                    entry["energy_to_topk_accuracy_j"] = j
                    entry["round_to_topk_accuracy"] = int(rounds[reached[0]])
                    entry["energy_to_topk_accuracy_vs_topk"] = j / topk_energy if topk_energy else None
                else:
                    entry["energy_to_topk_accuracy_j"] = "never"
            methods.append(entry)
        ratios.append({"ratio": ratio, "topk_final_accuracy_mean": target, "methods": methods})
    return {
        "frontier": frontier(records, config),
        "energy_split": energy_split(records, config),
        "layers": layer_telemetry(records, config),
        "goal": _goal(ratios),
        "simulated": simulated,
        "energy_label": _label(simulated),
        "engine": engine,
        "command": command,
        "config": {
            "dataset": config.dataset, "model": config.model, "clients": config.clients, "alpha": config.alpha,
            "rounds": config.rounds, "local_epochs": config.local_epochs, "batch_size": config.batch_size,
            "lr": config.lr, "seeds": list(config.seeds), "ratios": list(config.ratios), "sweep": list(config.sweep),
            "powers": list(config.powers), "profiles": list(config.profiles), "min_partition": config.min_partition,
        },
        "profiles": fleet_info,
        "ratios": ratios,
    }


def _final_points(records: Sequence[RoundRecord], config: FLConfig) -> list[dict[str, Any]]:
    """Every arm's end point: mean (over seeds) final cumulative energy and final accuracy, with the
    seeds' spread."""
    points = []
    for arm in arms_of(config):
        energy, accuracy, _, _ = _curves(records, arm)
        points.append({"family": arm.family, "arm": arm.label, "energy_j": float(energy[:, -1].mean()),
                       "energy_j_std": float(energy[:, -1].std(ddof=0)),
                       "accuracy": float(accuracy[:, -1].mean()), "accuracy_std": float(accuracy[:, -1].std(ddof=0))})
    return points


def frontier(records: Sequence[RoundRecord], config: FLConfig) -> dict[str, Any]:
    """Each method's frontier over every arm it ran (the ratios at Top-K's energy and the budget
    sweep): at each energy E where some arm ended, the best mean final accuracy the method reached
    with at most E joules (its seeds' std beside it), and which method is ahead there. A method is
    ahead only by more than the larger of the two seeds' spreads; else the energies say "tie"."""
    points = _final_points(records, config)
    families = list(dict.fromkeys(p["family"] for p in points))
    rows = []
    for e in sorted({p["energy_j"] for p in points}):
        best = {}
        for fam in families:
            mine = [p for p in points if p["family"] == fam and p["energy_j"] <= e * (1 + 1e-9)]
            if mine:
                top = max(mine, key=lambda p: p["accuracy"])
                best[fam] = {"accuracy": top["accuracy"], "std": top["accuracy_std"], "arm": top["arm"]}
        rows.append({"energy_j": e, "best": best, "ahead": ahead(best)})
    return {"points": points, "rows": rows}


def ahead(best: dict[str, dict[str, float]]) -> str | None:
    """Who is ahead among methods' best ``{"accuracy", "std"}``: the methods within the seeds' spread
    of the most accurate one (the larger of the two stds) are level with it; the others are behind."""
    ranked = sorted(best.items(), key=lambda kv: -kv[1]["accuracy"])
    if not ranked:
        return None
    top = ranked[0][1]
    level = [name for name, b in ranked if top["accuracy"] - b["accuracy"] <= max(top["std"], b["std"])]
    behind = [name for name, _ in ranked if name not in level]
    if len(level) == 1:
        return level[0]
    if not behind:
        return "tie (within the seeds' spread)"
    return f"{' and '.join(level)} (level within the seeds' spread; ahead of {', '.join(behind)})"


def energy_split(records: Sequence[RoundRecord], config: FLConfig) -> list[dict[str, Any]]:
    """Where a round's joules go, per arm (mean over rounds 1..R and seeds): the floor every round
    pays (compensation), the masks' part, the radio."""
    out = []
    for arm in arms_of(config):
        rows = [r for r in records if arm.matches(r.method, r.ratio, r.p, r.fixed) and r.round > 0]
        total = math.fsum(r.round_energy_j for r in rows)
        if not rows or total <= 0:
            continue
        out.append({"arm": arm.label, "round_j": total / len(rows),
                    "floor_share": math.fsum(r.floor_energy_j for r in rows) / total,
                    "mask_share": math.fsum(r.mask_energy_j for r in rows) / total,
                    "radio_share": math.fsum(r.radio_energy_j for r in rows) / total})
    return out


def layer_telemetry(records: Sequence[RoundRecord], config: FLConfig) -> list[dict[str, Any]]:
    """Per arm and layer, over every client, round (1..R) and seed: how often the layer was opened
    (kept any entry) and what share of its entries was kept."""
    out = []
    for arm in arms_of(config):
        rows = [r for r in records if arm.matches(r.method, r.ratio, r.p, r.fixed) and r.round > 0]
        if not rows:
            continue
        for name, numel in rows[0].numel_by_layer.items():
            opened = sum(r.opened_by_layer.get(name, 0) for r in rows)
            kept = sum(r.kept_by_layer.get(name, 0) for r in rows)
            chances = len(rows) * config.clients
            out.append({"arm": arm.label, "layer": name, "numel": numel, "opened_share": opened / chances,
                        "kept_share": kept / (chances * numel)})
    return out


def _goal(ratios: list[dict[str, Any]]) -> dict[str, Any]:
    """The seed paper's claim, as our goal: at Top-K's energy at every ratio, CWMP p=2's final accuracy
    is at least Top-K's minus one std, and strictly higher at two ratios or more."""
    rows = []
    for block in ratios:
        by = {m["label"]: m for m in block["methods"]}
        top, cw = by.get("Top-K"), by.get("CWMP p=2")
        if top and cw:
            rows.append({"ratio": block["ratio"], "not_worse": cw["final_accuracy_mean"] >= top["final_accuracy_mean"] - top["final_accuracy_std"],
                         "higher": cw["final_accuracy_mean"] > top["final_accuracy_mean"]})
    return {"rows": rows, "met": bool(rows) and all(r["not_worse"] for r in rows) and sum(r["higher"] for r in rows) >= 2}


def _fmt_j(j: Any) -> str:
    return j if isinstance(j, str) else f"{j:.4g} J"


def summary_markdown(summary: dict[str, Any]) -> str:
    sim = " (SIMULATED)" if summary["simulated"] else ""
    tag = "SIMULATED" if summary["simulated"] else "predicted"
    c = summary["config"]
    lines = [
        f"# Federated benchmark: Top-K vs CWMP{sim}",
        "",
        f"Energy: {summary['energy_label']}.",
        f"{c['dataset']}, {c['model']}, {c['clients']} clients, Dirichlet alpha={c['alpha']}, {c['rounds']} rounds, "
        f"{c['local_epochs']} local epoch(s), seeds {', '.join(map(str, c['seeds']))}, engine {summary['engine']}.",
    ]
    if summary.get("command"):
        lines.append(f"Command: `{summary['command']}`")
    lines.append("")
    for p in summary["profiles"]:
        pred = p["predicted_layers"]
        lines.append(
            f"- profile `{p['profile']}`{' [SIMULATED]' if p['simulated'] else ''}, clients {p['clients']}: "
            f"{len(pred)} of {p['layers']} layers priced from the global coefficients (predicted)"
            + ("; every layer has the same price, so CWMP's order is Top-K's order on these clients"
               if p["uniform_costs"] else f"; prices {p['joules_per_update_min']:.3g} .. {p['joules_per_update_max']:.3g} J/entry")
            + ("; no radio entry: transmission energy not counted" if p["radio"] is None
               else f"; radio {p['radio']['joules_per_byte']:.3g} J/byte ({p['radio']['source']})")
        )
    lines += [
        "",
        f"| keep ratio | method | final accuracy (mean ± std) | final cumulative energy, {tag} | energy to reach Top-K's final accuracy, {tag} |",
        "|---|---|---|---|---|",
    ]
    for block in summary["ratios"]:
        for m in block["methods"]:
            reach = "—" if m["method"] == "topk" else _fmt_j(m["energy_to_topk_accuracy_j"])
            if m["method"] != "topk" and not isinstance(m["energy_to_topk_accuracy_j"], str):
                reach += f" (round {m['round_to_topk_accuracy']}, {m['energy_to_topk_accuracy_vs_topk']:.3f} x Top-K's)"
            lines.append(
                f"| {block['ratio']:.0%} | {m['label']} | {m['final_accuracy_mean']:.4f} ± {m['final_accuracy_std']:.4f} "
                f"| {m['final_energy_j_mean']:.4g} ± {m['final_energy_j_std']:.2g} J | {reach} |"
            )
    lines.append("")
    goal = summary.get("goal")
    if goal and goal["rows"]:
        worse = [f"{r['ratio']:.0%}" for r in goal["rows"] if not r["not_worse"]]
        higher = [f"{r['ratio']:.0%}" for r in goal["rows"] if r["higher"]]
        lines += [f"Goal (the seed paper's claim): at Top-K's energy, CWMP p=2 at least Top-K's accuracy minus one std "
                  f"at every ratio and strictly higher at two or more: **{'met' if goal['met'] else 'not met'}** "
                  f"(higher at {', '.join(higher) or 'none'}; worse by more than a std at {', '.join(worse) or 'none'}).", ""]
    fr = summary.get("frontier")
    if fr:
        fams = list(dict.fromkeys(p["family"] for p in fr["points"]))
        lines += [f"Frontiers over every arm (the ratios at Top-K's energy and the fixed-budget sweep): the best mean "
                  f"final accuracy each method reached with at most E joules ({tag}), ± the seeds' std.", "",
                  "| cumulative energy E | " + " | ".join(fams) + " | ahead |", "|---" * (len(fams) + 2) + "|"]
        for row in fr["rows"]:
            cells = [(f"{row['best'][f]['accuracy']:.4f} ± {row['best'][f]['std']:.4f}" if f in row["best"] else "—")
                     for f in fams]
            lines.append(f"| {row['energy_j']:.4g} J | " + " | ".join(cells) + f" | {row['ahead']} |")
        lines.append("")
    split = summary.get("energy_split")
    if split:
        lines += ["Where a client's round goes (mean over rounds and seeds): the floor every round pays whatever the "
                  "mask keeps (error feedback's compensation of every tensor), the masks' part, the radio. A training "
                  "step is not priced: no profile measures it yet, and it costs every method the same.", "",
                  "| arm | joules per round, all clients | floor | masks | radio |", "|---|---|---|---|---|"]
        for e in split:
            lines.append(f"| {e['arm']} | {e['round_j']:.4g} J | {e['floor_share']:.1%} | {e['mask_share']:.1%} | "
                         f"{e['radio_share']:.1%} |")
        lines.append("")
    layers = summary.get("layers")
    if layers:
        never = sorted({(t["arm"], t["layer"]) for t in layers if t["opened_share"] == 0})
        lines += ["Per-layer telemetry: how often each layer was opened (any entry kept), over clients, rounds and "
                  "seeds (all of it: layers.csv).", ""]
        arms = list(dict.fromkeys(t["arm"] for t in layers))
        names = list(dict.fromkeys(t["layer"] for t in layers))
        lines += ["| arm | " + " | ".join(f"`{n}`" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
        for a in arms:
            share = {t["layer"]: t["opened_share"] for t in layers if t["arm"] == a}
            lines.append(f"| {a} | " + " | ".join(f"{share.get(n, 0):.0%}" for n in names) + " |")
        lines.append("")
        if never:
            lines.append("Never opened: " + "; ".join(f"{a}: `{n}`" for a, n in never) + ".")
            lines.append("")
    return "\n".join(lines)


def write_layers_csv(summary: dict[str, Any], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        f.write(f"# {summary['energy_label']}\n")
        writer = csv.writer(f)
        writer.writerow(["arm", "layer", "numel", "opened_share", "kept_share"])
        for t in summary.get("layers", []):
            writer.writerow([t["arm"], t["layer"], t["numel"], f"{t['opened_share']:.6f}", f"{t['kept_share']:.6g}"])
    return path


def write_summary(summary: dict[str, Any], path: Path) -> Path:
    path.write_text(summary_markdown(summary))
    return path


def write_plot(records: Sequence[RoundRecord], config: FLConfig, path: Path, simulated: bool) -> Path:
    """Accuracy (mean over seeds) against cumulative energy (mean over seeds), one line per method
    and ratio, and each method's Pareto frontier over all ratios (best accuracy for at most that energy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"Top-K": "tab:blue", "CWMP p=1": "tab:orange", "CWMP p=2": "tab:green"}
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    frontier_points: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for arm in arms_of(config):
        energy, accuracy, _, _ = _curves(records, arm)
        e, a = energy.mean(0), accuracy.mean(0)
        color = colors.get(arm.family, None)
        levels = list(config.ratios) + list(config.sweep)
        marker = markers[(levels.index(arm.ratio) if not arm.fixed else len(config.ratios) + list(config.sweep).index(arm.ratio)) % len(markers)]
        ax.plot(e[1:], a[1:], color=color, marker=marker, markersize=3, linewidth=0.8, alpha=0.6,
                linestyle="-" if arm.method == "topk" else ("--" if arm.power == 1 else ":"), label=arm.label)
        frontier_points[arm.family].extend(zip(e[1:], a[1:]))
    for family, points in frontier_points.items():
        points.sort()
        xs, ys, best = [], [], -math.inf
        for x, y in points:
            if y > best:
                best = y
                xs.append(x)
                ys.append(y)
        ax.step(xs, ys, where="post", color=colors.get(family), linewidth=2.2, label=f"{family} Pareto frontier")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative client energy, all clients (J" + (", SIMULATED)" if simulated else ", predicted)"))
    ax.set_ylabel("test accuracy (mean over seeds)")
    title = (f"{config.dataset.split(':')[0]} / {config.model}, {config.clients} clients, alpha={config.alpha}, "
             f"{len(config.seeds)} seeds")
    ax.set_title(("SIMULATED energy: " if simulated else "") + title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6.5, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


OUTPUT_FILES = ("rounds.csv", "layers.csv", "summary.md", "summary.json", "pareto.png")


def write_outputs(records: Sequence[RoundRecord], summary: dict[str, Any], config: FLConfig, out: Path,
                  say: Any = None) -> dict[str, Path]:
    """The CSV and the summaries first, the plot last: a plot that fails loses nothing (it is said
    on ``say`` and left out of the returned paths)."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    simulated = summary["simulated"]
    paths = {
        "csv": write_csv(records, out / "rounds.csv", simulated),
        "layers": write_layers_csv(summary, out / "layers.csv"),
        "summary": write_summary(summary, out / "summary.md"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    paths["json"] = out / "summary.json"
    try:  # last: a plot that fails loses nothing
        paths["plot"] = write_plot(records, config, out / "pareto.png", simulated)
    except Exception as exc:  # matplotlib missing or failing: the numbers are written already
        if say is None:
            raise
        say(f"energyprof: warning: no plot ({type(exc).__name__}: {exc}); {', '.join(str(p) for p in paths.values())} "
            "are written")
    return paths
