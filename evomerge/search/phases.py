"""PS then DFS in one job (``search.then``): two studies of one run, each resumable.

Phase 1 (study ``{name}/ps``) is the job without ``search.then``. Its winner, the best
completed trial on the fitness split (the objective values, never the held-out scores), joins
the model pool of phase 2 (study ``{name}/dfs``) as an inline ps recipe named
``search.then.winner`` (default ``ps``): phase 2 is a dfs search over it and the models
(``search.then.space.models``, default the winner, then the experts), with
``search.then``'s sampler, budget and objectives. The winner is model A by default, so phase 2
starts at it (the dfs space's ``init`` baseline) and cannot end below it on fitness.

Both phase jobs keep the job's name and run folder: they share the run's journal, and the run's
``job.yaml`` is the whole job. Each study stores its phase job (``evomerge:job``), so
``--storage URL --study NAME/dfs`` opens one alone; phase 2 also stores the winner
(``evomerge:winner``). ``--resume`` continues the phase a killed driver left: phase 2 exists
only once phase 1 has run to its end, so a run with a phase-2 study skips phase 1, and phase 2
takes the winner stored with it.

>>> search = PhasedSearch(load_job("configs/ps_dfs.yaml"))  # doctest: +SKIP
>>> study = search.run()  # the phase-2 study            # doctest: +SKIP
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from evomerge.config import JobConfig, default_dfs_models, parse_job
from evomerge.recipe import Recipe, ps_recipe
from evomerge.search.progress import OnEvent, OnProgress
from evomerge.search.storage import load_job_dict, open_storage, storage_url, study_exists

PHASES = ("ps", "dfs")
WINNER_ATTR = "evomerge:winner"


def study_name(job: JobConfig, phase: str) -> str:
    return f"{job.name}/{phase}"


def ps_job(job: JobConfig) -> JobConfig:
    """Phase 1: the job without ``search.then``, in the job's run folder."""
    data = job.model_dump(mode="json")
    data["search"].pop("then")
    data["run_dir"] = str(job.resolved_run_dir)
    return parse_job(data, source=f"phase 1 of {job.name!r}")


def dfs_job(job: JobConfig, winner: Recipe) -> JobConfig:
    """Phase 2: ``search.then`` as the search, ``winner`` among its models."""
    assert job.search.then is not None
    then = job.search.then
    data = job.model_dump(mode="json")
    phase = data["search"].pop("then")
    objectives = phase.pop("objectives") or data["objectives"]
    name = phase.pop("winner")
    space = phase["space"]
    space["recipes"] = {**space["recipes"], name: winner.to_dict()}
    space["models"] = list(default_dfs_models(then.space, job.models, winner=name))
    phase["trial_timeout"] = data["search"].get("trial_timeout")  # the job's, for both phases
    data.update(search=phase, objectives=objectives, run_dir=str(job.resolved_run_dir))
    return parse_job(data, source=f"phase 2 of {job.name!r}")


def pick_winner(study: optuna.Study) -> tuple[FrozenTrial, Recipe]:
    """The best trial of phase 1 by its (fitness-split) objective value among those that
    compete for best (:func:`~evomerge.search.fidelity.contenders`: the confirmed ones when
    phase 1 confirmed its subset estimates); ties go to the lower trial number."""
    from evomerge.search.fidelity import best_contender

    best = best_contender(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                          study.direction == optuna.study.StudyDirection.MAXIMIZE)
    if best is None:
        raise RuntimeError(
            f"phase 1 (study {study.study_name!r}) has no completed trial, so there is no "
            "winner for phase 2; see `evomerge results` for the errors, fix them and --resume"
        )
    return best, ps_recipe(Recipe.from_dict(best.user_attrs["recipe"]), user="phase 2",
                           fix="phase 1 must be a ps search over model folders")


def _read_study(job: JobConfig, url: str | None, name: str) -> optuna.Study | None:
    """Study ``name`` of the run, read-only, or None; a missing journal is not created."""
    full = storage_url(url or job.storage, job.resolved_run_dir)
    if full.startswith("journal:") and not Path(full.removeprefix("journal:")).is_file():
        return None
    storage = open_storage(full, job.resolved_run_dir)
    if not study_exists(storage, name):
        return None
    return optuna.load_study(study_name=name, storage=storage, sampler=None)


def stored_job(study: optuna.Study) -> JobConfig:
    """The (phase) job a study was run with."""
    return parse_job(load_job_dict(study), source=f"the job stored in study {study.study_name!r}")


def stored_winner(job: JobConfig, study: optuna.Study) -> Recipe:
    """The winner a phase-2 study was started with (its stored job)."""
    assert job.search.then is not None
    space = load_job_dict(study)["search"]["space"]
    winner = Recipe.from_dict(space["recipes"][job.search.then.winner])
    return ps_recipe(winner, user="phase 2", fix="the stored winner must be over model folders")


class PhasedSearch:
    """A ``search.then`` job as :class:`~evomerge.search.driver.Search` runs one: the same
    ``prepare`` / ``run`` / ``stop`` / ``close``; ``run`` returns the last phase's study, and
    :attr:`phase` names the phase prepared or running."""

    def __init__(
        self,
        job: JobConfig,
        *,
        resume: bool = False,
        address: str | None = None,
        storage_url: str | None = None,
        worker_class: type | None = None,
    ) -> None:
        if job.search.then is None:
            raise ValueError("PhasedSearch runs a job with search.then; use Search for others")
        self.job, self.resume = job, resume
        self._kw: dict[str, Any] = dict(
            address=address, storage_url=storage_url, worker_class=worker_class
        )
        self.current: Any = None  # the Search of the phase prepared or running
        self.stopped = False
        self._stop = threading.Event()

    @property
    def phase(self) -> str | None:
        return None if self.current is None else self.current.phase

    @property
    def study(self) -> optuna.Study | None:
        return None if self.current is None else self.current.study

    def prepare(self) -> optuna.Study:
        """Prepare phase 1, or phase 2 when a resumed run already has it; write ``job.yaml``."""
        if self.current is not None:
            return self.current.study
        done = self._stored_dfs() if self.resume else None
        if done is not None:
            search = self._dfs_search(stored_winner(self.job, done), resume=True)
        else:
            search = self._search(ps_job(self.job), "ps", resume=self.resume)
        self._set(search)
        study = search.prepare()
        run_dir = self.job.resolved_run_dir
        (run_dir / "job.yaml").write_text(
            yaml.safe_dump(self.job.model_dump(mode="json"), sort_keys=False)
        )
        return study

    def run(
        self, *, on_event: OnEvent | None = None, stop: threading.Event | None = None,
        on_progress: OnProgress | None = None,
    ) -> optuna.Study:
        """Run the phase prepared, then phase 2 after phase 1, on one Ray (started here
        unless one runs already, and shut down at the end); return the last phase's study."""
        from evomerge.search.ray_cluster import start_ray

        self.prepare()
        own = start_ray(self._kw["address"] or self.job.resources.address, on_progress)
        try:
            return self._run(on_event, stop, on_progress)
        finally:
            if own:
                import ray

                ray.shutdown()

    def _run(self, on_event: OnEvent | None, stop: threading.Event | None,
             on_progress: OnProgress | None) -> optuna.Study:
        study = self.current.run(on_event=on_event, stop=stop, on_progress=on_progress)
        if self.current.stopped or self.current.phase == "dfs":
            self.stopped = self.current.stopped
            return study
        best, winner = pick_winner(study)
        self._set(self._dfs_search(winner, resume=self.resume))
        phase2 = self.current.prepare()
        phase2.set_user_attr(WINNER_ATTR, {
            "study": study.study_name, "trial": best.number, "values": best.values,
            "recipe": winner.to_dict(),
        })
        study = self.current.run(on_event=on_event, stop=stop, on_progress=on_progress)
        self.stopped = self.current.stopped
        return study

    def stop(self) -> None:
        """Stop the running phase at its next tell (phase 2 does not start after a stop)."""
        self._stop.set()
        if self.current is not None:
            self.current.stop()

    def close(self) -> None:
        if self.current is not None:
            self.current.close()

    # -- the phases ---------------------------------------------------------------------------
    def _set(self, search: Any) -> None:
        self.current = search
        if self._stop.is_set():
            search.stop()

    def _search(self, job: JobConfig, phase: str, *, resume: bool) -> Any:
        from evomerge.search.driver import Search

        return Search(job, resume=resume, phase=phase, **self._kw)

    def _dfs_search(self, winner: Recipe, *, resume: bool) -> Any:
        return self._search(dfs_job(self.job, winner), "dfs", resume=resume)

    def _stored_dfs(self) -> optuna.Study | None:
        return _read_study(self.job, self._kw["storage_url"], study_name(self.job, "dfs"))
