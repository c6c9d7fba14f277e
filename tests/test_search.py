"""End-to-end searches: real Ray actors, real Optuna studies in a journal file, tiny models."""

from __future__ import annotations

import threading
import time

import optuna
import pytest
from optuna.trial import TrialState

from evomerge.config import parse_job
from evomerge.runs.results import best_trials, open_run, pareto_front, results_frame
from evomerge.search.driver import run_search
from evomerge.search.heldout import stored_held_out
from evomerge.search.objectives import objective_values
from evomerge.search.study import counted_trials


def job_dict(suite, run_dir, **search) -> dict:
    tasks = suite["expert_tasks"][:2]
    return {
        "name": f"t{int(time.time() * 1e6) % 10**9}",
        "run_dir": str(run_dir),
        "models": {
            "base": {"path": str(suite["dir"] / "base")},
            "experts": {t: {"path": str(suite["dir"] / "experts" / t)} for t in tasks},
        },
        "search": {
            "space": {"name": "parameter", "method": "ties"},
            "sampler": {"name": "cmaes", "popsize": 4, "seed": 1},
            "trials": 10,
            "held_out_top_k": 2,
            **search,
        },
        "evaluators": [
            {
                "name": "entropy",
                "data": str(suite["dir"] / "data" / t),
                "limit": 32,
                "batch_size": 32,
            }
            for t in tasks
        ],
        "objectives": [{"weights": {f"entropy/{t}": 1.0 for t in tasks}, "direction": "minimize"}],
        "resources": {"workers": 2, "num_cpus": 1},
    }


def test_search_completes_and_beats_baselines(ray_local, search_suite, tmp_path):
    job = parse_job(job_dict(search_suite, tmp_path / "run"))
    study = run_search(job, progress=False)
    assert counted_trials(study) == 10
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 10
    baselines = [t for t in done if t.user_attrs.get("baseline")]
    assert {t.user_attrs["baseline"] for t in baselines} >= {
        "uniform",
        *(f"expert:{e}" for e in job.models.experts),
    }
    assert study.best_value <= min(t.value for t in baselines)  # entropy: lower is better
    for t in done:  # every metric, the recipe and the timings are stored
        assert t.value == objective_values(job.objectives, t.user_attrs["metrics"])[0]
        assert t.user_attrs["recipe"]["method"] == "ties"
        assert t.user_attrs["timing"]["merge_s"] >= 0
    held = stored_held_out(study)
    assert study.best_trial.number in held and all(t.number in held for t in baselines)
    assert set(held[study.best_trial.number]["metrics"]) == set(t.user_attrs["metrics"])
    df = results_frame(*open_run(tmp_path / "run"))
    task = search_suite["expert_tasks"][0]
    assert len(df) == 11 and f"held_out:entropy/{task}" in df and f"entropy/{task}" in df
    ref = df.loc["reference:uniform_task_arithmetic"]  # uniform TA, outside the TIES space
    assert ref["state"] == "REFERENCE" and ref[f"held_out:entropy/{task}"] > 0
    # held-out scores the whole test split (``limit`` caps the fitness split only)
    from evomerge.evaluators.entropy import EntropyEvaluator
    from evomerge.merge.workspace import Workspace
    from evomerge.recipe import Recipe

    best = study.best_trial
    ws = Workspace(job.models.sources(), "base", load=job.load)
    model = ws.apply(Recipe.from_dict(best.user_attrs["recipe"]))
    full = EntropyEvaluator(job.evaluators[0].model_copy(update={"limit": None}), split="test")
    assert full.num_examples > 32
    expected = full.evaluate(model, ws.tokenizer)[f"entropy/{task}"]
    assert held[best.number]["metrics"][f"entropy/{task}"] == pytest.approx(expected, rel=1e-5)
    from evomerge.search.references import stored_references

    stored = stored_references(study)["uniform_task_arithmetic"]
    uniform = Recipe.from_dict(stored["recipe"])
    k = len(job.models.experts)
    assert uniform.method == "task_arithmetic"
    assert all(p["weight"] == pytest.approx(1 / k) for p in uniform.models.values())
    fit = EntropyEvaluator(job.evaluators[0]).evaluate(ws.apply(uniform), ws.tokenizer)
    assert stored["metrics"][f"entropy/{task}"] == pytest.approx(fit[f"entropy/{task}"], rel=1e-5)
    held_ta = full.evaluate(ws.apply(uniform), ws.tokenizer)[f"entropy/{task}"]
    assert stored["held_out"][f"entropy/{task}"] == pytest.approx(held_ta, rel=1e-5)


def test_worker_killed_mid_trial_fails_only_that_trial(ray_local, search_suite, tmp_path):
    import ray

    data = job_dict(search_suite, tmp_path / "run", trials=12, held_out_top_k=0)
    for ev in data["evaluators"]:
        ev["limit"] = 600  # slow enough that a kill lands mid-evaluation
    job = parse_job(data)
    box: dict = {}
    (tmp_path / "run").mkdir()

    def target() -> None:
        try:
            box["study"] = run_search(job, progress=False)
        except BaseException as err:  # surfaced by the assertion below
            box["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "run" / "study.journal"))
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            s = optuna.load_study(study_name=job.name, storage=storage)
            if len(s.get_trials(states=(TrialState.COMPLETE,))) >= 3:
                break
        except KeyError:
            pass
        time.sleep(0.2)
    for i in range(2):
        ray.kill(ray.get_actor(f"evomerge:{job.name}:{i}"), no_restart=False)
    thread.join(timeout=300)
    assert "error" not in box, box.get("error")
    study = box["study"]
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert 1 <= len(failed) <= 2
    assert all("worker died" in t.user_attrs["error"] for t in failed)
    assert counted_trials(study) == 12
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 12 - len(failed)


def test_multi_objective_front_is_the_non_dominated_set(ray_local, search_suite, tmp_path):
    data = job_dict(
        search_suite,
        tmp_path / "run",
        trials=12,
        held_out_top_k=0,
        sampler={"name": "nsga2", "population_size": 4, "seed": 0},
    )
    tasks = search_suite["expert_tasks"][:2]
    data["objectives"] = [
        {"metric": f"entropy/{tasks[0]}", "direction": "maximize"},
        {"metric": f"entropy/{tasks[1]}", "direction": "minimize"},
    ]
    job = parse_job(data)
    study = run_search(job, progress=False)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    # recompute every objective from the stored metrics, then brute-force the front
    for t in trials:
        assert t.values == objective_values(job.objectives, t.user_attrs["metrics"])
    brute = {t.number for t in pareto_front(trials, ["maximize", "minimize"])}
    assert {t.number for t in study.best_trials} == brute
    assert {t.number for t in best_trials(study, job)} == brute


def test_fidelity_prunes_and_records_rungs(ray_local, search_suite, tmp_path):
    data = job_dict(
        search_suite,
        tmp_path / "run",
        trials=14,
        held_out_top_k=0,
        sampler={"name": "random", "seed": 3},
        fidelity={"fractions": [0.25, 1.0], "reduction_factor": 2},
    )
    study = run_search(parse_job(data), progress=False)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.PRUNED) >= 1
    assert counted_trials(study) == 14
    for t in study.get_trials(states=(TrialState.PRUNED,)):
        assert [r["fraction"] for r in t.user_attrs["rungs"]] == [0.25]
    promoted = [
        t for t in study.get_trials(states=(TrialState.COMPLETE,)) if "rungs" in t.user_attrs
    ]
    assert promoted and all(len(t.user_attrs["rungs"]) == 2 for t in promoted)


def test_existing_study_needs_resume(ray_local, search_suite, tmp_path):
    data = job_dict(
        search_suite, tmp_path / "run", trials=2, held_out_top_k=0, baselines=False,
        sampler={"name": "random"},
    )
    data["resources"]["workers"] = 1
    job = parse_job(data)
    run_search(job, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        run_search(job, progress=False)
    study = run_search(
        job.model_copy(update={"search": job.search.model_copy(update={"trials": 4})}),
        resume=True,
        progress=False,
    )
    assert counted_trials(study) == 4
