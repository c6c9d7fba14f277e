"""``search.trial_timeout``: a worker whose call runs past it is killed and restarted, its trial
(or held-out entry) fails with "timed out after N s", and the search goes on. Real Ray actors
that hang (a :class:`MergeWorker` subclass), real journal files, the tiny search suite."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from optuna.trial import TrialState

from evomerge.config import parse_job
from evomerge.search.driver import run_search
from evomerge.search.heldout import stored_held_out
from evomerge.search.study import counted_trials
from evomerge.search.worker import MergeWorker
from evomerge.strict import ConfigError
from tests.test_faults import first
from tests.test_search import job_dict

TIMEOUT = 4.0  # tiny models evaluate in well under a second, even on 2 busy cores


def hanging(hung: Path, served: Path, *, method: str = "evaluate") -> type:
    """Its first ``method`` call anywhere writes ``hung`` = ``{pid, recipe}`` and never returns.
    The restarted actor writes ``served`` at its first evaluate; until then the healthy worker
    serves 3 calls alone, then waits for it up to 2.5 s per call (inside the timeout), so the
    budget does not run out before the restarted worker (~20 s to reload here) serves."""

    class Hangs(MergeWorker):
        def __init__(self, job_json: str) -> None:
            super().__init__(job_json)
            self.served_alone = 0
            self.restarted = hung.exists()

        def _hang_once(self, recipe_json: str) -> None:
            if first(hung.with_suffix(".claimed")):
                hung.write_text(json.dumps({"pid": os.getpid(), "recipe": recipe_json}))
                while True:
                    time.sleep(1)

        def evaluate(self, recipe_json: str, fraction: float = 1.0) -> dict[str, Any]:
            if method == "evaluate":
                self._hang_once(recipe_json)
                if self.restarted:
                    served.touch()
                elif not served.exists():
                    self.served_alone += 1
                    deadline = time.time() + TIMEOUT - 1.5  # each wait well inside the limit
                    while self.served_alone > 3 and not served.exists() and time.time() < deadline:
                        time.sleep(0.05)
            return super().evaluate(recipe_json, fraction)

        def evaluate_held_out(self, recipe_json: str) -> dict[str, Any]:
            if method == "evaluate_held_out":
                self._hang_once(recipe_json)
            return super().evaluate_held_out(recipe_json)

    return Hangs


def gone(pid: int, within: float = 30.0) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def timeout_job(suite, tmp_path, **search):
    base = {
        "trials": 10,
        "held_out_top_k": 0,
        "baselines": False,
        "trial_timeout": TIMEOUT,
        "sampler": {"name": "random", "seed": 0},
    }
    return parse_job(job_dict(suite, tmp_path / "run", **{**base, **search}))


@pytest.mark.parametrize("value", [0, -1.5])
def test_trial_timeout_must_be_positive(search_suite, tmp_path, value):
    with pytest.raises(ConfigError) as err:
        timeout_job(search_suite, tmp_path, trial_timeout=value)
    [line] = str(err.value).splitlines()
    assert line.startswith("job config: search.trial_timeout: ") and "greater than 0" in line


def test_trial_timeout_defaults_to_off(search_suite, tmp_path):
    assert parse_job(job_dict(search_suite, tmp_path)).search.trial_timeout is None


def test_hung_worker_is_killed_and_its_trial_failed(ray_local, search_suite, tmp_path):
    hung, served = tmp_path / "hung.json", tmp_path / "served"
    job = timeout_job(search_suite, tmp_path, trials=20)
    t0 = time.time()
    study = run_search(job, progress=False, worker_class=hanging(hung, served))
    wall = time.time() - t0
    held = json.loads(hung.read_text())
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1, [t.user_attrs.get("error") for t in failed]
    error = failed[0].user_attrs["error"]
    assert error.startswith("timed out after 4 s (search.trial_timeout)"), error
    assert failed[0].user_attrs["recipe"] == json.loads(held["recipe"])
    ran = (failed[0].datetime_complete - failed[0].datetime_start).total_seconds()
    assert TIMEOUT <= ran < TIMEOUT + 10, ran  # given up on time, not at the end of the run
    assert gone(held["pid"]), "the hung worker process was not killed"
    assert counted_trials(study) == 20
    done = study.get_trials(states=(TrialState.COMPLETE,))
    pids = {t.user_attrs["timing"]["pid"] for t in done}
    assert len(done) == 19 and held["pid"] not in pids and len(pids) == 2  # restarted, serving
    assert served.exists() and wall < 150


def test_hung_held_out_call_is_failed_not_retried(ray_local, search_suite, tmp_path):
    hung, served = tmp_path / "hung.json", tmp_path / "served"
    job = timeout_job(search_suite, tmp_path, trials=4, held_out_top_k=1)
    study = run_search(
        job, progress=False, worker_class=hanging(hung, served, method="evaluate_held_out")
    )
    held = json.loads(hung.read_text())
    assert gone(held["pid"])
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4
    entries = stored_held_out(study)
    errors = [e["error"] for e in entries.values() if "error" in e]
    assert len(errors) == 1 and errors[0].startswith("timed out after 4 s"), entries
    assert all(e["metrics"] for e in entries.values() if "error" not in e)
