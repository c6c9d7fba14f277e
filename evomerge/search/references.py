"""Reference merges outside the searched space, scored once after the search.

A search over TIES (or DARE, breadcrumbs, ...) cannot hold uniform task arithmetic as one of its
trials: it is not a point of that space. It is still the merge a user compares against, so after
the search (with ``search.baselines`` on and a held-out pass, ``held_out_top_k > 0``) the driver
scores it on the fitness split and on the held-out split and stores it as the study attribute
``reference:uniform_task_arithmetic`` = ``{"recipe", "metrics", "held_out"}``.
``evomerge results`` lists it as a row of its own.
"""

from __future__ import annotations

from typing import Any

import optuna

from evomerge.config import JobConfig, ParameterSpaceConfig
from evomerge.recipe import Recipe
from evomerge.search.study import json_metrics

PREFIX = "reference:"


def reference_recipes(job: JobConfig) -> dict[str, Recipe]:
    """``{"uniform_task_arithmetic": recipe}`` for a parameter-space search over another method
    with a base model; ``{}`` otherwise."""
    cfg = job.search.space
    if (
        not isinstance(cfg, ParameterSpaceConfig)
        or cfg.method == "task_arithmetic"
        or job.models.base is None
        or not job.search.baselines
    ):
        return {}
    from evomerge.search_spaces.parameter import ParameterSpace

    ta = ParameterSpaceConfig(name="parameter", method="task_arithmetic", non_layer=cfg.non_layer)
    space = ParameterSpace(ta, models=job.models)
    return {"uniform_task_arithmetic": space.decode(space.baselines()["uniform"])}


def reference_phase(
    job: JobConfig, study: optuna.Study, pool: Any, on_progress: Any = None
) -> dict[str, dict[str, Any]]:
    """Score the reference recipes not yet stored, or stored with an error (a resumed run
    retries those); ``"nonfinite"`` lists the metrics stored as null. ``on_progress`` gets the
    ``reference`` step (evaluations done of those to do)."""
    from evomerge.search.progress import Step
    from evomerge.search.worker import has_held_out

    if job.search.held_out_top_k == 0:
        return {}
    parts = {"metrics": "evaluate"}
    if any(has_held_out(e) for e in job.evaluators):
        parts["held_out"] = "evaluate_held_out"
    stored = stored_references(study)
    todo = {n: r for n, r in reference_recipes(job).items() if not _scored(stored.get(n), parts)}
    calls = [((name, p), m, (r.to_json(),)) for name, r in todo.items() for p, m in parts.items()]
    entries: dict[str, dict[str, Any]] = {n: {"recipe": r.to_dict()} for n, r in todo.items()}
    step = Step("reference", len(calls), on_progress) if calls else None
    for (name, part), result, error in pool.as_completed(calls):
        if step is not None:
            step.advance()
        entry = entries[name]
        entry[part] = {"error": error}
        if result is not None:
            entry[part], nonfinite = json_metrics(result["metrics"])
            prefix = "" if part == "metrics" else f"{part}:"
            if nonfinite:
                bad = entry.get("nonfinite", []) + [prefix + m for m in nonfinite]
                entry["nonfinite"] = sorted(bad)
        if all(p in entry for p in parts):
            study.set_user_attr(PREFIX + name, entry)
    return entries


def _scored(entry: dict[str, Any] | None, parts: dict[str, str]) -> bool:
    """Every part stored, none as an error (an error entry is retried)."""
    return entry is not None and all("error" not in entry.get(p, {"error": None}) for p in parts)


def stored_references(study: optuna.Study) -> dict[str, dict[str, Any]]:
    """``{name: {"recipe", "metrics", "held_out"}}`` of a run."""
    return {
        k.removeprefix(PREFIX): v for k, v in study.user_attrs.items() if k.startswith(PREFIX)
    }
