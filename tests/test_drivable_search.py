"""A search driven from Python without a terminal: events, a stop from outside, resume; and a
run opened by storage URL and study name alone. Real Ray, real journals, the tiny suite."""

from __future__ import annotations

import dataclasses
import threading
import time

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from evomerge.cli import main
from evomerge.config import parse_job
from evomerge.runs.results import open_run, open_study_run, results_frame
from evomerge.search.driver import Search, run_search
from evomerge.search.journal import JournalLockedError
from evomerge.search.progress import PhaseStarted, Stopped, TrialFinished
from evomerge.search.storage import save_job
from evomerge.search.study import INTERRUPTED, counted_trials
from evomerge.search.worker import MergeWorker
from tests.test_search import job_dict


def run_in_thread(search: Search, events: list, **kw) -> threading.Thread:
    thread = threading.Thread(target=search.run, kwargs={"on_event": events.append, **kw})
    thread.start()
    return thread


def test_events_arrive_in_order_up_to_the_budget(ray_local, search_suite, tmp_path):
    job = parse_job(job_dict(search_suite, tmp_path / "run", trials=6, held_out_top_k=1))
    events: list = []
    search = Search(job)
    run_in_thread(search, events).join(timeout=120)
    trials = [e for e in events if isinstance(e, TrialFinished)]
    phases = [(type(e).__name__, e.phase) for e in events if not isinstance(e, TrialFinished)]
    assert phases == [
        (kind, phase) for phase in ("search", "held_out", "reference")
        for kind in ("PhaseStarted", "PhaseFinished")
    ]
    assert events[1:len(trials) + 1] == trials  # every tell between the search phase's events
    assert [e.done for e in trials] == list(range(1, 7)) and {e.budget for e in trials} == {6}
    study = search.study
    assert not search.stopped and study is not None
    assert [e.number for e in trials] == [
        t.number for t in sorted(study.trials, key=lambda t: t.datetime_complete)
    ]
    best = study.best_trial
    assert (trials[-1].best, trials[-1].best_trial) == (best.value, best.number)
    assert all(a.best >= b.best for a, b in zip(trials, trials[1:], strict=False))  # minimize
    assert all(a.elapsed_s <= b.elapsed_s for a, b in zip(trials, trials[1:], strict=False))
    first = study.trials[trials[0].number]
    assert trials[-1].evals_per_min > 0 and trials[0].values == tuple(first.values)
    with pytest.raises(dataclasses.FrozenInstanceError):
        trials[0].done = 0


def test_stop_from_outside_then_resume_reaches_the_budget(ray_local, search_suite, tmp_path):
    budget = 8
    job = parse_job(job_dict(search_suite, tmp_path / "run", trials=budget, held_out_top_k=1))
    events: list = []
    seen, asked = threading.Event(), threading.Event()

    def on_event(event) -> None:
        events.append(event)
        if sum(isinstance(e, TrialFinished) for e in events) == 3:
            seen.set()
            asked.wait(timeout=30)  # so that the budget cannot be met before the stop

    search = Search(job)
    thread = threading.Thread(target=search.run, kwargs={"on_event": on_event})
    thread.start()
    assert seen.wait(timeout=60)
    search.stop()
    asked.set()
    t0 = time.monotonic()
    thread.join(timeout=30)
    assert not thread.is_alive() and time.monotonic() - t0 < 10
    assert search.stopped and isinstance(events[-1], Stopped) and events[-1].phase == "search"
    assert not any(isinstance(e, PhaseStarted) and e.phase != "search" for e in events)
    study = search.study
    assert study is not None and not study.get_trials(states=(TrialState.RUNNING,))
    done = counted_trials(study)
    assert 3 <= done < budget and events[-1].done == done
    interrupted = [t for t in study.trials if t.user_attrs.get(INTERRUPTED)]
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert interrupted and all(t.state == TrialState.FAIL for t in interrupted)
    assert len(waiting) >= len(interrupted)  # re-queued (a waiting trial has no params yet)
    before = {t.number: t.params for t in study.get_trials(states=(TrialState.COMPLETE,))}

    study = run_search(job, resume=True, progress=False)  # the writer lock was released
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert counted_trials(study) == len(complete) == budget
    after = {t.number: t.params for t in complete}
    assert all(after[n] == p for n, p in before.items())
    runs = [tuple(sorted(p.items())) for p in after.values()]
    assert len(set(runs)) == budget  # nothing ran twice, beyond the re-runs of interrupted ones
    assert {tuple(sorted(t.params.items())) for t in interrupted} <= set(runs)


def test_open_by_storage_and_study_name_without_job_yaml(
    ray_local, search_suite, tmp_path, capsys
):
    job = parse_job(job_dict(search_suite, tmp_path / "run", trials=3, held_out_top_k=1))
    run_search(job, progress=False)
    run, url = tmp_path / "run", f"journal:{tmp_path / 'run' / 'study.journal'}"
    expected = results_frame(*open_run(run))
    (run / "job.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="--storage URL --study NAME"):
        open_run(run)
    study, stored = open_study_run(url, job.name)
    assert stored == job
    pd.testing.assert_frame_equal(results_frame(study, stored), expected)
    capsys.readouterr()
    assert main(["results", "--storage", url, "--study", job.name]) == 0
    assert "reference:uniform_task_arithmetic" in capsys.readouterr().out
    assert main(["best", "--storage", url, "--study", job.name]) == 0
    assert f"# trial {study.best_trial.number}:" in capsys.readouterr().out
    out = tmp_path / "best.yaml"
    assert main(["export", str(out), "--storage", url, "--study", job.name]) == 0
    assert f"trial {study.best_trial.number}" in out.read_text()
    assert main(["results", str(run), "--study", job.name]) == 2
    assert "not both" in capsys.readouterr().err


def test_open_study_run_refuses_a_study_without_a_valid_job(tmp_path):
    url = f"journal:{tmp_path / 'x.journal'}"
    optuna.create_study(study_name="plain", storage=open_journal(tmp_path / "x.journal"))
    with pytest.raises(ValueError, match="'plain' .* has no evomerge job config"):
        open_study_run(url, "plain")
    with pytest.raises(FileNotFoundError, match="no study named 'plane' .* did you mean 'plain'"):
        open_study_run(url, "plane")
    bad = optuna.create_study(study_name="bad", storage=open_journal(tmp_path / "x.journal"))
    save_job(bad, {"name": "bad", "nope": 1})
    with pytest.raises(ValueError, match="the job config stored in study 'bad': .*nope"):
        open_study_run(url, "bad")


def test_prepare_holds_the_writer_lock_until_close(search_suite, tmp_path):
    job = parse_job(job_dict(search_suite, tmp_path / "run", trials=2))
    search = Search(job)
    study = search.prepare()
    assert search.prepare() is study  # idempotent
    assert len(study.get_trials(states=(TrialState.WAITING,))) >= 1  # the baselines
    with pytest.raises(JournalLockedError):
        Search(job, resume=True).prepare()
    search.close()
    with pytest.raises(RuntimeError, match="was closed; continue the study with"):
        search.run()
    again = Search(job, resume=True)
    again.prepare()
    again.close()


def open_journal(path) -> optuna.storages.BaseStorage:
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def test_a_stop_before_the_run_starts_no_worker(search_suite, tmp_path):
    job = parse_job(job_dict(search_suite, tmp_path / "run", trials=2))
    events: list = []
    stop = threading.Event()
    stop.set()
    study = Search(job).run(on_event=events.append, stop=stop)
    assert events == [Stopped("search", 0, 2)] and not study.trials[0].state.is_finished()


class SlowEvaluations(MergeWorker):
    """Every evaluation takes 60 s: a stop must not wait for one."""

    def evaluate(self, recipe_json: str, fraction: float = 1.0) -> dict:
        time.sleep(60)
        return super().evaluate(recipe_json, fraction)


def test_a_stop_does_not_wait_for_a_long_evaluation(ray_local, search_suite, tmp_path):
    job = parse_job(job_dict(search_suite, tmp_path / "run", trials=4))
    events: list = []
    started = threading.Event()

    def on_event(event) -> None:
        events.append(event)
        if isinstance(event, PhaseStarted) and event.phase == "search":
            started.set()

    search = Search(job, worker_class=SlowEvaluations)
    thread = threading.Thread(target=search.run, kwargs={"on_event": on_event})
    thread.start()
    assert started.wait(timeout=60)
    time.sleep(1.0)  # the workers are inside their first evaluation
    t0 = time.monotonic()
    search.stop()
    thread.join(timeout=30)
    assert not thread.is_alive() and time.monotonic() - t0 < 10
    study = search.study
    assert study is not None and not study.get_trials(states=(TrialState.RUNNING,))
    assert counted_trials(study) == 0 and isinstance(events[-1], Stopped)
