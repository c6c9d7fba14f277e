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


def reference_phase(job: JobConfig, study: optuna.Study, pool: Any) -> dict[str, dict[str, Any]]:
    """Score the reference recipes not yet stored (a resumed run skips the stored ones)."""
    from evomerge.worker import has_held_out

    if job.search.held_out_top_k == 0:
        return {}
    held_out = any(has_held_out(e) for e in job.evaluators)
    out: dict[str, dict[str, Any]] = {}
    for name, recipe in reference_recipes(job).items():
        if PREFIX + name in study.user_attrs:
            continue
        worker = pool.idle.pop()
        entry: dict[str, Any] = {"recipe": recipe.to_dict()}
        entry["metrics"] = _call(pool, pool.submit(worker, recipe, 1.0), worker)
        if held_out:
            entry["held_out"] = _call(pool, pool.submit_held_out(worker, recipe), worker)
        pool.idle.append(worker)
        study.set_user_attr(PREFIX + name, entry)
        out[name] = entry
    return out


def _call(pool: Any, ref: Any, worker: int) -> dict[str, Any]:
    _, _, result, error = pool.next_result({ref: worker})
    return dict(result["metrics"]) if result else {"error": error}


def stored_references(study: optuna.Study) -> dict[str, dict[str, Any]]:
    """``{name: {"recipe", "metrics", "held_out"}}`` of a run."""
    return {
        k.removeprefix(PREFIX): v for k, v in study.user_attrs.items() if k.startswith(PREFIX)
    }
