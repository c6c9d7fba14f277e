"""Kill the driver process with SIGKILL mid-search, resume: the budget is met exactly, no
completed trial is lost or repeated. Also: bad input is refused before any worker starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests.test_search import job_dict


def cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "evomerge", *args],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def load(run_dir, name) -> optuna.Study | None:
    if not (run_dir / "study.journal").exists():
        return None
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(run_dir / "study.journal"))
    )
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


@pytest.mark.slow
def test_sigkill_then_resume_reaches_budget_exactly(search_suite, tmp_path):
    budget = 60  # tiny models evaluate in milliseconds: leave room to kill the driver mid-search
    data = job_dict(search_suite, tmp_path / "run", trials=budget, held_out_top_k=0)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = cli("search", str(path), "--no-progress")
    deadline = time.time() + 240
    study = None
    while time.time() < deadline and proc.poll() is None:
        study = load(tmp_path / "run", data["name"])
        if study and len(study.get_trials(states=(TrialState.COMPLETE,))) >= 6:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {
        t.number: t.params
        for t in load(tmp_path / "run", data["name"]).trials
        if t.state == TrialState.COMPLETE
    }
    assert 6 <= len(before) < budget

    resumed = cli("search", str(path), "--resume", "--no-progress")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    study = load(tmp_path / "run", data["name"])
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    interrupted = [t for t in study.trials if t.user_attrs.get("interrupted")]
    assert len(complete) == budget  # exactly the budget: no worker failures in this run
    assert all(t.state == TrialState.FAIL for t in interrupted)
    after = {t.number: t.params for t in complete}
    assert all(after[n] == p for n, p in before.items())  # nothing completed was lost
    # interrupted trials are re-run first, with the same parameters, as far as the budget allows
    first_after = [t.params for t in sorted(complete, key=lambda t: t.number)
                   if t.number > max(n for n in before)][: budget - len(before)]
    # (a trial killed inside ask() can have partial parameters: nothing to re-run for it)
    whole = [t.params for t in interrupted if len(t.params) == len(first_after[0])]
    rerun = min(len(whole), budget - len(before))
    assert whole[:rerun] == first_after[:rerun]


def test_bad_objective_refused_before_workers_start(search_suite, tmp_path):
    data = job_dict(search_suite, tmp_path / "run")
    data["objectives"] = [{"metric": "entropy/nope"}]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    t0 = time.time()
    proc = cli("search", str(path))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "metric 'entropy/nope' is produced by no evaluator" in out
    assert time.time() - t0 < 30 and not (tmp_path / "run").exists()
