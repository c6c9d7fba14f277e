"""Fault (b): the driver SIGKILLed at 10 seeded random moments (start-up, mid-search, the
held-out phase), ``--resume`` after each, then one resume to the end. Afterwards the budget is
met exactly, completed trial numbers and parameter sets are unique, every completed trial's
stored recipe re-evaluates (a fresh worker, the same evaluators) to its stored objective value,
and every held-out and reference score is stored. Against the journal (10 kills) and a real
PostgreSQL (4 kills, to stay bounded).

The driver is a subprocess in its own session (as ``evomerge search`` runs) whose workers pace
their calls (0.2 s per trial, 1 s per held-out call), so that a kill can land inside each phase
on any machine; the search, the storage and the resume are the real ones.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from evomerge.config import parse_job
from evomerge.recipe import Recipe
from evomerge.search.heldout import chosen_trials, stored_held_out
from evomerge.search.objectives import objective_values
from evomerge.search.references import stored_references
from evomerge.search.study import INTERRUPTED
from tests.pg_fixtures import postgres_url  # noqa: F401 - the fixture
from tests.test_search import job_dict

pytestmark = pytest.mark.slow  # eleven drivers, each with its own local Ray: the full lane

BUDGET = 36
TRIAL_S, HELD_OUT_S = 0.2, 1.0

DRIVER = """
import sys
from evomerge.config import load_job
from evomerge.search.driver import run_search
from tests.test_kill_storm import paced_worker
run_search(load_job(sys.argv[1]), resume=sys.argv[2] == "1", storage_url=sys.argv[3] or None,
           progress=False, worker_class=paced_worker())
"""


def paced_worker() -> type:
    """A MergeWorker that takes at least 0.2 s per trial and 1 s per held-out call (a local
    class: Ray ships it by value, no import path needed on the workers)."""
    from evomerge.search.worker import MergeWorker

    class Paced(MergeWorker):
        def evaluate(self, recipe_json: str, fraction: float = 1.0) -> dict[str, Any]:
            time.sleep(TRIAL_S)
            return super().evaluate(recipe_json, fraction)

        def evaluate_held_out(self, recipe_json: str) -> dict[str, Any]:
            time.sleep(HELD_OUT_S)
            return super().evaluate_held_out(recipe_json)

    return Paced


def driver(job_path: Path, *, resume: bool, storage: str | None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(job_path), "1" if resume else "0", storage or ""],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


class Watch:
    """Reads the study as the driver writes it: trials counted, held-out entries stored."""

    def __init__(self, storage: optuna.storages.BaseStorage | str, name: str) -> None:
        self.storage, self.name = storage, name

    def study(self) -> optuna.Study | None:
        try:
            return optuna.load_study(study_name=self.name, storage=self.storage)
        except (KeyError, ValueError):  # not created yet
            return None

    def state(self) -> tuple[int, int, Any]:
        """(trials counted toward the budget, held-out entries stored, the workers' pids)."""
        study = self.study()
        if study is None:
            return 0, 0, None
        counted = sum(
            1
            for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
            and not t.user_attrs.get(INTERRUPTED)
        )
        pids = [w.get("pid") for w in study.user_attrs.get("evomerge:workers", [])]
        return counted, len(stored_held_out(study)), pids


def plan(kills: int, seed: int) -> list[tuple[str, float]]:
    """``kills`` moments: (phase, parameter); start-up and mid-search kills shuffled, then the
    held-out ones (the search budget is met by then). At least one of each."""
    rng = random.Random(seed)
    held = max(1, kills // 5)
    start = max(1, kills // 2)  # cheap: killed before the workers are up
    early = ["startup"] * start + ["search"] * (kills - held - start)
    rng.shuffle(early)
    moments = []
    for phase in [*early, *["held_out"] * held]:
        if phase == "startup":  # seconds after the driver starts: imports, Ray, study, workers
            moments.append((phase, rng.uniform(0.5, 8.0)))
        elif phase == "search":  # trials completed by this driver first
            moments.append((phase, float(rng.randint(1, 4))))
        else:  # seconds after the held-out phase is seen running
            moments.append((phase, rng.uniform(0.0, 0.6)))
    return moments


def kill_at(proc: subprocess.Popen, watch: Watch, phase: str, arg: float) -> str:
    """Wait for the moment, SIGKILL the driver's process group; the phase it was really in."""
    counted0, _, pids0 = watch.state()
    t0, deadline = time.time(), time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        counted, _, pids = watch.state()
        if phase == "startup" and time.time() - t0 >= arg:
            break
        if phase == "search" and (counted >= counted0 + arg or counted >= BUDGET - 2):
            break
        # this driver's workers are up (their pids stored) and the budget is met
        if phase == "held_out" and counted >= BUDGET and pids and pids != pids0:
            time.sleep(arg)
            break
        time.sleep(0.05)
    out = proc.stdout.read() if proc.poll() is not None and proc.stdout else ""
    assert proc.poll() is None, f"the driver ended before its {phase} kill:\n{out}"
    counted, _, _ = watch.state()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if counted == counted0 and phase == "startup":
        return "startup"
    return "search" if counted < BUDGET else "held_out"


def storm(job_path: Path, data: dict, storage: str | None, watch: Watch, kills: int) -> dict:
    seen: dict[str, int] = {}
    t0 = time.time()
    for i, (phase, arg) in enumerate(plan(kills, seed=16)):
        proc = driver(job_path, resume=i > 0, storage=storage)
        where = kill_at(proc, watch, phase, arg)
        seen[where] = seen.get(where, 0) + 1
    final = driver(job_path, resume=True, storage=storage)
    out, _ = final.communicate(timeout=300)
    assert final.returncode == 0, out
    return {"kills": seen, "wall_s": round(time.time() - t0, 1)}


def check_study(study: optuna.Study, data: dict) -> float:
    """The assertions of the docstring; returns the largest re-evaluation difference."""
    from evomerge.search.worker import MergeWorker

    job = parse_job(data)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == BUDGET  # exactly the budget
    numbers = [t.number for t in complete]
    assert len(set(numbers)) == len(numbers)
    params = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(params)) == len(params), "a parameter set was completed twice"
    others = [t for t in study.trials if t.state != TrialState.COMPLETE]
    assert all(t.state == TrialState.FAIL and t.user_attrs.get(INTERRUPTED) for t in others)
    held = stored_held_out(study)
    chosen = chosen_trials(job, study)
    assert chosen and all("metrics" in held[t.number] for t in chosen), held
    refs = stored_references(study)
    assert all("error" not in e["metrics"] and "error" not in e["held_out"] for e in refs.values())
    worker = MergeWorker(job.model_dump_json())  # fresh, in this process, same evaluators
    worst = 0.0
    for t in complete:
        recipe = Recipe.from_dict(t.user_attrs["recipe"])
        assert recipe.to_dict() == t.user_attrs["recipe"]
        values = objective_values(job.objectives, worker.evaluate(recipe.to_json())["metrics"])
        assert values == pytest.approx(t.values, rel=1e-5, abs=1e-6), t.number
        worst = max(worst, *(abs(a - b) for a, b in zip(values, t.values, strict=True)))
    return worst


def run_storm(search_suite, tmp_path, storage: str | None, kills: int) -> dict:
    data = job_dict(search_suite, tmp_path / "run", trials=BUDGET, held_out_top_k=2)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    if storage is None:
        from evomerge.search.journal import JournalFileReader

        journal = tmp_path / "run" / "study.journal"
        journal.parent.mkdir(parents=True)
        journal.touch()
        backend: Any = optuna.storages.JournalStorage(JournalFileReader(str(journal)))
    else:
        backend = optuna.storages.RDBStorage(storage)
    watch = Watch(backend, data["name"])
    figures = storm(path, data, storage, watch, kills)
    study = watch.study()
    assert study is not None
    figures["max_reeval_diff"] = check_study(study, data)
    figures["trials"] = len(study.trials)
    figures["interrupted"] = sum(1 for t in study.trials if t.user_attrs.get(INTERRUPTED))
    print(f"kill storm ({storage or 'journal'}): {json.dumps(figures)}")
    return figures


def test_ten_driver_kills_then_resume_journal(search_suite, tmp_path):
    figures = run_storm(search_suite, tmp_path, None, kills=10)
    assert sum(figures["kills"].values()) == 10
    assert set(figures["kills"]) == {"startup", "search", "held_out"}, figures["kills"]


def test_driver_kills_then_resume_postgres(search_suite, tmp_path, postgres_url):  # noqa: F811
    figures = run_storm(search_suite, tmp_path, postgres_url, kills=4)
    assert set(figures["kills"]) == {"startup", "search", "held_out"}, figures["kills"]
