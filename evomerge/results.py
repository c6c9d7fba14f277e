"""Reading a run: the trial table (pandas), the best trial(s), the Pareto front.

Every metric of every trial is stored, so any front can be recomputed when reading.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from evomerge.config import JobConfig, load_job
from evomerge.fidelity import dominates
from evomerge.heldout import stored_held_out
from evomerge.storage import open_storage
from evomerge.storage import storage_url as storage_url_of


def open_run(run: str | Path, *, storage_url: str | None = None) -> tuple[optuna.Study, JobConfig]:
    """Open a finished or running search from its run folder (or its job YAML)."""
    p = Path(run)
    job_path = p / "job.yaml" if p.is_dir() else p
    if not job_path.is_file():
        raise FileNotFoundError(
            f"{str(p)!r} is not a run folder (no job.yaml inside) nor a job config file"
        )
    job = load_job(job_path)  # a job.yaml that is not valid: one line naming it
    url = storage_url_of(storage_url or job.storage, job.resolved_run_dir)
    journal = Path(url.removeprefix("journal:")) if url.startswith("journal:") else None
    where = journal or url
    if journal is not None and not journal.is_file():
        raise FileNotFoundError(
            f"no study journal at {journal}: the search has not started yet, or the run's "
            "storage is elsewhere (pass --storage URL)"
        )
    storage = open_storage(url, job.resolved_run_dir)
    try:
        study = optuna.load_study(study_name=job.name, storage=storage, sampler=None)
    except KeyError:
        empty = journal is not None and journal.stat().st_size == 0
        where = f"{where} (the file is empty)" if empty else where
        raise FileNotFoundError(f"no study named {job.name!r} in {where}") from None
    return study, job


def results_frame(study: optuna.Study, job: JobConfig) -> pd.DataFrame:
    """One row per trial: number, state, objective values, every metric, held-out metrics."""
    held = stored_held_out(study)
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {
            "trial": t.number,
            "state": t.state.name,
            "baseline": t.user_attrs.get("baseline", ""),
        }
        for obj, v in zip(job.objectives, t.values or [None] * len(job.objectives), strict=True):
            row[f"objective:{obj.label}"] = v
        row.update(t.user_attrs.get("metrics", {}))
        for k, v in held.get(t.number, {}).get("metrics", {}).items():
            row[f"held_out:{k}"] = v
        row["duration_s"] = t.duration.total_seconds() if t.duration else None
        row["error"] = t.user_attrs.get("error", "")
        rows.append(row)
    rows += _reference_rows(study, job)
    return pd.DataFrame(rows).set_index("trial") if rows else pd.DataFrame()


def _reference_rows(study: optuna.Study, job: JobConfig) -> list[dict[str, Any]]:
    """Rows ``reference:<name>`` for the merges scored outside the space (state REFERENCE)."""
    from evomerge.objectives import objective_values
    from evomerge.references import PREFIX, stored_references

    rows = []
    for name, ref in stored_references(study).items():
        metrics = ref.get("metrics", {})
        row: dict[str, Any] = {"trial": PREFIX + name, "state": "REFERENCE", "baseline": name}
        try:
            values: list[Any] = objective_values(job.objectives, metrics)
        except (KeyError, ValueError):
            values = [None] * len(job.objectives)
        for obj, v in zip(job.objectives, values, strict=True):
            row[f"objective:{obj.label}"] = v
        row.update({k: v for k, v in metrics.items() if k != "error"})
        held = ref.get("held_out", {})
        row.update({f"held_out:{k}": v for k, v in held.items() if k != "error"})
        row["error"] = metrics.get("error") or held.get("error", "")
        rows.append(row)
    return rows


def pareto_front(trials: list[FrozenTrial], directions: Sequence[str]) -> list[FrozenTrial]:
    """Brute-force non-dominated filter over completed trials (independent of Optuna's)."""
    signs = [1 if d == "maximize" else -1 for d in directions]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    return [
        t
        for t in done
        if not any(dominates(o.values, t.values, signs) for o in done if o is not t)
    ]


def best_trials(study: optuna.Study, job: JobConfig) -> list[FrozenTrial]:
    """The best trial (single objective) or the Pareto set (several)."""
    if len(job.objectives) == 1:
        return [study.best_trial]
    directions = [o.direction for o in job.objectives]
    return pareto_front(study.get_trials(deepcopy=False), directions)
