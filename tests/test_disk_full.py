"""A full disk stops the driver with one line that names the file and says how to continue;
the journal is left whole (no torn record), and ``--resume`` reaches the budget once there is
space again. Real full file systems: a tiny tmpfs where we may mount one, and /dev/full."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from evomerge.cli import main
from evomerge.search.journal import DiskFullError, DriverJournalFile
from evomerge.search.storage import close_storage, open_storage
from tests.test_resume import load
from tests.test_search import job_dict
from tests.test_storage import finished_run


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str):
    """A real file system of ``size`` at ``where`` (needs root: skipped otherwise)."""
    where.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill_up(path: Path) -> None:
    """Write ``path`` until the file system is full."""
    with open(path, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0")


def journal_is_whole(path: Path) -> None:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    for line in data.splitlines():
        json.loads(line)


def test_journal_on_a_full_device_raises_disk_full_naming_the_file(tmp_path):
    path = tmp_path / "study.journal"
    path.symlink_to("/dev/full")  # every write there fails with ENOSPC
    backend = DriverJournalFile(path)
    try:
        with pytest.raises(DiskFullError) as info:
            backend.append_logs([{"op_code": 0, "worker_id": "w", "study_name": "s"}])
    finally:
        backend.close()
    text = str(info.value)
    assert text.startswith(f"the disk is full (cannot write {path})")
    assert "evomerge search JOB --resume" in text and "\n" not in text
    assert isinstance(info.value, RuntimeError) and info.value.errno == errno.ENOSPC


def test_partial_append_on_a_full_file_system_is_cut_back(tmp_path):
    with tiny_tmpfs(tmp_path / "fs", "256k") as fs:
        path = fs / "study.journal"
        storage = open_storage(f"journal:{path}", fs, writer=True)
        study = optuna.create_study(study_name="s", storage=storage)
        study.set_user_attr("before", 1)
        size = path.stat().st_size
        fill_up(fs / "filler")
        with pytest.raises(DiskFullError):  # longer than any slack left in the last page
            study.set_user_attr("big", "x" * 20_000)
        assert path.stat().st_size == size  # the part that fitted was cut off again
        journal_is_whole(path)
        (fs / "filler").unlink()
        study.set_user_attr("after", 2)
        close_storage(storage)
        again = optuna.load_study(study_name="s", storage=open_storage(f"journal:{path}", fs))
        assert again.user_attrs == {"before": 1, "after": 2}


def test_cli_says_disk_full_in_one_line_and_exits_2(tmp_path, capsys):
    run, _ = finished_run(tmp_path)
    assert main(["results", str(run), "--csv", "/dev/full"]) == 2  # a real ENOSPC from pandas
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("evomerge results: error: the disk is full")
    assert "run it again" in err


@pytest.mark.slow
def test_search_stops_on_a_full_disk_and_resume_reaches_the_budget(search_suite, tmp_path):
    budget = 24
    with tiny_tmpfs(tmp_path / "fs", "4m") as fs:
        data = job_dict(search_suite, fs / "run", trials=budget, held_out_top_k=0)
        job = tmp_path / "job.yaml"
        job.write_text(yaml.safe_dump(data))
        journal = fs / "run" / "study.journal"
        cmd = [sys.executable, "-m", "evomerge", "search", str(job), "--no-progress"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            study = load(fs / "run", data["name"])
            if study and len(study.get_trials(states=(TrialState.COMPLETE,))) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        fill_up(fs / "filler")  # something else fills the disk during the search
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 2, out + err
        assert "Traceback" not in err and "Errno" not in err, err
        lines = [line for line in err.splitlines() if "error" in line.lower()]
        assert len(lines) == 1 and err.strip().endswith(lines[0]), err
        assert lines[0].startswith(
            f"evomerge search: error: the disk is full (cannot write {journal}); free space on "
            f"it, then run `evomerge search {job} --resume` to continue"
        ), err
        journal_is_whole(journal)  # no torn record for the next driver to trip on
        done = len(load(fs / "run", data["name"]).get_trials(states=(TrialState.COMPLETE,)))
        assert 3 <= done < budget

        (fs / "filler").unlink()
        resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        study = load(fs / "run", data["name"])
        assert len(study.get_trials(states=(TrialState.COMPLETE,))) == budget


def test_job_yaml_on_a_full_device_names_the_file(search_suite, tmp_path):
    """A failed write() does not name its file; the driver names job.yaml itself."""
    from evomerge.config import parse_job
    from evomerge.search.study import open_study

    run = tmp_path / "run"
    run.mkdir()
    (run / "job.yaml").symlink_to("/dev/full")
    job = parse_job({**job_dict(search_suite, run), "storage": f"journal:{tmp_path / 'j'}"})
    with pytest.raises(DiskFullError) as caught:
        open_study(job, sampler=optuna.samplers.RandomSampler(), resume=False)
    assert str(run / "job.yaml") in str(caught.value) and "\n" not in str(caught.value)
