"""DFS searches on Ray (slow lane): a DFS search that stores a quality/path-length Pareto front
and fails no-candidate points with their reason, and a PS-then-DFS job killed mid-phase-2 and
resumed (phase 1 is not re-run, phase 2 meets its budget exactly)."""

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

from evomerge.cli import main
from evomerge.config import parse_job
from evomerge.recipe import Recipe
from evomerge.runs.results import best_trials, pareto_front, run_studies
from evomerge.search.driver import Search, run_search
from evomerge.search.phases import WINNER_ATTR
from evomerge.search.study import counted_trials


def models_of(suite) -> dict:
    root = suite["dir"]
    return {"base": {"path": str(root / "base")},
            "experts": {t: {"path": str(root / "experts" / t)} for t in ("a", "b")}}


def dfs_job_dict(suite, run_dir) -> dict:
    data = str(suite["dir"] / "data" / "a")
    return {
        "name": "dfs-pareto",
        "run_dir": str(run_dir),
        "models": models_of(suite),
        "search": {
            "space": {"name": "dfs", "repeats": 2, "max_path_length": 10},
            "sampler": {"name": "nsga2", "population_size": 4, "seed": 0},
            "trials": 14,
            "held_out_top_k": 2,
        },
        "evaluators": [{"name": "entropy", "data": data, "limit": 16, "batch_size": 16},
                       {"name": "cost", "latency": True, "latency_tokens": 2}],
        "objectives": [{"metric": "entropy/a", "direction": "minimize"},
                       {"metric": "cost/layers", "direction": "minimize"}],
        "resources": {"workers": 2, "num_cpus": 1},
    }


def test_dfs_search_stores_a_pareto_front_and_failed_points(ray_local, search_suite, tmp_path):
    job = parse_job(dfs_job_dict(search_suite, tmp_path / "run"))
    search = Search(job)
    study = search.prepare()
    space = search.space
    assert space.T == 16
    empty = {n: (-0.5 if n.startswith("dfs/i/") else 1.0) for n in space.distributions()}
    long = {**empty, **{f"dfs/i/{t}": 0.5 for t in range(space.T)}}
    study.enqueue_trial(empty, user_attrs={"case": "empty"})
    study.enqueue_trial(long, user_attrs={"case": "long"})
    search.run()

    assert counted_trials(study) == 14
    trials = {t.user_attrs.get("case"): t for t in study.trials}
    assert trials["empty"].state == TrialState.FAIL
    assert "every indicator dfs/i/0..15 is <= 0" in trials["empty"].user_attrs["error"]
    assert trials["long"].state == TrialState.FAIL
    assert "the path has 16 layers, more than search.space.max_path_length 10" in (
        trials["long"].user_attrs["error"])
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) >= 8
    assert {t.user_attrs.get("baseline") for t in done} >= {"init", "path:b"}
    for t in done:
        recipe = Recipe.from_dict(t.user_attrs["recipe"])
        assert recipe.kind == "dfs" and 1 <= len(recipe.layers) <= 10
        assert t.user_attrs["metrics"]["cost/layers"] == len(recipe.layers) == t.values[1]
        assert t.user_attrs["metrics"]["cost/ms_per_token"] > 0
    init = next(t for t in done if t.user_attrs.get("baseline") == "init")
    assert [tuple(x) for x in init.user_attrs["recipe"]["layers"]] == [("a", i) for i in range(4)]

    front = best_trials(study, job)
    assert front and {t.number for t in front} == {
        t.number for t in pareto_front(done, ["minimize", "minimize"])}
    assert {t.number for t in front} == {t.number for t in study.best_trials}
    shortest = min(t.values[1] for t in done)
    assert shortest in {t.values[1] for t in front}  # the shallowest path is always on it
    held = {k for k in study.user_attrs if k.startswith("held_out:")}
    assert {f"held_out:{t.number}" for t in sorted(front, key=lambda t: t.number)[:2]} <= held


def ps_dfs_job_dict(suite, run_dir, *, dfs_trials: int) -> dict:
    data = str(suite["dir"] / "data" / "a")
    return {
        "name": "psdfs",
        "run_dir": str(run_dir),
        "models": models_of(suite),
        "search": {
            "space": {"name": "parameter", "method": "task_arithmetic"},
            "sampler": {"name": "cmaes", "popsize": 4, "seed": 0, "start": "uniform"},
            "trials": 6,
            "held_out_top_k": 1,
            "then": {
                "space": {"name": "dfs", "repeats": 1, "max_path_length": 8,
                          "too_long": "truncate", "fix_first": True},
                "sampler": {"name": "nsga2", "population_size": 4, "seed": 0},
                "trials": dfs_trials,
                "held_out_top_k": 1,
                "objectives": [{"metric": "entropy/a", "direction": "minimize"},
                               {"metric": "cost/layers", "direction": "minimize"}],
            },
        },
        "evaluators": [{"name": "entropy", "data": data, "limit": 8, "batch_size": 8},
                       {"name": "cost"}],
        "objectives": [{"metric": "entropy/a", "direction": "minimize"}],
        "resources": {"workers": 2, "num_cpus": 1},
    }


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "evomerge", *args], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def load(run_dir, name) -> optuna.Study | None:
    path = run_dir / "study.journal"
    if not path.exists():
        return None
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(path)))
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def complete(study: optuna.Study | None) -> list:
    return [] if study is None else study.get_trials(states=(TrialState.COMPLETE,))


def test_ps_then_dfs_resumes_the_right_phase(ray_local, search_suite, tmp_path, capsys):
    """The driver, a subprocess on the session's Ray (starting a Ray costs more than the whole
    search), is killed in phase 2; the resumed run here continues phase 2 only."""
    budget = 30  # tiny models evaluate in milliseconds: leave room to kill the driver in phase 2
    run = tmp_path / "run"
    path = tmp_path / "job.yaml"
    data = ps_dfs_job_dict(search_suite, run, dfs_trials=budget)
    path.write_text(yaml.safe_dump(data))
    address = ray_local.get_runtime_context().gcs_address
    proc = cli("search", str(path), "--no-progress", "--address", address)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(complete(load(run, "psdfs/dfs"))) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ps = load(run, "psdfs/ps")
    ps_trials = [(t.number, t.state, t.params) for t in ps.trials]
    assert counted_trials(ps) == 6
    before = {t.number: t.params for t in complete(load(run, "psdfs/dfs"))}
    assert 3 <= len(before) < budget

    run_search(parse_job(data), resume=True, progress=False)
    ps, dfs = load(run, "psdfs/ps"), load(run, "psdfs/dfs")
    assert [(t.number, t.state, t.params) for t in ps.trials] == ps_trials  # not re-run
    assert counted_trials(dfs) == budget == len(complete(dfs))
    assert all({t.number: t.params for t in complete(dfs)}[n] == p for n, p in before.items())

    # the winner: phase 1's best on the fitness split, model A of phase 2 (its init baseline)
    best = ps.best_trial
    winner = dfs.user_attrs[WINNER_ATTR]
    assert winner["trial"] == best.number and winner["recipe"] == best.user_attrs["recipe"]
    init = next(t for t in complete(dfs) if t.user_attrs.get("baseline") == "init")
    recipe = Recipe.from_dict(init.user_attrs["recipe"])
    assert recipe.sources["ps"] == Recipe.from_dict(best.user_attrs["recipe"])
    assert recipe.layers == tuple(("ps", i) for i in range(4)) and recipe.embed_from == "ps"
    assert init.values[0] == pytest.approx(best.values[0], rel=1e-5)  # the same model

    # both studies in the results; a Pareto front of entropy vs path length in phase 2
    studies = run_studies(run)
    assert [s.study_name for s, _ in studies] == ["psdfs/ps", "psdfs/dfs"]
    job2 = studies[1][1]
    front = best_trials(dfs, job2)
    assert front and all(t.state == TrialState.COMPLETE for t in front)
    capsys.readouterr()
    assert main(["results", str(run)]) == 0
    table = capsys.readouterr().out
    assert "== study psdfs/ps ==" in table and "== study psdfs/dfs ==" in table
    assert main(["results", str(run), "--study", "ps"]) == 0
    one = capsys.readouterr().out
    assert "== study" not in one and "uniform" in one and "path:a" not in one
    assert main(["results", str(run), "--study", "psdfs/dfs"]) == 0
    assert "path:a" in capsys.readouterr().out
