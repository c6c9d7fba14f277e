"""Creating, resuming and counting the Optuna study of a job (driver side only)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from evomerge.config import JobConfig
from evomerge.search.journal import DiskFullError
from evomerge.search.mirror import MirroredStorage
from evomerge.search.storage import (
    close_storage,
    lock_study,
    open_storage,
    save_job,
    study_exists,
)

INTERRUPTED = "interrupted"
CONFIRM_ATTR = "confirm_of"  # a confirmation: the trial number whose subset estimate it re-scored
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def directions(job: JobConfig) -> list[Any]:
    return [o.direction for o in job.objectives]


def open_study(
    job: JobConfig,
    *,
    sampler: optuna.samplers.BaseSampler,
    resume: bool,
    storage_url: str | None = None,
    fsync: bool = False,
    phase: str | None = None,
    mirror: bool = True,
) -> optuna.Study:
    """Create the study, or load it with ``resume``; refuse to silently mix two runs.

    ``phase`` (a phase of a ``search.then`` job): the study is ``{name}/{phase}`` and the run's
    ``job.yaml`` (the whole job, written by :mod:`evomerge.search.phases`) is left alone.

    A journal file is opened for writing by this process alone (a second driver on the same
    run fails with :class:`evomerge.search.journal.JournalLockedError`) until :func:`close_study`;
    ``fsync`` fsyncs every journal append.

    The study returned is held in memory and written back to the storage by a background
    thread (:class:`~evomerge.search.mirror.MirroredStorage`): the driver's asks and tells cost
    no storage round trip; :func:`close_study` writes what is left. ``mirror=False`` returns
    the study on the storage itself, every call a write (how the driver worked before; for
    ``bench/driver_overhead.py --before``).
    """
    storage = open_storage(
        storage_url or job.storage, job.resolved_run_dir, writer=True, fsync=fsync
    )
    try:
        stored = _open_study(job, storage, sampler=sampler, resume=resume, where=storage_url,
                             phase=phase)
        if not mirror:
            return stored
        memory = MirroredStorage(storage, stored.study_name)
    except BaseException:
        close_storage(storage)
        raise
    try:
        return optuna.load_study(study_name=stored.study_name, storage=memory, sampler=sampler,
                                 pruner=stored.pruner)
    except BaseException:
        close_storage(memory)
        raise


def close_study(study: optuna.Study) -> None:
    """Write what the study holds in memory to its storage and release the run's writer lock
    taken by :func:`open_study` (the study stays readable; later writes go straight through)."""
    close_storage(study._storage)


def _open_study(
    job: JobConfig,
    storage: optuna.storages.BaseStorage,
    *,
    sampler: optuna.samplers.BaseSampler,
    resume: bool,
    where: str | None,
    phase: str | None = None,
) -> optuna.Study:
    run_dir = job.resolved_run_dir
    name = f"{job.name}/{phase}" if phase else job.name
    lock_study(storage, name)  # PostgreSQL: one driver per study (a journal is locked already)
    exists = study_exists(storage, name)
    if exists and not resume:
        n = len(optuna.load_study(study_name=name, storage=storage).trials)
        if n:
            raise FileExistsError(
                f"study {name!r} already has {n} trials in {where or run_dir}; "
                "pass --resume to continue it, or change 'name'/'run_dir' to start a new one"
            )
    pruner = _pruner(job)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=sampler,
        pruner=pruner,
        directions=directions(job),
        load_if_exists=True,
    )
    if exists:
        _check_same_directions(study, job)
    save_job(study, job.model_dump(mode="json"))
    with warnings.catch_warnings():  # experimental since optuna 3.2, stable in use
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([o.label for o in job.objectives])  # named in optuna-dashboard
    save_dashboard_note(study, job)
    run_dir.mkdir(parents=True, exist_ok=True)
    if phase:
        return study
    path = run_dir / "job.yaml"
    try:
        path.write_text(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
    except OSError as err:  # a failed write() does not name its file: name it here
        if err.errno in DiskFullError.ERRNOS:
            raise DiskFullError(path) from None
        raise
    return study


def save_dashboard_note(study: optuna.Study, job: JobConfig) -> None:
    """optuna-dashboard's study note: the job as YAML (its attribute view cuts values at 1024
    characters) and the held-out and reference scores stored so far; each held-out trial gets
    a note with its scores. Written only where optuna-dashboard is installed."""
    try:
        from optuna_dashboard import save_note
    except ImportError:
        return
    from evomerge.search.heldout import stored_held_out

    held = stored_held_out(study)
    refs = {k: v for k, v in study.user_attrs.items() if k.startswith("reference:")}
    text = yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False)
    body = f"## evomerge job `{job.name}`\n\n```yaml\n{text}```\n"
    if held:
        body += "\n## Held-out scores\n\n" + _md_table({f"trial {n}": e for n, e in held.items()})
    if refs:
        body += "\n## Reference merges\n\n" + _md_table(refs)
    save_note(study, body)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    for number, entry in held.items():
        if number in trials:
            live = optuna.trial.Trial(study, trials[number]._trial_id)
            save_note(live, "## Held-out scores\n\n" + _md_table({f"trial {number}": entry}))


def _md_table(entries: Mapping[str, Any]) -> str:
    """A markdown table: one row per entry, one column per metric (or the error)."""
    def metrics(e: Any) -> dict[str, Any]:
        m = e.get("metrics", e) if isinstance(e, dict) else {}
        held = e.get("held_out", {}) if isinstance(e, dict) else {}
        out = {k: v for k, v in m.items() if k not in ("held_out", "error", "nonfinite")}
        return {**out, **{f"held_out:{k}": v for k, v in held.items() if k != "error"}}

    cols = sorted({k for e in entries.values() for k in metrics(e)})
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, e in entries.items():
        m = metrics(e)
        cells = [f"{m[c]:.4g}" if isinstance(m.get(c), float) else str(m.get(c, "")) for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pruner(job: JobConfig) -> optuna.pruners.BasePruner:
    fid = job.search.fidelity
    if fid is None or len(job.objectives) > 1:
        return optuna.pruners.NopPruner()
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=1, reduction_factor=fid.reduction_factor, min_early_stopping_rate=0
    )


def _check_same_directions(study: optuna.Study, job: JobConfig) -> None:
    want = [optuna.study.StudyDirection[d.upper()] for d in directions(job)]
    if list(study.directions) != want:
        raise ValueError(
            f"study {job.name!r} was created with directions {study.directions}, "
            f"the job now asks {want}; use a new name"
        )


def fail_interrupted(
    study: optuna.Study, numbers: Collection[int] | None = None
) -> list[dict[str, Any]]:
    """Fail RUNNING trials (those of ``numbers``; by default all, left by a dead driver) with
    the interrupted marker; return their params and baseline name to re-run them."""
    rerun = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if numbers is not None and t.number not in numbers:
            continue
        live = optuna.trial.Trial(study, t._trial_id)
        live.set_user_attr(INTERRUPTED, True)
        live.set_user_attr("error", "interrupted: the driver stopped")
        study.tell(t.number, state=TrialState.FAIL)
        rerun.append({"params": dict(t.params), "user_attrs": _carry(t.user_attrs)})
    return rerun


def _carry(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if k == "baseline"}


def requeue(study: optuna.Study, rerun: list[dict[str, Any]], names: Collection[str]) -> None:
    """Enqueue the trials :func:`fail_interrupted` returned. A trial killed inside ``ask()``
    may have no or partial parameters (not all of ``names``): nothing to re-run for it."""
    for r in rerun:
        if set(r["params"]) == set(names):
            study.enqueue_trial(r["params"], user_attrs=r["user_attrs"])


def enqueue_baselines(study: optuna.Study, baselines: Mapping[str, dict[str, Any]]) -> None:
    """Enqueue each baseline that no trial holds yet, so a run killed inside this loop enqueues
    the rest on resume. A trial failed by an interruption does not hold its baseline (its
    re-run does, so :func:`requeue` first). Not ``skip_if_exists``: that would also skip a
    baseline whose parameters an interrupted trial happens to carry."""
    held = {
        t.user_attrs.get("baseline")
        for t in study.get_trials(deepcopy=False)
        if not t.user_attrs.get(INTERRUPTED)
    }
    for name, params in baselines.items():
        if name not in held:
            study.enqueue_trial(params, user_attrs={"baseline": name})


def json_metrics(metrics: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``metrics`` with each non-finite number as ``None``, and the names of those: the journal
    is JSON, and ``json.dumps`` would write a bare ``NaN`` other readers refuse."""
    bad = sorted(
        k for k, v in metrics.items() if isinstance(v, (int, float)) and not math.isfinite(v)
    )
    return {k: None if k in bad else v for k, v in metrics.items()}, bad


def counted_trials(study: optuna.Study) -> int:
    """Trials that count toward the budget: finished, not failed by an interruption, and not a
    confirmation (``subset.confirm``: scored after the budget, not a search trial)."""
    return sum(
        1
        for t in study.get_trials(deepcopy=False, states=COUNTED)
        if not t.user_attrs.get(INTERRUPTED) and CONFIRM_ATTR not in t.user_attrs
    )


@contextmanager
def closing(study: optuna.Study) -> Iterator[optuna.Study]:
    """``with closing(open_study(...)) as study:`` releases the writer lock on exit."""
    try:
        yield study
    finally:
        close_study(study)
