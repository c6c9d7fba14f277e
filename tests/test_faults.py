"""Fault injection: workers that die or fail in each phase of a search, and kills that leave a
half-written study. Real Ray actors, real journal files, the tiny search suite.

A worker is killed from inside (``os._exit``) by a :class:`MergeWorker` subclass passed as
``worker_class``; a marker file made with ``O_EXCL`` makes it happen once across restarts.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from evomerge.config import parse_job
from evomerge.recipe import Recipe
from evomerge.search.driver import build_space, run_search
from evomerge.search.heldout import stored_held_out
from evomerge.search.references import stored_references
from evomerge.search.study import INTERRUPTED, close_study, counted_trials, open_study
from evomerge.search.worker import MergeWorker
from tests.test_search import job_dict

pytestmark = pytest.mark.slow  # real searches on a Ray cluster: the full lane


def first(marker: Path) -> bool:
    """True for the first caller only, in any process (the marker records when)."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(time.time()).encode())
    os.close(fd)
    return True


def dying_worker(marker: Path, *, method: str, recipe_method: str | None = None) -> type:
    """A MergeWorker whose first ``method`` call (on a recipe of ``recipe_method``) kills it."""

    class Dying(MergeWorker):
        def _die(self, recipe_json: str) -> None:
            wanted = recipe_method is None or Recipe.from_json(recipe_json).method == recipe_method
            if wanted and first(marker):
                os._exit(1)

        def evaluate(self, recipe_json: str, fraction: float = 1.0) -> dict[str, Any]:
            if method == "evaluate":
                self._die(recipe_json)
            return super().evaluate(recipe_json, fraction)

        def evaluate_held_out(self, recipe_json: str) -> dict[str, Any]:
            if method == "evaluate_held_out":
                self._die(recipe_json)
            return super().evaluate_held_out(recipe_json)

    return Dying


class HeldOutFails(MergeWorker):
    def evaluate_held_out(self, recipe_json: str) -> dict[str, Any]:
        raise ValueError("held-out data unreadable")


class AlwaysFails(MergeWorker):
    def evaluate(self, recipe_json: str, fraction: float = 1.0) -> dict[str, Any]:
        raise ValueError("merge exploded")


class WithNaN(MergeWorker):
    def _run(self, recipe_json: str, evaluators: list[Any], fraction: float,
             *args: Any, **kw: Any) -> dict[str, Any]:
        out = super()._run(recipe_json, evaluators, fraction, *args, **kw)
        out["metrics"]["extra/nan"] = math.nan
        out["metrics"]["extra/inf"] = math.inf
        return out


def small_job(suite, tmp_path, **search):
    return parse_job(job_dict(suite, tmp_path / "run", **{"trials": 4, **search}))


def test_worker_killed_in_reference_pass_is_retried(ray_local, search_suite, tmp_path):
    job = small_job(search_suite, tmp_path, held_out_top_k=1)
    cls = dying_worker(tmp_path / "died", method="evaluate", recipe_method="task_arithmetic")
    study = run_search(job, progress=False, worker_class=cls)
    assert (tmp_path / "died").exists()  # the reference's fitness call did kill a worker
    ref = stored_references(study)["uniform_task_arithmetic"]
    assert "error" not in ref["metrics"] and "error" not in ref["held_out"]
    assert ref["metrics"].keys() == ref["held_out"].keys()


def test_worker_killed_in_held_out_pass_is_retried(ray_local, search_suite, tmp_path):
    job = small_job(search_suite, tmp_path, held_out_top_k=1)
    cls = dying_worker(tmp_path / "died", method="evaluate_held_out")
    study = run_search(job, progress=False, worker_class=cls)
    assert (tmp_path / "died").exists()
    held = stored_held_out(study)
    assert held and all("metrics" in e and "error" not in e for e in held.values()), held


def test_stored_errors_are_retried_on_resume(ray_local, search_suite, tmp_path):
    job = small_job(search_suite, tmp_path, held_out_top_k=1)
    study = run_search(job, progress=False, worker_class=HeldOutFails)
    held = stored_held_out(study)
    assert held and all("unreadable" in e["error"] for e in held.values())
    assert "unreadable" in stored_references(study)["uniform_task_arithmetic"]["held_out"]["error"]

    study = run_search(job, resume=True, progress=False)
    again = stored_held_out(study)
    assert again.keys() == held.keys()
    assert all("error" not in e and e["metrics"] for e in again.values()), again
    ref = stored_references(study)["uniform_task_arithmetic"]
    assert "error" not in ref["held_out"] and "error" not in ref["metrics"]


def restart_slowly(died: Path, ready: Path) -> type:
    """Dies on the first evaluate anywhere; the restarted actor sleeps 3 s more in __init__.
    While it restarts, the healthy worker serves 6 evaluations (0.5 s each), then waits for it
    (so the budget cannot run out before it rejoins)."""

    class SlowRestart(MergeWorker):
        def __init__(self, job_json: str) -> None:
            if died.exists():
                time.sleep(3)
            super().__init__(job_json)
            self.served_alone = 0
            if died.exists():
                ready.write_text(str(time.time()))

        def evaluate(self, recipe_json: str, fraction: float = 1.0) -> dict[str, Any]:
            if first(died):
                os._exit(1)
            if not ready.exists():
                self.served_alone += 1
                deadline = time.time() + 120
                while self.served_alone > 6 and not ready.exists() and time.time() < deadline:
                    time.sleep(0.05)
            time.sleep(0.5)
            return super().evaluate(recipe_json, fraction)

    return SlowRestart


def test_restarting_worker_does_not_stall_the_others(ray_local, search_suite, tmp_path):
    job = small_job(
        search_suite,
        tmp_path,
        trials=16,
        held_out_top_k=0,
        baselines=False,
        sampler={"name": "random", "seed": 0},
    )
    died, ready = tmp_path / "died", tmp_path / "ready"
    study = run_search(job, progress=False, worker_class=restart_slowly(died, ready))
    t_died, t_ready = float(died.read_text()), float(ready.read_text())
    assert t_ready - t_died > 3
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1 and "worker died" in failed[0].user_attrs["error"]
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert counted_trials(study) == 16 and len(done) == 15
    t_told = failed[0].datetime_complete.timestamp()  # when the driver saw the death
    assert t_told < t_ready
    told_alone = [t for t in done if t_told < t.datetime_complete.timestamp() < t_ready]
    assert len(told_alone) >= 3, "the healthy worker was not fed while the other restarted"
    assert len({t.user_attrs["timing"]["pid"] for t in told_alone}) == 1
    late = {t.user_attrs["timing"]["pid"] for t in done if t not in told_alone}
    assert len(late) == 2, late  # the restarted worker (a new pid) rejoined: its ping answered


def test_resume_enqueues_baselines_missing_after_a_kill(ray_local, search_suite, tmp_path):
    job = small_job(search_suite, tmp_path, trials=6, held_out_top_k=0)
    names = list(build_space(job).baselines())
    assert len(names) >= 3
    # the state a kill inside the enqueue loop leaves: the first baseline enqueued, no other
    study = open_study(job, sampler=optuna.samplers.RandomSampler(), resume=False)
    first_params = build_space(job).baselines()[names[0]]
    study.enqueue_trial(first_params, user_attrs={"baseline": names[0]})
    close_study(study)

    study = run_search(job, resume=True, progress=False)
    got = [t.user_attrs.get("baseline") for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert sorted(b for b in got if b) == sorted(names)
    assert counted_trials(study) == 6


def test_failure_streak_fails_inflight_trials_as_interrupted(ray_local, search_suite, tmp_path):
    job = small_job(
        search_suite,
        tmp_path,
        trials=8,
        held_out_top_k=0,
        baselines=False,
        sampler={"name": "random", "seed": 0},
    )
    with pytest.raises(RuntimeError) as info:
        run_search(job, progress=False, worker_class=AlwaysFails)
    head, last = str(info.value).split("\n")
    assert head == "4 trials failed in a row; stopping. Last error:"
    assert last == "ValueError: merge exploded"
    study = optuna.load_study(study_name=job.name, storage=journal(tmp_path))
    assert not study.get_trials(states=(TrialState.RUNNING,))
    cut = [t for t in study.trials if t.user_attrs.get(INTERRUPTED)]
    assert len(cut) == 1 and cut[0].state == TrialState.FAIL

    study = run_search(job, resume=True, progress=False)
    assert counted_trials(study) == 8
    done = study.get_trials(states=(TrialState.COMPLETE,))
    rerun = [t for t in done if t.params == cut[0].params]
    assert len(rerun) == 1  # resumed: the interrupted trial ran again with its parameters


def test_non_finite_metrics_are_stored_as_null(ray_local, search_suite, tmp_path):
    job = small_job(search_suite, tmp_path, trials=3, held_out_top_k=1)
    study = run_search(job, progress=False, worker_class=WithNaN)
    text = (tmp_path / "run" / "study.journal").read_text()

    def refuse(name: str) -> None:
        raise ValueError(f"{name} in the journal")

    for line in text.splitlines():
        json.loads(line, parse_constant=refuse)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 3, [t.user_attrs.get("error") for t in study.trials]
    for t in done:
        assert t.user_attrs["metrics"]["extra/nan"] is None
        assert t.user_attrs["nonfinite_metrics"] == ["extra/inf", "extra/nan"]
    held = stored_held_out(study)
    assert held and all(e["metrics"]["extra/nan"] is None for e in held.values())
    ref = stored_references(study)["uniform_task_arithmetic"]
    assert ref["metrics"]["extra/inf"] is None and ref["held_out"]["extra/nan"] is None


def journal(tmp_path: Path) -> optuna.storages.BaseStorage:
    return optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "run" / "study.journal"))
    )


def held_until_killed(busy: Path, served: Path) -> type:
    """Its first evaluate anywhere writes ``busy`` = ``{pid, recipe}`` and sleeps until the
    test SIGKILLs that pid. The restarted actor writes ``served`` at its first evaluate; until
    then the healthy worker serves 3 calls alone, then waits for it (so the budget does not
    run out before the restarted worker serves)."""

    class HeldUntilKilled(MergeWorker):
        def __init__(self, job_json: str) -> None:
            super().__init__(job_json)
            self.served_alone = 0
            self.restarted = busy.exists()

        def evaluate(self, recipe_json: str, fraction: float = 1.0) -> dict[str, Any]:
            if first(busy.with_suffix(".claimed")):
                busy.write_text(json.dumps({"pid": os.getpid(), "recipe": recipe_json}))
                time.sleep(300)  # the test kills this process long before
            if self.restarted:
                served.touch()
            elif not served.exists():
                self.served_alone += 1
                deadline = time.time() + 120
                while self.served_alone > 3 and not served.exists() and time.time() < deadline:
                    time.sleep(0.05)
            return super().evaluate(recipe_json, fraction)

    return HeldUntilKilled


def test_worker_sigkilled_mid_trial_fails_that_trial(ray_local, search_suite, tmp_path):
    """Fault (a): SIGKILL a worker's pid from outside while it evaluates a trial of the main
    search: that trial is FAILED with "worker died", Ray restarts the worker, which serves
    later trials, and the search completes its budget."""
    import signal
    import threading

    job = small_job(
        search_suite,
        tmp_path,
        trials=10,
        held_out_top_k=0,
        baselines=False,
        sampler={"name": "random", "seed": 0},
    )
    busy, served = tmp_path / "busy.json", tmp_path / "served"
    out: dict[str, Any] = {}

    def search() -> None:
        try:
            out["study"] = run_search(
                job, progress=False, worker_class=held_until_killed(busy, served)
            )
        except BaseException as err:  # re-raised in the test's thread
            out["error"] = err

    thread = threading.Thread(target=search)
    thread.start()
    deadline = time.time() + 180
    while not busy.exists() or not busy.read_text():
        assert time.time() < deadline and thread.is_alive(), out.get("error")
        time.sleep(0.05)
    held = json.loads(busy.read_text())
    os.kill(held["pid"], signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" not in out, out.get("error")
    study = out["study"]

    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1, [t.user_attrs.get("error") for t in failed]
    assert failed[0].user_attrs["error"].startswith("worker died: ")
    assert failed[0].user_attrs["recipe"] == json.loads(held["recipe"])  # the killed call's
    assert counted_trials(study) == 10
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 9
    pids = {t.user_attrs["timing"]["pid"] for t in done}
    assert held["pid"] not in pids and len(pids) == 2  # the healthy one and the restarted one
    t_failed = failed[0].datetime_complete
    assert any(t.datetime_complete > t_failed for t in done)  # the search went on after it
