"""The driver's single-writer journal: optuna's format, one writer per run, readers while it
writes, torn last lines, nothing told lost when the driver is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from evomerge.search.journal import DriverJournalFile, JournalLockedError
from evomerge.search.storage import close_storage, open_storage

ROOT = Path(__file__).resolve().parents[1]
DISTS = {
    "w/a/0": FloatDistribution(0.0, 1.0),
    "d/a/0": FloatDistribution(0.1, 1.0, log=True),
    "n": IntDistribution(1, 9),
    "c": CategoricalDistribution(["x", "y", None]),
}


def reader(path: Path) -> optuna.Study:
    """How `evomerge results`, export and optuna-dashboard read: optuna's own backend."""
    storage = JournalStorage(JournalFileBackend(str(path)))
    return optuna.load_study(study_name="s", storage=storage)


def fill(study: optuna.Study) -> None:
    """Every kind of record the driver writes: params, user/system attrs, all states."""
    study.set_user_attr("evomerge:job", {"name": "s", "nested": [1, 2.5, None]})
    study.enqueue_trial({"w/a/0": 0.3}, user_attrs={"baseline": "uniform"})
    for i in range(7):
        trial = study.ask(DISTS)
        trial.set_user_attr("recipe", {"models": dict(trial.params), "i": i})
        trial.set_user_attr("metrics", {"m": i / 7, "nan": float("nan")})
        trial.storage.set_trial_system_attr(trial._trial_id, "sys", [i, "x"])
        trial.report(i * 0.5, step=1)
        state = [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED][i % 3]
        study.tell(trial, i * 0.1 if state == TrialState.COMPLETE else None, state=state)
    study.ask(DISTS)  # left RUNNING
    study.enqueue_trial({"n": 4})  # left WAITING


def same_trials(a: list, b: list) -> None:
    assert len(a) == len(b) == 9
    for x, y in zip(a, b, strict=True):
        for key in ("number", "state", "params", "distributions", "values", "system_attrs",
                    "intermediate_values", "datetime_start", "datetime_complete"):
            assert getattr(x, key) == getattr(y, key), key
        assert json.dumps(x.user_attrs, sort_keys=True) == json.dumps(y.user_attrs, sort_keys=True)


def test_round_trip_matches_optunas_reader(tmp_path):
    path = tmp_path / "study.journal"
    storage = open_storage(f"journal:{path}", tmp_path, writer=True, fsync=True)
    study = optuna.create_study(study_name="s", storage=storage)
    fill(study)
    mine = study.trials
    same_trials(mine, reader(path).trials)
    assert reader(path).user_attrs == study.user_attrs
    close_storage(storage)  # the study stays usable: optuna's locking backend from here on
    study.set_user_attr("after", 1)
    same_trials(study.trials, reader(path).trials)
    assert reader(path).user_attrs["after"] == 1
    assert all(line.endswith("}") for line in path.read_text().splitlines())


def holder(path: Path, code: str) -> subprocess.Popen:
    """A separate driver process that opens ``path`` for writing, runs ``code``, says 'ready'."""
    script = (
        "import sys, time, optuna\n"
        "from pathlib import Path\n"
        "from evomerge.search.storage import open_storage\n"
        f"path = Path({str(path)!r})\n"
        "storage = open_storage(f'journal:{path}', path.parent, writer=True)\n"
        f"{code}\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_second_writer_is_refused_until_the_first_dies(tmp_path):
    path = tmp_path / "study.journal"
    proc = holder(path, "")
    try:
        with pytest.raises(JournalLockedError, match=rf"another evomerge driver \(pid {proc.pid}"):
            open_storage(f"journal:{path}", tmp_path, writer=True)
        reader_storage = open_storage(f"journal:{path}", tmp_path)  # readers are not refused
        assert reader_storage.get_all_studies() == []
    finally:
        kill(proc)
    close_storage(open_storage(f"journal:{path}", tmp_path, writer=True))  # the OS freed it


def test_lock_is_released_by_close_within_a_process(tmp_path):
    path = tmp_path / "study.journal"
    first = DriverJournalFile(path)
    with pytest.raises(JournalLockedError):
        DriverJournalFile(path)
    first.close()
    DriverJournalFile(path).close()


def test_reader_sees_consistent_trials_while_the_driver_writes(tmp_path):
    path = tmp_path / "study.journal"
    code = (
        "from optuna.distributions import FloatDistribution as F\n"
        "study = optuna.create_study(study_name='s', storage=storage)\n"
        "print('ready', flush=True)\n"
        "dists = {f'p{i}': F(0, 1) for i in range(32)}\n"
        "while True:\n"
        "    t = study.ask(dists)\n"
        "    t.set_user_attr('recipe', {'models': t.params, 'pad': 'x' * 5000})\n"
        "    study.tell(t, sum(t.params.values()))\n"
    )
    proc = holder(path, code)
    try:
        seen, reads = 0, 0
        while reads < 40 or seen < 20:
            trials = reader(path).trials
            assert [t.number for t in trials] == list(range(len(trials)))
            assert len(trials) >= seen
            for t in trials:
                assert len(t.params) == 32 or t.state == TrialState.RUNNING
                if t.state == TrialState.COMPLETE:
                    assert t.value == pytest.approx(sum(t.params.values()))
                    assert t.user_attrs["recipe"]["models"] == t.params
            seen, reads = len(trials), reads + 1
    finally:
        kill(proc)


def test_partial_last_line_is_tolerated_and_cut_by_the_next_writer(tmp_path):
    path = tmp_path / "study.journal"
    storage = open_storage(f"journal:{path}", tmp_path, writer=True)
    study = optuna.create_study(study_name="s", storage=storage)
    fill(study)
    # another process half way through a write: both readers skip the partial line ...
    record = json.dumps({"op_code": 2, "worker_id": "w", "study_id": 0,
                         "user_attr": {"late": 1}}, separators=(",", ":"))
    with open(path, "ab") as f:
        f.write(record[:20].encode())
    assert "late" not in study.user_attrs and "late" not in reader(path).user_attrs
    same_trials(study.trials, reader(path).trials)
    with open(path, "ab") as f:  # ... and read it once it is whole
        f.write(record[20:].encode() + b"\n")
    assert study.user_attrs["late"] == 1 == reader(path).user_attrs["late"]
    # a driver killed inside a write leaves a torn tail: the next writer cuts it
    with open(path, "ab") as f:
        f.write(record[:30].encode())
    close_storage(storage)
    storage = open_storage(f"journal:{path}", tmp_path, writer=True)
    assert path.read_bytes().endswith(b"}\n")
    study = optuna.load_study(study_name="s", storage=storage)
    study.set_user_attr("resumed", True)
    assert reader(path).user_attrs["resumed"] is True
    same_trials(study.trials, reader(path).trials)
    close_storage(storage)


def test_corrupt_record_inside_the_file_is_an_error(tmp_path):
    path = tmp_path / "study.journal"
    storage = open_storage(f"journal:{path}", tmp_path, writer=True)
    optuna.create_study(study_name="s", storage=storage)
    close_storage(storage)
    with open(path, "ab") as f:
        f.write(b'{"op_code": 2, "wor\n{"op_code": 2}\n')
    with pytest.raises(ValueError, match="record 2 is not valid JSON"):
        JournalStorage(DriverJournalFile(path))


def test_long_records_round_trip(tmp_path):
    path = tmp_path / "study.journal"
    storage = open_storage(f"journal:{path}", tmp_path, writer=True)
    study = optuna.create_study(study_name="s", storage=storage)
    big = "y" * (3 << 20)  # longer than the 1 MiB read chunk
    study.set_user_attr("big", big)
    study.set_user_attr("small", 1)
    close_storage(storage)
    again = optuna.load_study(study_name="s", storage=JournalStorage(DriverJournalFile(path)))
    assert again.user_attrs["big"] == big and again.user_attrs["small"] == 1


def test_sigkill_loses_nothing_already_told(tmp_path):
    path = tmp_path / "study.journal"
    code = (
        "study = optuna.create_study(study_name='s', storage=storage)\n"
        "for i in range(25):\n"
        "    t = study.ask({'x': optuna.distributions.FloatDistribution(0, 1)})\n"
        "    t.set_user_attr('i', i)\n"
        "    study.tell(t, float(i))\n"
        "study.ask()\n"
    )
    proc = holder(path, code)
    kill(proc)
    trials = reader(path).trials
    assert [t.value for t in trials[:25]] == [float(i) for i in range(25)]
    assert all(t.state == TrialState.COMPLETE for t in trials[:25])
    assert trials[25].state == TrialState.RUNNING and len(trials) == 26
    # the lock died with the process:
    close_storage(open_storage(f"journal:{path}", tmp_path, writer=True))


def finished_run(tmp_path: Path) -> tuple[Path, Path]:
    """A run folder as ``evomerge search`` leaves it: job.yaml and a journal of 8 trials."""
    import yaml

    from tests.test_search import job_dict

    run = tmp_path / "run"
    data = job_dict({"dir": tmp_path / "models", "expert_tasks": ["a", "b"]}, run)
    run.mkdir()
    (run / "job.yaml").write_text(yaml.safe_dump(data))
    storage = open_storage(None, run, writer=True)
    study = optuna.create_study(study_name=data["name"], storage=storage)
    for i in range(8):
        trial = study.ask(DISTS)
        trial.set_user_attr("metrics", {"entropy/a": i / 8})
        trial.set_user_attr("recipe", {"method": "ties", "i": i})
        study.tell(trial, i / 8)
    close_storage(storage)
    return run, run / "study.journal"


@pytest.mark.parametrize("command", ["results", "best"])
def test_corrupt_middle_record_names_the_file_the_record_and_the_fix(tmp_path, capsys, command):
    from evomerge.cli import main

    run, journal = finished_run(tmp_path)
    lines = journal.read_bytes().splitlines(keepends=True)
    k = len(lines) // 2
    lines[k] = lines[k].replace(b'"op_code"', b'"op\x01code"')  # a control character
    journal.write_bytes(b"".join(lines))
    assert main([command, str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(
        f"evomerge {command}: error: {journal}: record {k + 1} is not valid JSON (Invalid "
        f"control character at column 5); the journal is corrupt from line {k + 1} on"
    ), err
    assert f"`head -n {k} {journal} > repaired.journal`" in err


def test_a_partial_last_line_is_still_skipped_by_readers(tmp_path, capsys):
    from evomerge.cli import main

    run, journal = finished_run(tmp_path)
    with open(journal, "ab") as f:
        f.write(b'{"op_code": 5, "worker_id": "w", "tri')  # a driver in the middle of a write
    assert main(["results", str(run)]) == 0
    rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines()]
    assert [r for r in rows if r and r[0].isdigit()] == [[str(i), "COMPLETE"] for i in range(8)]


def test_empty_missing_journal_and_bad_job_yaml_are_one_line_naming_the_file(tmp_path, capsys):
    from evomerge.cli import main

    run, journal = finished_run(tmp_path)
    journal.write_bytes(b"")
    assert main(["results", str(run)]) == 2
    assert capsys.readouterr().err.endswith(f"in {journal} (the file is empty)\n")
    journal.unlink()
    assert main(["results", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"evomerge results: error: no study journal at {journal}:")
    assert not journal.exists()  # reading does not create it
    (run / "job.yaml").write_text('name: "t1\nrun_dir: ')  # cut short inside a string
    assert main(["results", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {run / 'job.yaml'}:" in err, err
