"""Reading a run: the trial table (pandas), the best trial(s), the Pareto front.

A run is opened by its folder (or job YAML), or by storage URL and study name alone, since the
driver stores the job config with the study.

Every metric of every trial is stored, so any front can be recomputed when reading.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from evomerge.config import JobConfig, load_job, parse_job
from evomerge.runs.cost import Cost, estimators, held_out_costs, reference_costs, search_costs
from evomerge.search.fidelity import dominates
from evomerge.search.heldout import stored_held_out
from evomerge.search.storage import JOB_ATTR, load_job_dict, open_storage
from evomerge.search.storage import storage_url as storage_url_of
from evomerge.search.study import CONFIRM_ATTR


def open_run(
    run: str | Path | None = None,
    *,
    storage_url: str | None = None,
    study_name: str | None = None,
) -> tuple[optuna.Study, JobConfig]:
    """Open a finished or running search from its run folder (or its job YAML), or, with no
    ``run``, by ``storage_url`` and ``study_name`` alone (see :func:`open_study_run`).

    >>> study, job = open_run("runs/quickstart")  # doctest: +SKIP
    >>> study, job = open_run(storage_url="postgresql://db/evo", study_name="qs")  # doctest: +SKIP
    """
    if run is None:
        if storage_url is None or study_name is None:
            raise ValueError("give a run folder (or job YAML), or both --storage URL and --study")
        return open_study_run(storage_url, study_name)
    p = Path(run)
    job_path = p / "job.yaml" if p.is_dir() else p
    not_both = ValueError(
        "give a run folder (or job YAML), or --storage URL and --study NAME, not both"
    )
    if study_name is not None and not job_path.is_file():
        raise not_both
    if not job_path.is_file():
        raise FileNotFoundError(
            f"{str(p)!r} is not a run folder (no job.yaml inside) nor a job config file; "
            "without one, open the run by --storage URL --study NAME"
        )
    job = load_job(job_path)  # a job.yaml that is not valid: one line naming it
    url = storage_url_of(storage_url or job.storage, job.resolved_run_dir)
    if job.search.then is not None:  # PS then DFS: --study picks a phase, default the last
        return open_phase(url, job, study_name)
    if study_name is not None:
        raise not_both
    return _load_study(url, job.name, job.resolved_run_dir), job


def open_phase(url: str, job: JobConfig, phase: str | None) -> tuple[optuna.Study, JobConfig]:
    """A study of a ``search.then`` run: ``phase`` is ``ps``, ``dfs`` or ``{name}/ps`` ...;
    ``None`` is the last phase started. Returns the phase's study and its stored job."""
    from evomerge.search.phases import PHASES, stored_job

    names = [f"{job.name}/{p}" for p in PHASES]
    if phase is None:
        opened = [s for s, _ in run_studies_of(url, job)]
        if not opened:
            _load_study(url, names[0], job.resolved_run_dir)  # the one-line error
        return opened[-1], stored_job(opened[-1])
    name = phase if phase in names else f"{job.name}/{phase}"
    if name not in names:
        raise ValueError(f"--study {phase!r}: this run's studies are {', '.join(names)}")
    study = _load_study(url, name, job.resolved_run_dir)
    return study, stored_job(study)


def run_studies_of(url: str, job: JobConfig) -> list[tuple[optuna.Study, JobConfig]]:
    """Every study of the run ``job`` describes that exists: one, or a phase each."""
    if job.search.then is None:
        return [(_load_study(url, job.name, job.resolved_run_dir), job)]
    from evomerge.search.phases import PHASES, stored_job

    out = []
    for p in PHASES:
        try:
            study = _load_study(url, f"{job.name}/{p}", job.resolved_run_dir)
        except FileNotFoundError:
            continue
        out.append((study, stored_job(study)))
    return out


def run_studies(
    run: str | Path, *, storage_url: str | None = None
) -> list[tuple[optuna.Study, JobConfig]]:
    """Every study of a run folder (or job YAML): ``{name}/ps`` and ``{name}/dfs`` of a
    ``search.then`` job, the one study otherwise; each with its (phase) job."""
    study, job = open_run(run, storage_url=storage_url)  # any problem: its one-line error
    p = Path(run)
    whole = load_job(p / "job.yaml" if p.is_dir() else p)
    if whole.search.then is None:
        return [(study, job)]
    url = storage_url_of(storage_url or whole.storage, whole.resolved_run_dir)
    return run_studies_of(url, whole)


def open_study_run(storage_url: str, study_name: str) -> tuple[optuna.Study, JobConfig]:
    """Open a search by its storage and study name alone: the job config is the one the
    driver stored with the study (``evomerge:job``), so no run folder is needed.

    >>> study, job = open_study_run("journal:runs/qs/study.journal", "qs")  # doctest: +SKIP
    """
    study = _load_study(storage_url, study_name, Path.cwd())
    try:
        data = load_job_dict(study)
    except (TypeError, ValueError):  # missing, or not a mapping
        raise ValueError(
            f"study {study_name!r} in {storage_url} has no evomerge job config (study user "
            f"attribute {JOB_ATTR!r}): `evomerge search` did not create it; open it by its "
            "run folder or job YAML instead"
        ) from None
    return study, parse_job(data, source=f"the job config stored in study {study_name!r}")


def _load_study(url: str, name: str, run_dir: Path) -> optuna.Study:
    """Load study ``name`` read-only; one line naming the file or the storage if it is not
    there. A journal file that does not exist is not created."""
    journal = Path(url.removeprefix("journal:")) if url.startswith("journal:") else None
    if journal is not None and not journal.is_file():
        raise FileNotFoundError(
            f"no study journal at {journal}: the search has not started yet, or the run's "
            "storage is elsewhere (pass --storage URL)"
        )
    storage = open_storage(url, run_dir)
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=None)
    except KeyError:
        empty = journal is not None and journal.stat().st_size == 0
        where = f"{journal} (the file is empty)" if empty else str(journal or url)
        names = [s.study_name for s in storage.get_all_studies()]
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise FileNotFoundError(f"no study named {name!r} in {where}{hint}") from None


def results_frame(study: optuna.Study, job: JobConfig) -> pd.DataFrame:
    """One row per trial: number, state, objective values, every metric, held-out metrics,
    the evaluation cost (``cost:*``, :func:`cost_columns`), then the times (whole trial,
    merge, evaluation, queue) and the error."""
    held = stored_held_out(study)
    trials = study.get_trials(deepcopy=False)
    costs = cost_columns(study, job, trials)
    rows = []
    for t in trials:
        row: dict[str, Any] = {
            "trial": t.number,
            "state": t.state.name,
            "baseline": t.user_attrs.get("baseline", ""),
            "confirm_of": t.user_attrs.get(CONFIRM_ATTR, ""),  # a subset trial re-scored
        }
        for obj, v in zip(job.objectives, t.values or [None] * len(job.objectives), strict=True):
            row[f"objective:{obj.label}"] = v
        row.update(t.user_attrs.get("metrics", {}))
        for k, v in held.get(t.number, {}).get("metrics", {}).items():
            row[f"held_out:{k}"] = v
        row.update(_held_out_objectives(job, held.get(t.number, {}).get("metrics")))
        row.update(costs.get(t.number, {}))
        row["duration_s"] = t.duration.total_seconds() if t.duration else None
        timing = t.user_attrs.get("timing", {})  # queue_s: from the ask to the worker starting
        for k in ("merge_s", "eval_s", "queue_s"):
            row[k] = timing.get(k)
        row["worker_peak_mb"] = timing.get("peak_rss_mb")  # the worker's peak RSS so far
        row["error"] = t.user_attrs.get("error", "")
        rows.append(row)
    rows += _reference_rows(study, job, costs)
    return pd.DataFrame(rows).set_index("trial") if rows else pd.DataFrame()


def cost_columns(
    study: optuna.Study, job: JobConfig, trials: Sequence[FrozenTrial]
) -> dict[int | str, dict[str, Any]]:
    """Trial number (or reference name) -> its ``cost:*`` columns: ``cost:examples`` and
    ``cost:tokens`` scored by the trial's search evaluations (every rung), ``..._cum`` the
    running totals in trial order, ``cost:held_out_*`` its held-out pass (not search cost),
    ``cost:estimated`` where they come from the fractions and data sizes
    (:mod:`evomerge.runs.cost`)."""
    fit, held_est = estimators(job)
    held = held_out_costs(study.user_attrs, estimate=held_est)
    out: dict[int | str, dict[str, Any]] = {}
    for c in search_costs(trials, job, estimate=fit):
        h = held.get(c.number, Cost(None, None))  # no held-out pass
        out[c.number] = _cost_row(c.cost if c.evaluations else Cost(None, None), h, c.cumulative)
    refs = reference_costs(study.user_attrs, fitness=fit, held_out=held_est)
    for name, (fitness, held_out) in refs.items():
        out[name] = _cost_row(fitness, held_out, None)
    return out


def _cost_row(search: Cost, held: Cost, cumulative: Cost | None) -> dict[str, Any]:
    return {
        "cost:examples": search.examples,
        "cost:tokens": search.tokens,
        "cost:examples_cum": None if cumulative is None else cumulative.examples,
        "cost:tokens_cum": None if cumulative is None else cumulative.tokens,
        "cost:held_out_examples": held.examples,
        "cost:held_out_tokens": held.tokens,
        "cost:estimated": search.estimated or held.estimated,
    }


def _reference_rows(
    study: optuna.Study, job: JobConfig, costs: dict[int | str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Rows ``reference:<name>`` for the merges scored outside the space (state REFERENCE)."""
    from evomerge.search.objectives import objective_values
    from evomerge.search.references import PREFIX, stored_references

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
        row.update(_held_out_objectives(job, held))
        row.update(costs.get(name, {}))
        row["error"] = metrics.get("error") or held.get("error", "")
        rows.append(row)
    return rows


def _held_out_objectives(job: JobConfig, metrics: dict[str, Any] | None) -> dict[str, Any]:
    """``held_out:objective:{label}``: each objective on the held-out metrics (when scored)."""
    from evomerge.runs.summary import held_out_column, held_out_values

    if not metrics:
        return {}
    values = held_out_values(job, metrics)
    return {held_out_column(o.label): v for o, v in zip(job.objectives, values, strict=True)}


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
    if len(job.objectives) == 1:  # ties on fitness: the better held-out, then the first
        from evomerge.runs.summary import ranked_best

        return ranked_best(study, job)[:1] or [study.best_trial]
    directions = [o.direction for o in job.objectives]
    return pareto_front(study.get_trials(deepcopy=False), directions)
