"""The ask/tell loop over a :class:`~evomerge.search.pool.WorkerPool` (driver side).

Ask as many trials as there are idle workers, tell each result as it arrives, promote or prune
by rung under multi-fidelity. With many workers a few trials are asked ahead while all workers
are busy (:func:`ask_ahead`), so a freed worker gets its next trial at once. Every exit of the
loop (the budget met, a stop, a failure streak, Ctrl-C) fails the trials still in flight or
asked ahead as interrupted and enqueues them again.

The study is the driver's in-memory copy (:mod:`evomerge.search.mirror`): asks and tells cost
no storage round trip.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from evomerge.config import JobConfig
from evomerge.recipe import Recipe
from evomerge.search.anchors import (
    ON_SUBSET_ATTR,
    PER_EXAMPLE_ATTR,
    SUBSET_ATTR,
    WARMUP_ATTR,
    SubsetPolicy,
)
from evomerge.search.fidelity import promote_multi, rung_step
from evomerge.search.objectives import objective_values
from evomerge.search.pool import WorkerPool
from evomerge.search.progress import OnEvent, Tracker, ignore
from evomerge.search.rank_fidelity import (
    PROBE_ATTR,
    STUDY_ATTR,
    AutoFidelity,
    Plan,
    rung_scores,
    stored_probes,
)
from evomerge.search.study import counted_trials, fail_interrupted, json_metrics, requeue

STOP_POLL_S = 0.5  # how often a waiting loop looks at its stop flag


def _auto_fidelity(job: JobConfig, study: optuna.Study) -> AutoFidelity | None:
    """The ``fidelity: auto`` policy, replayed over the probes a resumed run already scored."""
    fid = job.search.fidelity
    if fid is None or fid.mode != "auto":
        return None
    return AutoFidelity.replay(
        stored_probes(study.get_trials(deepcopy=False)),
        fractions=fid.fractions,
        threshold=fid.threshold,
        warmup=fid.warmup,
        recheck_every=fid.recheck_every,
    )


def _subset_policy(job: JobConfig, study: optuna.Study) -> SubsetPolicy | None:
    """The ``search.fidelity.subset`` policy: the stored subset, or the stored warm-up."""
    fid = job.search.fidelity
    if fid is None or fid.subset is None:
        return None
    return SubsetPolicy.from_study(
        fid.subset, lambda metrics: objective_values(job.objectives, metrics),
        study.get_trials(deepcopy=False), study.user_attrs.get(SUBSET_ATTR),
    )


def ask_ahead(job: JobConfig, workers: int) -> int:
    """How many trials to ask before a worker frees: one per 8 workers, at most 16; none under
    8 workers (the asks fit between results) or for TPE and GP, whose every ask should see every
    result so far (CMA-ES and NSGA-II sample a whole generation from one state anyway)."""
    if workers < 8 or job.search.sampler.name in ("tpe", "gp"):
        return 0
    return min(16, workers // 8)


@dataclass
class Candidate:
    trial: optuna.trial.Trial
    recipe: Recipe
    rung: int = 0
    rungs: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    submitted: float = 0.0  # when its last call was handed to a worker
    fractions: tuple[float, ...] = (1.0,)  # its rungs (fidelity: auto plans them per candidate)
    probe: bool = False  # fidelity: auto: scored at every fraction, never pruned
    per_example: bool = False  # fidelity subset warm-up: scored in full, per-example scores
    subset: dict[str, Any] | None = None  # fidelity subset: label -> {indices, weights}


class Loop:
    """The ask/tell loop over a :class:`WorkerPool`: ``on_event`` gets a
    :class:`~evomerge.search.progress.TrialFinished` per tell; ``stop`` is checked between
    tells."""

    def __init__(
        self,
        job: JobConfig,
        study: optuna.Study,
        space: Any,
        pool: WorkerPool,
        *,
        on_event: OnEvent | None = None,
        stop: Callable[[], bool] | None = None,
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
        self.tracker = Tracker(study, budget=job.search.trials, done=self.done)
        self.on_event = on_event or ignore
        self.stop = stop or (lambda: False)
        self.stopped = False  # the loop ended by ``stop``, not by the budget
        self.ahead: deque[Candidate] = deque()  # asked, waiting for a worker to free
        self.ask_ahead = ask_ahead(job, pool.size)
        self.auto = _auto_fidelity(job, study)
        self.subsets = _subset_policy(job, study)
        drawn = self.subsets.up_front(getattr(pool, "info", None)) if self.subsets else None
        if drawn is not None:  # warmup: 0, before the first trial
            study.set_user_attr(SUBSET_ATTR, drawn)

    def run(self) -> None:
        from threadpoolctl import threadpool_limits

        # CMA-ES's eigh on a small matrix is ~50x slower on multithreaded BLAS (measured)
        with threadpool_limits(1):
            self._run()

    def _run(self) -> None:
        try:
            while not self.stop():
                self._fill()
                waiting = self._room() or self.ahead  # work for a worker that comes back
                if not self.pool.inflight and not (self.pool.restarting and waiting):
                    return
                # wake up now and then, so a stop does not wait for a long evaluation
                early = self._want_ahead()  # no result yet: ask one ahead, then look again
                out = self.pool.next_result(timeout=0 if early else STOP_POLL_S)
                if out is not None:  # None: a restarted worker is idle again, or no news yet
                    self._handle(out.item, out.result, out.error)
                elif early:
                    self._ask_one(self.ahead.append)
            self.stopped = self.done < self.job.search.trials  # not when the budget was met
        finally:
            self._interrupt()

    def _room(self) -> bool:
        return self.done + len(self.pool.inflight) + len(self.ahead) < self.job.search.trials

    def _want_ahead(self) -> bool:
        return len(self.ahead) < self.ask_ahead and not self.pool.idle and self._room()

    def _fill(self) -> None:
        while self.pool.idle and (self.ahead or self._room()):
            if self.ahead:
                self._submit(self.ahead.popleft())
            else:
                self._ask_one(self._submit)

    def _ask_one(self, then: Callable[[Candidate], None]) -> None:
        """Ask one trial and pass its candidate to ``then`` (or fail it: no candidate)."""
        from evomerge.search_spaces.dfs import InvalidCandidate

        trial = self.study.ask(self.dists)
        try:
            recipe = self.space.decode(trial.params)
        except InvalidCandidate as err:  # no model to evaluate: a failed trial, with why
            return self._reject(trial, f"{type(err).__name__}: {err}")
        trial.set_user_attr("recipe", recipe.to_dict())
        plan = self.auto.plan() if self.auto else Plan(tuple(self.fractions), probe=False)
        if plan.probe:
            trial.set_user_attr(PROBE_ATTR, True)
        cand = Candidate(trial, recipe, fractions=plan.rungs, probe=plan.probe)
        if self.subsets is not None:  # the warm-up in full, then the chosen subset
            cand.subset = self.subsets.subset
            cand.per_example = cand.subset is None
            trial.set_user_attr(*((WARMUP_ATTR, True) if cand.per_example else
                                  (ON_SUBSET_ATTR, self.subsets.state["method"])))  # type: ignore[index]
        then(cand)

    def _reject(self, trial: optuna.trial.Trial, error: str) -> None:
        """Fail a point that decodes to no candidate; it does not count toward the failure
        streak, which is about broken workers and evaluators."""
        trial.set_user_attr("error", error)
        self.study.tell(trial, state=TrialState.FAIL)
        self.done += 1
        self.on_event(self.tracker.finished(trial.number, TrialState.FAIL, None, error,
                                            done=self.done))

    def _submit(self, cand: Candidate) -> None:
        cand.submitted = time.time()
        extra = (cand.subset, True) if cand.per_example else (cand.subset,) if cand.subset else ()
        self.pool.submit(cand, "evaluate", cand.recipe.to_json(), cand.fractions[cand.rung],
                         *extra)

    def _interrupt(self) -> None:
        """Fail the trials still in flight or asked ahead as interrupted and enqueue them
        again (this is the loop's exit, by an exception or not): a resumed run re-runs them."""
        numbers = {cand.trial.number for cand in [*self.pool.drop_inflight(), *self.ahead]}
        self.ahead.clear()
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
            {"fraction": cand.fractions[cand.rung], "values": values, "metrics": metrics}
        )
        if cand.rung + 1 < len(cand.fractions):
            if cand.probe or self._promote(cand, values):
                cand.rung += 1
                return self._submit(cand)
            return self._finish(cand, TrialState.PRUNED, result=result)
        self._finish(cand, TrialState.COMPLETE, values=values, result=result)

    def _promote(self, cand: Candidate, values: list[float]) -> bool:
        """Successive halving at the candidate's rung, keyed by its fraction's place among the
        job's fractions (with fidelity: auto the cheap rung may change during the search)."""
        level = list(self.fractions).index(cand.fractions[cand.rung])
        if len(values) == 1:
            cand.trial.report(values[0], rung_step(level, self.rf))
            return not cand.trial.should_prune()
        seen = self.rung_history.setdefault(level, [])
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
            if result.get("per_example"):
                t.set_user_attr(PER_EXAMPLE_ATTR, result["per_example"])
            t.set_user_attr(
                "timing",
                {
                    "merge_s": result["merge_s"],
                    "eval_s": result["eval_s"],
                    "wall_s": time.time() - cand.started,
                    # from the ask (or a promotion) to the worker starting the call
                    "queue_s": max(0.0, result.get("started", cand.submitted) - cand.submitted),
                    "pid": result.get("pid"),
                    # the worker's memory after this trial, and its peak so far
                    "rss_mb": result.get("rss_mb"),
                    "peak_rss_mb": result.get("peak_rss_mb"),
                },
            )
        if len(cand.rungs) > 1 or (cand.rungs and state != TrialState.COMPLETE):
            t.set_user_attr("rungs", cand.rungs)  # a failed promotion keeps its cheap rung's cost
        if error is not None:
            t.set_user_attr("error", error)
        self.study.tell(t, values if state == TrialState.COMPLETE else None, state=state)
        if self.auto is not None and cand.probe and state == TrialState.COMPLETE:
            self.auto.observe(rung_scores(cand.rungs))
            self.study.set_user_attr(
                STUDY_ATTR, {"fraction": self.auto.fraction, "history": self.auto.history}
            )
        if self.subsets is not None and cand.per_example and state == TrialState.COMPLETE:
            assert result is not None
            if self.subsets.observe(t.number, result.get("per_example") or {},
                                    json_metrics(result["metrics"])[0]):
                self.study.set_user_attr(SUBSET_ATTR, self.subsets.state)
        self.done += 1
        self.fail_streak = self.fail_streak + 1 if state == TrialState.FAIL else 0
        worker = None if result is None else result.get("pid")
        marks = {ON_SUBSET_ATTR: True} if cand.subset and not cand.per_example else {}
        self.on_event(self.tracker.finished(t.number, state, values, error, done=self.done,
                                            worker=worker, attrs=marks))
        limit = max(3, 2 * self.pool.size)
        if self.fail_streak >= limit:
            raise RuntimeError(
                f"{self.fail_streak} trials failed in a row; stopping. Last error:\n{error}"
            )
