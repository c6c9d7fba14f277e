"""After the search: re-evaluate the best trials and the baselines on the held-out split.

Results are stored as study user attributes ``held_out:{trial number}`` (a finished trial's own
attributes cannot change), so a resumed run only evaluates what is missing or failed. The
phase's last progress line names the best trial and its held-out score (:func:`best_note`).
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from evomerge.config import JobConfig
from evomerge.recipe import Recipe
from evomerge.search.study import json_metrics

PREFIX = "held_out:"


def chosen_trials(job: JobConfig, study: optuna.Study) -> list[FrozenTrial]:
    """The top-k trials by objective among those that compete for best
    (:func:`~evomerge.search.fidelity.contenders`; the Pareto set for several objectives)
    plus the baselines."""
    from evomerge.search.fidelity import contenders

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    k = job.search.held_out_top_k
    if len(study.directions) == 1:
        sign = -1 if job.objectives[0].direction == "maximize" else 1
        top = sorted(contenders(done), key=lambda t: sign * t.values[0])[:k]
    else:
        top = sorted(study.best_trials, key=lambda t: t.number)[:k] if k else []
    base = [t for t in done if t.user_attrs.get("baseline")]
    seen: dict[int, FrozenTrial] = {t.number: t for t in top + base}
    return [seen[n] for n in sorted(seen)]


def held_out_phase(
    job: JobConfig, study: optuna.Study, pool: Any, on_progress: Any = None
) -> dict[int, dict[str, Any]]:
    """Score the chosen trials not yet stored, or stored with an error, on the held-out split;
    store each as ``{"metrics"}`` (plus ``"nonfinite"``: the metrics stored as null) or
    ``{"error"}``, which a resumed run retries. ``on_progress`` gets the ``held_out`` step
    (evaluations done of those to do)."""
    from evomerge.search.progress import Step
    from evomerge.search.worker import has_held_out

    if job.search.held_out_top_k == 0 or not any(has_held_out(e) for e in job.evaluators):
        return {}
    stored = stored_held_out(study)
    calls = [
        (t.number, "evaluate_held_out", (Recipe.from_dict(t.user_attrs["recipe"]).to_json(),))
        for t in chosen_trials(job, study)
        if t.number not in stored or "error" in stored[t.number]
    ]
    results: dict[int, dict[str, Any]] = {}
    step = Step("held_out", len(calls), on_progress) if calls else None
    for i, (number, result, error) in enumerate(pool.as_completed(calls), 1):
        entry: dict[str, Any] = {"error": error}
        if result is not None:
            metrics, nonfinite = json_metrics(result["metrics"])
            entry = {"metrics": metrics, **({"nonfinite": nonfinite} if nonfinite else {})}
        study.set_user_attr(f"{PREFIX}{number}", entry)
        results[number] = entry
        if step is not None:
            step.advance(note=best_note(job, study) if i == len(calls) else "")
    return results


def stored_held_out(study: optuna.Study) -> dict[int, dict[str, Any]]:
    return {
        int(k.removeprefix(PREFIX)): v for k, v in study.user_attrs.items() if k.startswith(PREFIX)
    }


def held_out_scores(study: optuna.Study) -> dict[int, float]:
    """Trial number -> its held-out score: the objective of the job stored in ``study`` on the
    stored held-out metrics; only trials scored without an error, and ``{}`` unless the job has
    exactly one objective (read from the storage, so a resumed run sees its earlier scores)."""
    from evomerge.config import Objective
    from evomerge.search.objectives import objective_values
    from evomerge.search.storage import JOB_ATTR

    objectives = (study.user_attrs.get(JOB_ATTR) or {}).get("objectives") or []
    if len(objectives) != 1:
        return {}
    try:
        objective = Objective.model_validate(objectives[0])
    except ValueError:  # a job stored by another version: show no held-out score, run on
        return {}
    scores = {}
    for number, entry in stored_held_out(study).items():
        try:
            scores[number] = objective_values([objective], entry.get("metrics") or {})[0]
        except (KeyError, ValueError, TypeError):  # an error entry, a metric with no split
            continue
    return scores


def best_note(job: JobConfig, study: optuna.Study) -> str:
    """``best trial 24: held-out=0.7031``: the winner of the run summary (ties on fitness go to
    the better held-out score) and its held-out score; ``""`` with several objectives or no
    held-out score for it."""
    from evomerge.runs.summary import held_out_values, ranked_best

    best = ranked_best(study, job) if len(job.objectives) == 1 else []
    if not best:
        return ""
    score = held_out_values(job, stored_held_out(study).get(best[0].number, {}).get("metrics"))
    return "" if score[0] is None else f"best trial {best[0].number}: held-out={score[0]:.4g}"
