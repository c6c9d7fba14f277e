"""The study in a real PostgreSQL server: one driver per study (an advisory-lock lease that a
``kill -9`` frees), a search, a second driver refused, SIGKILL mid-search and ``--resume``."""

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

from evomerge.config import parse_job
from evomerge.runs.results import open_run, results_frame
from evomerge.search.driver import run_search
from evomerge.search.journal import JournalLockedError
from evomerge.search.storage import close_storage, lock_study, open_storage
from tests.pg_fixtures import postgres_url  # noqa: F401 - the fixture
from tests.test_resume import cli
from tests.test_search import job_dict

HOLD = """
import sys, time
from evomerge.search.storage import lock_study, open_storage
storage = open_storage(sys.argv[1], None, writer=True)
lock_study(storage, sys.argv[2])
print("ready", flush=True)
time.sleep(600)
"""


def held(url: str, study: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, url, study], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_lease_one_driver_per_study_freed_by_kill(postgres_url):  # noqa: F811
    holder = held(postgres_url, "s1")
    try:
        storage = open_storage(postgres_url, None, writer=True)  # type: ignore[arg-type]
        with pytest.raises(JournalLockedError) as err:
            lock_study(storage, "s1")
        msg = str(err.value)
        assert msg.startswith("study 's1' in postgresql://evomerge@127.0.0.1:")
        assert f"pid {holder.pid} on " in msg and "then run again with --resume" in msg
        lock_study(storage, "s2")  # another study in the same database is free
        close_storage(storage)
        holder.send_signal(signal.SIGKILL)  # the server drops the lock with the session
        holder.wait()
        deadline = time.time() + 10
        while True:
            storage = open_storage(postgres_url, None, writer=True)  # type: ignore[arg-type]
            try:
                lock_study(storage, "s1")
                break
            except JournalLockedError:
                assert time.time() < deadline, "a killed driver's lease was not freed"
                time.sleep(0.2)
        close_storage(storage)
        readers = open_storage(postgres_url, None)  # type: ignore[arg-type]
        lock_study(readers, "s1")  # a reader (results, export) takes no lease
    finally:
        holder.kill()
        holder.wait()


def test_search_in_postgres(ray_local, search_suite, postgres_url, tmp_path):  # noqa: F811
    data = job_dict(search_suite, tmp_path / "run", trials=6, held_out_top_k=1)
    study = run_search(parse_job({**data, "storage": postgres_url}), progress=False)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 6
    loaded, job = open_run(None, storage_url=postgres_url, study_name=data["name"])
    assert job.name == data["name"] and len(loaded.trials) == 6
    df = results_frame(loaded, job)
    assert (df["state"] == "COMPLETE").sum() == 6
    assert "reference:uniform_task_arithmetic" in df.index
    again = open_storage(postgres_url, None, writer=True)  # type: ignore[arg-type]
    lock_study(again, data["name"])  # the finished driver released its lease
    close_storage(again)


def count(storage: optuna.storages.BaseStorage, name: str, state: TrialState) -> int:
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return 0
    return len(study.get_trials(states=(state,)))


def test_second_driver_refused_in_one_line(search_suite, postgres_url, tmp_path):  # noqa: F811
    data = job_dict(search_suite, tmp_path / "run", trials=4)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    holder = held(postgres_url, data["name"])  # a driver on this study (its lease, held)
    try:
        second = cli("search", str(path), "--no-progress", "--storage", postgres_url)
        out, _ = second.communicate(timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2, out
    [line] = [ln for ln in out.splitlines() if "error" in ln]
    assert line.startswith(f"evomerge search: error: study {data['name']!r} in postgresql://")
    assert f"being written by another evomerge driver (pid {holder.pid} on " in line
    assert not (tmp_path / "run").exists()  # refused before any file or worker


@pytest.mark.slow
def test_sigkill_then_resume_reaches_budget_exactly(search_suite, postgres_url, tmp_path):  # noqa: F811
    budget = 24
    data = job_dict(search_suite, tmp_path / "run", trials=budget, held_out_top_k=0)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    first = cli("search", str(path), "--no-progress", "--storage", postgres_url)
    db = optuna.storages.RDBStorage(postgres_url)  # one connection pool for the polling
    try:
        deadline = time.time() + 240
        while count(db, data["name"], TrialState.COMPLETE) < 4:
            assert first.poll() is None and time.time() < deadline, first.communicate()[0]
            time.sleep(0.1)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    study = optuna.load_study(study_name=data["name"], storage=db)
    before = {t.number: t.params for t in study.trials if t.state == TrialState.COMPLETE}
    assert 4 <= len(before) < budget

    resumed = cli("search", str(path), "--resume", "--no-progress", "--storage", postgres_url)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    study = optuna.load_study(study_name=data["name"], storage=db)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == budget
    assert not study.get_trials(states=(TrialState.RUNNING,))  # the dead driver's: failed
    assert all(t.state == TrialState.FAIL for t in study.trials if t.user_attrs.get("interrupted"))
    after = {t.number: t.params for t in complete}
    assert all(after[n] == p for n, p in before.items())  # nothing completed was lost
