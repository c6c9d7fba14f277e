"""The search driver: one process owns the study; Ray workers map Recipe -> metrics.

Ask as many trials as there are idle workers, tell each result as it arrives. Baselines are
enqueued first. A failed evaluation or a dead worker fails that trial (``user_attrs["error"]``)
and the search goes on. ``resume=True`` fails trials a dead driver left RUNNING and re-runs
them, enqueues any baseline not enqueued yet, then continues to the budget. Any other exit of
the loop (a stop, a failure streak, Ctrl-C) fails the trials in flight as interrupted and
enqueues them again, so a resumed run re-runs them (the loop is :mod:`evomerge.search.loop`).
After the budget, a subset search with ``confirm: K`` re-scores its top K trials on the whole
fitness split (:func:`evomerge.search.fidelity.confirm_phase`), then the held-out and
reference phases run.

:class:`Search` is the search a caller drives (a service, a notebook): it reports
:mod:`evomerge.search.progress` events to a callback and stops cleanly when asked;
:func:`run_search` runs one to its end with the progress bar.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import optuna

from evomerge.config import JobConfig
from evomerge.search.loop import Loop
from evomerge.search.objectives import check_objectives
from evomerge.search.pool import WorkerPool
from evomerge.search.progress import (
    OnEvent,
    OnProgress,
    PhaseFinished,
    PhaseStarted,
    ProgressBar,
    Stopped,
    ignore,
)
from evomerge.search.samplers import make_sampler
from evomerge.search.study import (
    close_study,
    closing,
    counted_trials,
    enqueue_baselines,
    fail_interrupted,
    open_study,
    requeue,
)


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
    mirror: bool = True,
) -> optuna.Study:
    """Run (or resume) the job's search to its budget and return the study, showing its
    progress: tqdm bars when stderr is a terminal, else (or with ``progress=False``) one log
    line per phase on stderr.

    ``worker_class`` replaces :class:`evomerge.search.worker.MergeWorker` (same methods), e.g. the
    simulated workers of ``bench/driver_overhead.py``; ``mirror=False`` drives the study in the
    storage itself with no trial asked ahead (the driver before :mod:`evomerge.search.mirror`,
    for that benchmark's *before* rows).
    """
    from evomerge.search.phases import PhasedSearch  # a search.then job: two studies

    kind = Search if job.search.then is None else PhasedSearch
    extra: dict[str, Any] = {} if mirror else {"mirror": False}  # PhasedSearch always mirrors
    search: Any = kind(
        job, resume=resume, address=address, storage_url=storage_url, worker_class=worker_class,
        **extra,
    )
    bar = ProgressBar(job.name, bars=None if progress else False)
    try:
        return search.run(on_event=bar, on_progress=bar)
    finally:
        bar.close()


class Search:
    """One search run that a caller drives: start it from any thread, watch it, stop it.

    :meth:`prepare` checks the job and opens the study (no Ray); :meth:`run` starts the
    workers, runs the ask/tell loop and the post-search phases, and passes each
    :mod:`evomerge.search.progress` event to ``on_event``. :meth:`stop` (or setting ``stop``) ends
    the run at its next tell: the trials in flight are failed as interrupted and enqueued again,
    the phases left are skipped, and ``Search(job, resume=True).run()`` continues to the
    budget. Example::

        search = Search(job)
        search.prepare()  # a bad job fails here, before any worker starts
        thread = threading.Thread(target=search.run, kwargs={"on_event": print})
        thread.start()
        ...
        search.stop()
        thread.join()
    """

    def __init__(
        self,
        job: JobConfig,
        *,
        resume: bool = False,
        address: str | None = None,
        storage_url: str | None = None,
        worker_class: type | None = None,
        phase: str | None = None,
        mirror: bool = True,
    ) -> None:
        self.job, self.resume, self.address = job, resume, address
        self.mirror = mirror  # False: no in-memory study, no ask-ahead (benchmarks only)
        self.phase = phase  # a phase of a search.then job: study {name}/{phase}
        self.storage_url, self.worker_class = storage_url, worker_class
        self.study: optuna.Study | None = None
        self.stopped = False  # True once a run ended by a stop
        self._stop = threading.Event()
        self._used: str | None = None  # why run() may not start: "has run", "was closed"

    def prepare(self) -> optuna.Study:
        """Check the job, build its toy suite, preflight it and open the study, holding the
        run's writer lock until :meth:`run` ends (or :meth:`close`); starts no Ray. A resumed
        run fails the trials a dead driver left RUNNING and enqueues them again. Idempotent."""
        if self.study is not None:
            return self.study
        job = self.job
        if job.search.then is not None:
            raise ValueError("a job with search.then runs in two phases: use "
                             "evomerge.search.phases.PhasedSearch (run_search does)")
        check_objectives(job.objectives, job.evaluators)
        if job.toy_suite is not None and job.search.space.name == "dfs":
            from evomerge.toy.build import build_suite  # the dfs space reads layer counts

            build_suite(job.toy_suite.dir, size=job.toy_suite.size)
        self.space = build_space(job)
        baselines = self.space.baselines()
        dists = self.space.distributions()
        start = self.space.start() if hasattr(self.space, "start") else baselines.get("uniform")
        adamerging = getattr(job.search.sampler, "start", None) == "adamerging"
        if adamerging:
            from evomerge.search.start import check_start

            check_start(job)  # before the models load; the point comes once the study is open
            start = None
        sampler = make_sampler(job.search.sampler, dists, start)
        if job.toy_suite is not None:
            from evomerge.toy.build import build_suite

            build_suite(job.toy_suite.dir, size=job.toy_suite.size)
        from evomerge.search.preflight import preflight

        preflight(job, storage_url=self.storage_url, address=self.address)  # before any file
        study = open_study(
            job, sampler=sampler, resume=self.resume, storage_url=self.storage_url,
            fsync=job.storage_fsync, phase=self.phase, mirror=self.mirror,
        )
        try:
            if self.resume:
                requeue(study, fail_interrupted(study), dists)
            if adamerging:  # stored in the study: a resumed run does not learn it again
                from evomerge.search.start import adamerging_start

                point = adamerging_start(job, study, self.space)
                study.sampler = make_sampler(job.search.sampler, dists, point)
                enqueue_baselines(study, {"adamerging": point})
            if job.search.baselines:
                enqueue_baselines(study, baselines)
        except BaseException:
            close_study(study)
            raise
        self.study = study
        return study

    def stop(self) -> None:
        """Ask the run to stop at its next tell; safe from any thread, before or during it."""
        self._stop.set()

    def close(self) -> None:
        """Release the writer lock of a study :meth:`prepare` opened, without running it."""
        if self.study is not None and self._used is None:
            close_study(self.study)
        self._used = self._used or "was closed"

    def run(
        self, *, on_event: OnEvent | None = None, stop: threading.Event | None = None,
        on_progress: OnProgress | None = None,
    ) -> optuna.Study:
        """Run the search to its budget, or until stopped; return the study.

        ``on_event`` gets every event in this thread (an exception in it stops the search like
        any other error); ``stop`` is a flag to honour besides :meth:`stop`; ``on_progress``
        gets the :class:`~evomerge.search.progress.Progress` of the slow steps (Ray start,
        workers ready, held-out and reference evaluations).
        """
        if self._used is not None:
            raise RuntimeError(
                f"this Search {self._used}; continue the study with Search(job, resume=True)"
            )
        self._used = "has run"
        emit = on_event or ignore

        def stopping() -> bool:
            return self._stop.is_set() or (stop is not None and stop.is_set())

        study = self.prepare()
        with closing(study):  # the run's writer lock, held until the driver is done
            phase = "search" if stopping() else self._phases(study, emit, stopping, on_progress)
        if phase is not None:
            self.stopped = True
            emit(Stopped(phase, counted_trials(study), self.job.search.trials))
        return study

    def _phases(
        self, study: optuna.Study, emit: OnEvent, stopping: Callable[[], bool],
        on_progress: OnProgress | None = None,
    ) -> str | None:
        """Start the workers, run each phase; the phase a stop skipped or cut short."""
        from evomerge.search.fidelity import confirm_k, confirm_phase
        from evomerge.search.heldout import held_out_phase
        from evomerge.search.references import reference_phase

        job, budget = self.job, self.job.search.trials
        if self.resume and _nothing_left(job, study):  # a finished run: no Ray, no workers
            return None
        with WorkerPool(job, address=self.address, worker_class=self.worker_class,
                        on_progress=on_progress) as pool:
            _check_layer_groups(job, pool.info[0].get("num_layers"))
            study.set_user_attr("evomerge:workers", pool.info)  # pid, node and host of each
            loop = Loop(job, study, self.space, pool, on_event=emit, stop=stopping)
            loop.ask_ahead = loop.ask_ahead if self.mirror else 0
            phases: dict[str, Callable[[], Any]] = {"search": loop.run}
            if confirm_k(job):  # the top subset trials re-scored in full, before held-out
                phases["confirm"] = lambda: confirm_phase(job, study, pool, on_progress)
            phases["held_out"] = lambda: held_out_phase(job, study, pool, on_progress)
            phases["reference"] = lambda: reference_phase(job, study, pool, on_progress)
            for name, phase in phases.items():
                if stopping():
                    return name
                emit(PhaseStarted(name, loop.done, budget))
                phase()
                if loop.stopped and name == "search":
                    return name
                emit(PhaseFinished(name, loop.done, budget))
            # again at the end: the workers' peak memory after the search
            study.set_user_attr("evomerge:workers", pool.refresh_info())
        return None


def _nothing_left(job: JobConfig, study: optuna.Study) -> bool:
    """The budget is met, the confirmations are scored and every held-out and reference score
    the phases would compute is stored without an error: resuming this run has nothing to
    evaluate."""
    from evomerge.search.fidelity import confirm_k, to_confirm
    from evomerge.search.heldout import chosen_trials, stored_held_out
    from evomerge.search.references import _scored, reference_recipes, stored_references
    from evomerge.search.worker import has_held_out

    if counted_trials(study) < job.search.trials:
        return False
    maximize = study.directions[0].name == "MAXIMIZE"
    if confirm_k(job) and to_confirm(study.get_trials(deepcopy=False), confirm_k(job),
                                     maximize=maximize):
        return False
    if job.search.held_out_top_k == 0:
        return True
    held_out = any(has_held_out(e) for e in job.evaluators)
    if held_out:
        stored = stored_held_out(study)
        chosen = chosen_trials(job, study)
        if any("error" in stored.get(t.number, {"error": None}) for t in chosen):
            return False
    parts = {"metrics": "evaluate", **({"held_out": "evaluate_held_out"} if held_out else {})}
    refs = stored_references(study)
    return all(_scored(refs.get(name), parts) for name in reference_recipes(job))


def _check_layer_groups(job: JobConfig, num_layers: int | None) -> None:
    groups = getattr(job.search.space, "layer_groups", 1)
    if num_layers is not None and groups > num_layers:
        raise ValueError(
            f"search.space.layer_groups is {groups} but the models have {num_layers} layers; "
            f"use at most {num_layers}"
        )
