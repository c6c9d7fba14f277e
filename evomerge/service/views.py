"""What the API reads from a study: the job summary, the trial rows, a Pareto front over any
two metrics, the hypervolume over trials, a recipe's coefficient heatmap and its scores next
to the source models and the uniform merge. Plain data (JSON-ready), no I/O but the study's.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna

from evomerge.config import JobConfig
from evomerge.recipe import DFSRecipe, Recipe

MINIMIZE_PREFIXES = ("entropy", "perplexity", "cost", "loss", "latency", "duration")


def clean(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None`` (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


def trial_rows(study: optuna.Study, job: JobConfig) -> list[dict[str, Any]]:
    """One row per trial and per reference merge (``evomerge results``' table), JSON-ready."""
    from evomerge.runs.results import results_frame

    frame = results_frame(study, job)
    if frame.empty:
        return []
    records = frame.reset_index().astype(object).to_dict("records")
    return [clean({k: (None if _isnan(v) else v) for k, v in r.items()}) for r in records]


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def summary(study: optuna.Study | None, job: JobConfig, status: Mapping[str, Any]
            ) -> dict[str, Any]:
    """A job list entry: state, done/budget, best, held-out of the best, timing."""
    from optuna.trial import TrialState

    from evomerge.search.fidelity import best_contender
    from evomerge.search.heldout import stored_held_out
    from evomerge.search.study import counted_trials

    out: dict[str, Any] = {
        "name": job.name, "state": status.get("state"), "error": status.get("error"),
        "budget": job.search.trials, "done": 0, "best": None, "best_trial": None,
        "held_out_best": None, "started": None, "elapsed_s": None, "evals_per_min": None,
        "objectives": [{"label": o.label, "direction": o.direction} for o in job.objectives],
    }
    if study is None:
        return out
    trials = study.get_trials(deepcopy=False)
    out["done"] = counted_trials(study)
    starts = [t.datetime_start.timestamp() for t in trials if t.datetime_start]
    ends = [t.datetime_complete.timestamp() for t in trials if t.datetime_complete]
    if starts:
        running = status.get("state") in ("starting", "running")
        end = time.time() if running or not ends else max(ends)
        out["started"], out["elapsed_s"] = min(starts), end - min(starts)
        if out["elapsed_s"] > 0:
            out["evals_per_min"] = out["done"] / (out["elapsed_s"] / 60)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    best = best_contender(done, job.objectives[0].direction == "maximize")  # confirmed ones
    if best is not None and len(job.objectives) == 1:
        out["best"], out["best_trial"] = best.values[0], best.number
        out["held_out_best"] = stored_held_out(study).get(best.number, {}).get("metrics")
    elif done:
        out["best"] = [
            (max if o.direction == "maximize" else min)(t.values[i] for t in done)
            for i, o in enumerate(job.objectives)
        ]
    return clean(out)


def direction_of(metric: str, job: JobConfig) -> str:
    """The direction of ``metric``: its objective's, else guessed from the metric's name."""
    for o in job.objectives:
        if metric in (f"objective:{o.label}", o.label) or (o.metric and metric.endswith(o.metric)):
            return o.direction
    name = metric.split(":")[-1]
    return "minimize" if name.startswith(MINIMIZE_PREFIXES) else "maximize"


def pareto(rows: Sequence[Mapping[str, Any]], x: str, y: str, dx: str, dy: str
           ) -> dict[str, Any]:
    """Points of the COMPLETE trials that have both metrics, each marked dominated or not, and
    the front (non-dominated trials) in order of ``x``."""
    from evomerge.search.fidelity import dominates

    signs = [1 if d == "maximize" else -1 for d in (dx, dy)]
    pts = [(r["trial"], r[x], r[y]) for r in rows if r["state"] == "COMPLETE"
           and isinstance(r.get(x), int | float) and isinstance(r.get(y), int | float)]
    points = [
        {"trial": n, "x": a, "y": b,
         "dominated": any(dominates((a2, b2), (a, b), signs) for m, a2, b2 in pts if m != n)}
        for n, a, b in pts
    ]
    front = sorted((p for p in points if not p["dominated"]), key=lambda p: p["x"])
    return {"x": x, "y": y, "directions": [dx, dy], "points": points,
            "front": [p["trial"] for p in front]}


def hypervolume(rows: Sequence[Mapping[str, Any]], job: JobConfig) -> list[dict[str, Any]]:
    """Hypervolume of the front so far after each COMPLETE trial (objectives, maximise-signed,
    reference point: the worst value seen); one objective: the best so far."""
    keys = [f"objective:{o.label}" for o in job.objectives]
    signs = [1 if o.direction == "maximize" else -1 for o in job.objectives]
    done = sorted((r for r in rows if r["state"] == "COMPLETE" and isinstance(r["trial"], int)
                   and all(isinstance(r.get(k), int | float) for k in keys)),
                  key=lambda r: r["trial"])
    if not done:
        return []
    pts = [[s * r[k] for k, s in zip(keys, signs, strict=True)] for r in done]
    ref = [min(p[i] for p in pts) for i in range(len(keys))]
    out, seen = [], []
    for r, p in zip(done, pts, strict=True):
        seen.append(p)
        out.append({"trial": r["trial"], "hypervolume": _hv(seen, ref)})
    return out


def _hv(points: list[list[float]], ref: list[float]) -> float:
    """Hypervolume (maximisation) dominated by ``points`` above ``ref``; exact in 1-2 D,
    Optuna's routine otherwise."""
    if len(ref) == 1:
        return max(p[0] for p in points) - ref[0]
    if len(ref) == 2:
        total, best_y = 0.0, ref[1]
        for x, y in sorted(points, key=lambda p: -p[0]):
            if y > best_y:
                total += (x - ref[0]) * (y - best_y)
                best_y = y
        return total
    import numpy as np
    from optuna._hypervolume import compute_hypervolume

    return float(compute_hypervolume(-np.asarray(points), -np.asarray(ref)))


def num_layers(recipe: Recipe | DFSRecipe) -> int | None:
    """Decoder layers of the recipe's first local source (its config.json), if readable."""
    for source in recipe.sources.values():
        if isinstance(source, str) and (Path(source) / "config.json").is_file():
            cfg = json.loads((Path(source) / "config.json").read_text())
            n = cfg.get("num_hidden_layers") or cfg.get("n_layer")
            if isinstance(n, int):
                return n
    return None


def heatmap(recipe: Recipe | DFSRecipe) -> dict[str, Any]:
    """The recipe as matrices to draw: ps: per parameter (weight, density, ...) rows = models
    (x module kind), columns = layers; dfs: the layer path (slot -> source, layer) and scales."""
    if isinstance(recipe, DFSRecipe):
        return {"kind": "dfs", "slots": list(range(len(recipe.layers))),
                "sources": [s for s, _ in recipe.layers], "layers": [i for _, i in recipe.layers],
                "scales": list(recipe.scales), "embed_from": recipe.embed_from}
    layers = num_layers(recipe)
    params = sorted({k for p in recipe.models.values() for k, v in p.items()
                     if not isinstance(v, bool)})
    out: dict[str, Any] = {"kind": "ps", "method": recipe.method, "num_layers": layers,
                           "params": {}}
    for param in params:
        rows, z = [], []
        for model, values in recipe.models.items():
            value = values.get(param)
            if value is None:
                continue
            for kind, v in _by_kind(value):
                rows.append(model if kind is None else f"{model} · {kind}")
                z.append(_per_layer(v, layers))
        width = max(len(r) for r in z) if z else 0
        out["params"][param] = {"rows": rows, "z": z, "columns": list(range(width)),
                                "axis": "layer" if layers else "layer group"}
    return clean(out)


def _by_kind(value: Any) -> list[tuple[str | None, Any]]:
    if isinstance(value, Mapping):
        return [(str(k), v) for k, v in value.items()]  # the recipe's own order
    return [(None, value)]


def _per_layer(value: Any, layers: int | None) -> list[float]:
    groups = list(value) if isinstance(value, list | tuple) else [value]
    if not layers:
        return [float(v) for v in groups]
    return [float(groups[i * len(groups) // layers]) for i in range(layers)]


def recipe_text(recipe: Mapping[str, Any]) -> str:
    """A few lines for a hover label: per model its coefficients, rounded."""
    if recipe.get("kind") == "dfs":
        path = " → ".join(f"{s}[{i}]" for s, i in recipe.get("layers", []))
        return f"dfs path: {path}"
    lines = [str(recipe.get("method", ""))]
    for model, params in recipe.get("models", {}).items():
        parts = [f"{k}={_short(v)}" for k, v in params.items() if not isinstance(v, bool)] or [""]
        lines += [f"{model}: {parts[0]}", *(f"  {p}" for p in parts[1:])]
    return "<br>".join(lines)


def _short(v: Any) -> str:
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}: {_short(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(f"{x:.2f}" for x in v) + "]"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def scores(rows: Sequence[Mapping[str, Any]], number: int, job: JobConfig) -> dict[str, Any]:
    """Per task metric: the trial, each expert alone, the uniform merge and the references,
    on the fitness split and (where scored) the held-out split."""
    by_trial = {r["trial"]: r for r in rows}
    if number not in by_trial:
        raise KeyError(number)
    columns = {f"trial {number}": by_trial[number]}
    for r in rows:
        base = r.get("baseline") or ""
        if base == "uniform" or base.startswith("expert:") or str(r["trial"]).startswith(
                "reference:"):
            columns.setdefault(str(r["trial"]) if r["state"] == "REFERENCE" else base, r)
    metrics = sorted({k for r in columns.values() for k, v in r.items() if "/" in k
                      and not k.startswith(("objective:", "held_out:"))
                      and isinstance(v, int | float)})
    table = [{"metric": m, "split": split,
              **{c: clean(r.get(prefix + m)) for c, r in columns.items()}}
             for m in metrics for split, prefix in (("fitness", ""), ("held-out", "held_out:"))
             if any(isinstance(r.get(prefix + m), int | float) for r in columns.values())]
    return {"columns": list(columns), "rows": table}
