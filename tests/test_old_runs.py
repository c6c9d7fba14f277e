"""A run folder written by the previous version (tests/data/old_runs, killed mid-search) resumes
with this one: same study, earlier trials untouched, the budget met exactly."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from evomerge.cli import main

pytestmark = pytest.mark.slow  # real searches on a Ray cluster: the full lane

OLD_RUNS = Path(__file__).parent / "data" / "old_runs"
BUDGET = 16


def place(name: str, suite_dir: Path, run: Path) -> Path:
    """Copy an old run folder to ``run``, pointing its model, data and run paths here."""
    run.mkdir()
    for file in ("job.yaml", "study.journal"):
        text = (OLD_RUNS / name / file).read_text()
        text = text.replace("/tmp/OLDSUITE/run", str(run)).replace("/tmp/OLDSUITE", str(suite_dir))
        (run / file).write_text(text)
    return run / "job.yaml"


def trials(run: Path) -> list[optuna.trial.FrozenTrial]:
    storage = JournalStorage(JournalFileBackend(str(run / "study.journal")))
    return optuna.load_study(study_name="oldrun", storage=storage).trials


def resume(job: Path) -> int:
    return main(["search", str(job), "--resume", "--no-progress"])


def check_resumed(run: Path, before: dict[int, dict]) -> None:
    after = trials(run)
    assert not [t for t in after if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    interrupted = [t for t in after if t.user_attrs.get("interrupted")]
    assert len(after) - len(interrupted) == BUDGET
    assert {t.number: t.params for t in after if t.number in before} == before
    storage = JournalStorage(JournalFileBackend(str(run / "study.journal")))
    attrs = optuna.load_study(study_name="oldrun", storage=storage).user_attrs
    assert any(k.startswith("held_out:") and "metrics" in v for k, v in attrs.items())


def test_a_run_of_the_previous_version_resumes(search_suite, tmp_path):
    job = place("cmaes", search_suite["dir"], tmp_path / "run")
    old = trials(tmp_path / "run")
    before = {t.number: t.params for t in old if t.state == TrialState.COMPLETE}
    assert len(before) == 11 and any(t.state == TrialState.RUNNING for t in old)
    assert resume(job) == 0
    check_resumed(tmp_path / "run", before)


def test_pickled_restart_state_needs_the_opt_in(search_suite, tmp_path, capsys, monkeypatch):
    job = place("ipop", search_suite["dir"], tmp_path / "run")
    before = {t.number: t.params for t in trials(tmp_path / "run")
              if t.state == TrialState.COMPLETE}
    monkeypatch.delenv("EVOMERGE_TRUST_PICKLED_STATE", raising=False)
    capsys.readouterr()
    assert resume(job) == 2
    # the state is read when the sampler resumes, after the workers started: their phase log
    # line ("evomerge: workers 1/1 ready") comes first; the error itself is one line
    lines = capsys.readouterr().err.splitlines()
    errors = [line for line in lines if line.startswith("evomerge search: error:")]
    assert len(errors) == 1 and all(line.startswith("evomerge") for line in lines), lines
    assert "EVOMERGE_TRUST_PICKLED_STATE=1" in errors[0] and "evomerge:cma:state" in errors[0]
    monkeypatch.setenv("EVOMERGE_TRUST_PICKLED_STATE", "1")
    assert resume(job) == 0
    check_resumed(tmp_path / "run", before)
