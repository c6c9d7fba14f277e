"""The search driver: one process owns the study; Ray workers map Recipe -> metrics.

Ask as many trials as there are idle workers, tell each result as it arrives. Baselines are
enqueued first. A failed evaluation or a dead worker fails that trial (``user_attrs["error"]``)
and the search goes on. ``resume=True`` fails trials a dead driver left RUNNING and re-runs
them, enqueues any baseline not enqueued yet, then continues to the budget. Any other exit of
the loop (a failure streak, Ctrl-C) fails the trials in flight as interrupted and enqueues
them again, so a resumed run re-runs them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from evomerge.config import JobConfig
from evomerge.fidelity import promote_multi, rung_step
from evomerge.objectives import check_objectives, objective_values
from evomerge.pool import WorkerPool
from evomerge.progress import Progress
from evomerge.recipe import Recipe
from evomerge.samplers import make_sampler
from evomerge.study import (
    closing,
    counted_trials,
    enqueue_baselines,
    fail_interrupted,
    json_metrics,
    open_study,
    requeue,
)


@dataclass
class Candidate:
    trial: optuna.trial.Trial
    recipe: Recipe
    rung: int = 0
    rungs: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.time)


def build_space(job: JobConfig) -> Any:
    from evomerge.registries import SEARCH_SPACES

    return SEARCH_SPACES.get(job.search.space.name)(job.search.space, models=job.models)


def run_search(
    job: JobConfig,
    *,
    resume: bool = False,
    address: str | None = None,
    storage_url: str | None = None,
    progress: bool = True,
    worker_class: type | None = None,
) -> optuna.Study:
    """Run (or resume) the job's search to its budget; return the study.

    ``worker_class`` replaces :class:`evomerge.worker.MergeWorker` (same methods), e.g. the
    simulated workers of ``bench/driver_overhead.py``.
    """
    check_objectives(job.objectives, job.evaluators)
    space = build_space(job)
    baselines = space.baselines()
    sampler = make_sampler(job.search.sampler, space.distributions(), baselines.get("uniform"))
    if job.toy_suite is not None:
        from evomerge.toy.build import build_suite

        build_suite(job.toy_suite.dir, size=job.toy_suite.size)
    from evomerge.preflight import preflight

    preflight(job, storage_url=storage_url, address=address)  # before Ray or any file
    study = open_study(
        job, sampler=sampler, resume=resume, storage_url=storage_url, fsync=job.storage_fsync
    )
    with closing(study):  # the run's writer lock, held until the driver is done
        if resume:
            requeue(study, fail_interrupted(study), space.distributions())
        if job.search.baselines:
            enqueue_baselines(study, baselines)
        with WorkerPool(job, address=address, worker_class=worker_class) as pool:
            _check_layer_groups(job, pool.info[0].get("num_layers"))
            Loop(job, study, space, pool, progress=progress).run()
            from evomerge.heldout import held_out_phase
            from evomerge.references import reference_phase

            held_out_phase(job, study, pool)
            reference_phase(job, study, pool)
    return study


def _check_layer_groups(job: JobConfig, num_layers: int | None) -> None:
    groups = getattr(job.search.space, "layer_groups", 1)
    if num_layers is not None and groups > num_layers:
        raise ValueError(
            f"search.space.layer_groups is {groups} but the models have {num_layers} layers; "
            f"use at most {num_layers}"
        )


class Loop:
    """The ask/tell loop over a :class:`WorkerPool`."""

    def __init__(
        self, job: JobConfig, study: optuna.Study, space: Any, pool: WorkerPool, *, progress: bool
    ) -> None:
        self.job, self.study, self.space, self.pool = job, study, space, pool
        self.dists = space.distributions()
        fid = job.search.fidelity
        self.fractions = fid.fractions if fid else (1.0,)
        self.rf = fid.reduction_factor if fid else 2
        self.signs = [1 if o.direction == "maximize" else -1 for o in job.objectives]
        self.rung_history: dict[int, list[list[float]]] = {}
        self.done = counted_trials(study)
        self.fail_streak = 0
        self.progress = Progress(
            study, total=job.search.trials, initial=self.done, enabled=progress
        )

    def run(self) -> None:
        from threadpoolctl import threadpool_limits

        # CMA-ES's eigh on a small matrix is ~50x slower on multithreaded BLAS (measured)
        with threadpool_limits(1):
            self._run()

    def _run(self) -> None:
        try:
            while True:
                self._fill()
                if not self.pool.inflight and not (self.pool.restarting and self._room()):
                    break
                out = self.pool.next_result()
                if out is not None:  # None: a restarted worker is idle again
                    self._handle(out.item, out.result, out.error)
        finally:
            self._interrupt()
            self.progress.close()

    def _room(self) -> bool:
        return self.done + len(self.pool.inflight) < self.job.search.trials

    def _fill(self) -> None:
        while self.pool.idle and self._room():
            trial = self.study.ask(self.dists)
            recipe = self.space.decode(trial.params)
            trial.set_user_attr("recipe", recipe.to_dict())
            self._submit(Candidate(trial, recipe))

    def _submit(self, cand: Candidate) -> None:
        self.pool.submit(cand, "evaluate", cand.recipe.to_json(), self.fractions[cand.rung])

    def _interrupt(self) -> None:
        """Fail the trials still in flight as interrupted and enqueue them again (this is
        the loop's exit, by an exception or not): a resumed run re-runs them."""
        numbers = {cand.trial.number for cand in self.pool.drop_inflight()}
        if numbers:
            requeue(self.study, fail_interrupted(self.study, numbers), self.dists)

    def _handle(self, cand: Candidate, result: dict[str, Any] | None, error: str | None) -> None:
        values: list[float] = []
        if result is not None:
            try:
                values = objective_values(self.job.objectives, result["metrics"])
            except (KeyError, ValueError) as err:
                error = f"{type(err).__name__}: {err}"
        if error is not None:
            return self._finish(cand, TrialState.FAIL, error=error, result=result)
        assert result is not None
        metrics = json_metrics(result["metrics"])[0]
        cand.rungs.append(
            {"fraction": self.fractions[cand.rung], "values": values, "metrics": metrics}
        )
        if cand.rung + 1 < len(self.fractions):
            if self._promote(cand, values):
                cand.rung += 1
                return self._submit(cand)
            return self._finish(cand, TrialState.PRUNED, result=result)
        self._finish(cand, TrialState.COMPLETE, values=values, result=result)

    def _promote(self, cand: Candidate, values: list[float]) -> bool:
        if len(values) == 1:
            cand.trial.report(values[0], rung_step(cand.rung, self.rf))
            return not cand.trial.should_prune()
        seen = self.rung_history.setdefault(cand.rung, [])
        keep = promote_multi(values, seen, self.signs, self.rf)
        seen.append(values)
        return keep

    def _finish(
        self,
        cand: Candidate,
        state: TrialState,
        *,
        values: list[float] | None = None,
        error: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        t = cand.trial
        if result is not None:
            metrics, nonfinite = json_metrics(result["metrics"])
            t.set_user_attr("metrics", metrics)
            if nonfinite:
                t.set_user_attr("nonfinite_metrics", nonfinite)
            t.set_user_attr(
                "timing",
                {
                    "merge_s": result["merge_s"],
                    "eval_s": result["eval_s"],
                    "wall_s": time.time() - cand.started,
                    "pid": result.get("pid"),
                },
            )
        if len(cand.rungs) > 1 or state == TrialState.PRUNED:
            t.set_user_attr("rungs", cand.rungs)
        if error is not None:
            t.set_user_attr("error", error)
        self.study.tell(t, values if state == TrialState.COMPLETE else None, state=state)
        self.done += 1
        self.fail_streak = self.fail_streak + 1 if state == TrialState.FAIL else 0
        self.progress.update(values=values, error=error)
        limit = max(3, 2 * self.pool.size)
        if self.fail_streak >= limit:
            raise RuntimeError(
                f"{self.fail_streak} trials failed in a row; stopping. Last error:\n{error}"
            )
