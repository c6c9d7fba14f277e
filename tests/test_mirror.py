"""The driver's in-memory study (:mod:`evomerge.search.mirror`): what reaches the real storage,
when, in how many writes, after a kill, through an outage, and the ask-ahead loop on Ray."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.exceptions import StorageInternalError
from optuna.storages import InMemoryStorage, JournalStorage
from optuna.trial import TrialState

from evomerge.search.journal import DriverJournalFile
from evomerge.search.mirror import MirroredStorage
from evomerge.search.storage import close_storage, open_storage
from tests.test_storage import DISTS, fill

ROOT = Path(__file__).resolve().parents[1]
KEYS = (
    "number",
    "state",
    "params",
    "distributions",
    "values",
    "system_attrs",
    "intermediate_values",
    "user_attrs",
)


def mirrored(target: Any, name: str = "s") -> tuple[MirroredStorage, optuna.Study]:
    if name not in {s.study_name for s in target.get_all_studies()}:
        optuna.create_study(study_name=name, storage=target)
    storage = MirroredStorage(target, name)
    return storage, optuna.load_study(study_name=name, storage=storage)


def same(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial) -> None:
    for key in KEYS:
        x, y = getattr(a, key), getattr(b, key)
        if key == "user_attrs":  # NaN != NaN: compare as the journal writes them
            x, y = json.dumps(x, sort_keys=True), json.dumps(y, sort_keys=True)
        assert x == y, (a.number, key)


def read(url: str, root: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="s", storage=open_storage(url, root)).trials


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_every_kind_of_record_round_trips_with_the_same_numbers(tmp_path, kind):
    url = f"journal:{tmp_path}/s.journal" if kind == "journal" else f"sqlite:///{tmp_path}/s.db"
    storage, study = mirrored(open_storage(url, tmp_path, writer=True))
    fill(study)  # params, attrs, reports, every state, one RUNNING and one WAITING left
    close_storage(storage)
    stored = read(url, tmp_path)
    assert [t.number for t in stored] == list(range(9))
    for a, b in zip(study.trials, stored, strict=True):
        same(a, b)
    # loaded again (a resumed driver): the same trials, numbers, states and study attributes
    again, study2 = mirrored(open_storage(url, tmp_path, writer=True))
    for a, b in zip(study.trials, study2.trials, strict=True):
        same(a, b)
    assert study2.user_attrs == study.user_attrs
    assert [study2.ask(DISTS).number for _ in range(2)] == [8, 9]  # the enqueued one first
    close_storage(again)


def test_finished_trial_is_readable_within_a_second_in_number_order(tmp_path):
    url = f"journal:{tmp_path}/s.journal"
    storage, study = mirrored(open_storage(url, tmp_path, writer=True))
    first, second = study.ask(DISTS), study.ask(DISTS)
    study.tell(second, 1.0)  # finishes before the trial asked before it
    deadline = time.monotonic() + 1.5  # it waits 0.5 s (HOLD_S) for the running trial 0
    while len(read(url, tmp_path)) < 2:
        assert time.monotonic() < deadline, "a finished trial did not reach the storage"
        time.sleep(0.02)
    stored = read(url, tmp_path)
    assert [(t.number, t.state) for t in stored] == [
        (0, TrialState.RUNNING),
        (1, TrialState.COMPLETE),
    ]
    assert stored[1].value == 1.0 and stored[0].params == first.params
    study.tell(first, 0.5)
    close_storage(storage)
    assert [t.value for t in read(url, tmp_path)] == [0.5, 1.0]


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_an_enqueued_trial_written_while_waiting_gets_its_params_later(tmp_path, kind):
    url = f"journal:{tmp_path}/s.journal" if kind == "journal" else f"sqlite:///{tmp_path}/s.db"
    storage, study = mirrored(open_storage(url, tmp_path, writer=True))
    study.enqueue_trial({"w/a/0": 0.25}, user_attrs={"baseline": "uniform"})
    storage.flush(timeout=10)  # in the storage as WAITING, no parameters
    assert read(url, tmp_path)[0].state == TrialState.WAITING
    trial = study.ask(DISTS)
    storage.flush(timeout=10)  # RUNNING, every parameter
    study.tell(trial, 1.0)
    close_storage(storage)
    [stored] = read(url, tmp_path)
    same(study.trials[0], stored)
    assert stored.params["w/a/0"] == 0.25 and len(stored.params) == len(DISTS)


class CountingJournal(DriverJournalFile):
    """The driver's journal, counting the appends that reach the file."""

    writes = 0

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        if self._buffer is None:
            self.writes += 1
        super().append_logs(logs)


def test_a_burst_of_finished_trials_is_one_journal_write(tmp_path):
    backend = CountingJournal(tmp_path / "s.journal")
    storage, study = mirrored(JournalStorage(backend))
    storage.flush(timeout=10)
    before = backend.writes
    with storage._cond:  # hold the writer off while the burst is told, as one batch
        trials = [study.ask(DISTS) for _ in range(20)]
        for i, t in enumerate(reversed(trials)):
            t.set_user_attr("metrics", {"m": i})
            study.tell(t, float(i))
    storage.flush(timeout=10)
    assert backend.writes - before == 1  # 20 trials, ~100 records: one write()
    close_storage(storage)
    assert len(read(f"journal:{tmp_path}/s.journal", tmp_path)) == 20


class FlakyStorage(InMemoryStorage):
    """A real in-memory storage that is down (``StorageInternalError``) for ``down_s`` seconds
    from its first trial write, like a restarting database server."""

    def __init__(self, down_s: float) -> None:
        super().__init__()
        self.down_s, self.since = down_s, None

    def create_new_trial(self, study_id: int, template_trial: Any = None) -> int:
        if self.since is None:
            self.since = time.monotonic()
        if time.monotonic() - self.since < self.down_s:
            raise StorageInternalError("server closed the connection unexpectedly")
        return super().create_new_trial(study_id, template_trial)


def test_an_outage_is_retried_logged_once_and_loses_nothing(caplog):
    target = FlakyStorage(down_s=1.5)
    storage, study = mirrored(target)
    with caplog.at_level(logging.WARNING, logger="evomerge.search.mirror"):
        t0 = time.monotonic()
        for i in range(30):
            study.tell(study.ask(DISTS), float(i))
        assert time.monotonic() - t0 < 1.0  # the driver does not wait for the storage
        close_storage(storage)
    stored = optuna.load_study(study_name="s", storage=target).trials
    assert [t.value for t in stored] == [float(i) for i in range(30)]
    assert storage.outages == 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "unreachable" in lines[0] and "answers again" in lines[1], lines


class BrokenStorage(InMemoryStorage):
    def create_new_trial(self, study_id: int, template_trial: Any = None) -> int:
        raise OSError(28, "No space left on device")


def test_a_write_error_is_raised_in_the_driver_and_by_close():
    storage, study = mirrored(BrokenStorage())
    study.tell(study.ask(DISTS), 1.0)
    deadline = time.monotonic() + 5
    with pytest.raises(OSError, match="No space left"):
        while time.monotonic() < deadline:
            study.ask(DISTS)
            time.sleep(0.01)
    with pytest.raises(OSError, match="No space left"):
        close_storage(storage)


KILLED = """
import sys, time, optuna
from optuna.distributions import FloatDistribution
from evomerge.search.mirror import MirroredStorage
from evomerge.search.storage import open_storage
optuna.logging.set_verbosity(optuna.logging.WARNING)
target = open_storage("journal:" + sys.argv[1], None, writer=True)
optuna.create_study(study_name="s", storage=target)
study = optuna.load_study(study_name="s", storage=MirroredStorage(target, "s"))
dists = {f"x{i}": FloatDistribution(0, 1) for i in range(16)}
running = []
while True:  # 8 "workers": finish the oldest but one, out of order
    running.append(study.ask(dists))
    if len(running) == 8:
        t = running.pop(len(running) % 3)
        t.set_user_attr("recipe", dict(t.params))
        study.tell(t, sum(t.params.values()))
        print(t.number, flush=True)
"""


def test_a_killed_driver_leaves_a_prefix_that_resumes(tmp_path):
    path = tmp_path / "s.journal"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILLED), str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    for _ in range(300):  # told trials: kill it mid-stream, the writer busy
        proc.stdout.readline()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stored = read(f"journal:{path}", tmp_path)
    assert [t.number for t in stored] == list(range(len(stored)))  # no gap, no duplicate
    done = [t for t in stored if t.state == TrialState.COMPLETE]
    assert len(done) >= 10
    for t in done:  # every stored result is the one the driver told, whole
        assert t.value == pytest.approx(sum(t.params.values()))
        assert t.user_attrs["recipe"] == t.params and len(t.params) == 16
    assert all(t.state == TrialState.RUNNING for t in stored if t not in done)
    # resuming loads exactly that, and the next trial continues the numbering
    storage, study = mirrored(open_storage(f"journal:{path}", tmp_path, writer=True))
    assert [t.number for t in study.trials] == [t.number for t in stored]
    assert study.ask({"x0": FloatDistribution(0, 1)}).number == len(stored)
    close_storage(storage)


@pytest.mark.slow
def test_ask_ahead_loop_meets_the_budget_with_unique_numbers(ray_local, tmp_path):
    from bench.driver_overhead import make_job, sleep_worker_class
    from evomerge.search.driver import run_search
    from evomerge.search.loop import ask_ahead

    job = make_job(
        tmp_path, name="ahead", workers=16, trials=64, sampler="cmaes", experts=2, groups=2
    )
    assert ask_ahead(job, 16) == 2
    study = run_search(job, progress=False, worker_class=sleep_worker_class(0.2))
    stored = optuna.load_study(
        study_name="ahead", storage=open_storage(None, tmp_path / "ahead")
    ).trials
    assert [t.number for t in stored] == list(range(len(stored)))
    done = [t for t in stored if t.state == TrialState.COMPLETE]
    assert len(done) == 64 and not [t for t in stored if t.state == TrialState.RUNNING]
    for a, b in zip(study.trials, stored, strict=True):
        same(a, b)
