"""Fewer evaluations (issue 18): coarse to fine, the CMA-ES start from AdaMerging, the GP sampler.

Sampler-level tests run real Optuna studies on a known objective; the search tests run real Ray
workers on tiny models (coarse to fine and its resume, GP), and ``start: adamerging`` runs
AdaMerging on the tiny toy suite.
"""

from __future__ import annotations

import threading

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from evomerge.config import CmaesConfig, ConfigError, parse_job
from evomerge.search.cma_restarts import GEN_KEY, to_unit
from evomerge.search.coarse import (
    PHASE_KEY,
    START_ATTR,
    CoarseToFineSampler,
    coarse_groups,
    is_coarse,
)
from evomerge.search.samplers import make_cmaes
from tests.test_search import job_dict
from tests.toy_fixtures import toy_suite_tiny  # noqa: F401

optuna.logging.set_verbosity(optuna.logging.WARNING)
# 2 models x 4 layer groups x (weight, density), plus a kind-free global parameter
SPACE = {f"{p}/{m}/{g}": FloatDistribution(0.0, 1.0) for p in "wd" for m in "ab"
         for g in range(4)}
TARGET = {n: 0.2 + 0.15 * int(n.split("/")[2]) for n in SPACE}  # best values differ by layer


def score(params: dict[str, float]) -> float:
    return -sum((params[n] - TARGET[n]) ** 2 for n in SPACE)


def c2f(**kw) -> CoarseToFineSampler:
    cfg = CmaesConfig(name="cmaes", sigma0=0.05, popsize=8, seed=3,
                      coarse={"trials": 12, "sigma0": 0.3, "popsize": 4}, **kw)
    sampler = make_cmaes(cfg, SPACE)
    assert isinstance(sampler, CoarseToFineSampler)
    return sampler


def drive(study: optuna.Study, n: int) -> None:
    for _ in range(n):
        trial = study.ask(SPACE)
        study.tell(trial, score(trial.params))


def phase(t) -> str | None:
    return t.system_attrs.get(PHASE_KEY)


def test_coarse_trials_share_values_then_fine_starts_at_the_winner() -> None:
    study = optuna.create_study(sampler=c2f(), direction="maximize")
    study.enqueue_trial({n: 0.5 for n in SPACE}, user_attrs={"baseline": "uniform"})
    drive(study, 1 + 12 + 24)
    trials = study.trials
    assert phase(trials[0]) is None  # an enqueued baseline never reaches the sampler
    coarse = [t for t in trials if phase(t) == "coarse"]
    fine = [t for t in trials if phase(t) == "fine"]
    assert len(coarse) == 12 and len(fine) == 24
    assert max(t.number for t in coarse) < min(t.number for t in fine)
    groups = coarse_groups(SPACE)
    assert set(groups) == {"w/a", "w/b", "d/a", "d/b"}
    for t in coarse:  # every layer group of a model shares the model's value
        assert is_coarse(t.params, groups)
        assert len({t.params["w/a/0"], t.params["w/b/0"], t.params["d/a/0"]}) == 3
    start = study.user_attrs[START_ATTR]
    best = max((t for t in trials[:13]), key=lambda t: t.value)  # baselines are coarse points
    assert start["trial"] == best.number and start["params"] == best.params
    first = [t for t in fine if t.system_attrs[GEN_KEY] == [0, 0]]
    assert len(first) == 8
    x = np.array([[to_unit(t.params[n], SPACE[n]) for n in sorted(SPACE)] for t in first])
    x0 = np.array([to_unit(best.params[n], SPACE[n]) for n in sorted(SPACE)])
    assert np.abs(x.mean(0) - x0).max() < 0.06  # centred on the winner (sigma 0.05, 8 points)
    assert 0.02 < x.std(0).mean() < 0.08  # with the fine step, not the coarse one (0.3)
    assert all(not is_coarse(t.params, groups) for t in fine)  # groups differ now
    assert max(t.value for t in fine) > best.value  # and refining per layer pays here


@pytest.mark.parametrize("before", [5, 13, 22])  # mid-coarse, at the switch, mid-fine
def test_a_resumed_sampler_asks_what_an_uninterrupted_one_asks(tmp_path, before) -> None:
    def run(storage, resume: bool) -> list:
        study = optuna.create_study(storage=storage, sampler=c2f(), direction="maximize")
        study.enqueue_trial({n: 0.5 for n in SPACE}, user_attrs={"baseline": "uniform"})
        drive(study, before)
        if resume:  # a new driver: a new sampler, everything else read from the study
            study = optuna.load_study(study_name=study.study_name, storage=storage,
                                      sampler=c2f())
        drive(study, 34 - before)
        return [(phase(t), t.params) for t in study.trials]

    journal = JournalStorage(JournalFileBackend(str(tmp_path / "s.journal")))
    resumed = run(journal, resume=True)
    assert resumed == run(optuna.storages.InMemoryStorage(), resume=False)
    assert [p for p, _ in resumed].count("coarse") == 12


def test_start_seeds_the_coarse_mean_and_restarts_reach_the_fine_phase() -> None:
    start = {n: 0.9 for n in SPACE}
    sampler = make_cmaes(CmaesConfig(name="cmaes", start="uniform", restarts=1, coarse={
        "trials": 4, "sigma0": 0.01}), SPACE, start)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    drive(study, 4)
    assert all(t.params["w/a/2"] == pytest.approx(0.9, abs=0.05) for t in study.trials)
    drive(study, 1)
    assert sampler.fine is not None and sampler.fine._restarts == 1
    assert sampler.fine._sigma0 == pytest.approx(0.005)  # default: half the coarse step


JOB = {"name": "x", "models": {"base": {"path": "b"}, "experts": {"e": {"path": "e"}}},
       "evaluators": [{"name": "cost"}],
       "objectives": [{"metric": "cost/params", "direction": "minimize"}]}


@pytest.mark.parametrize(("sampler", "space", "message"), [
    ({"name": "cmaes", "sigma0": 0.3, "coarse": {"trials": 8, "sigma0": 0.2}}, None,
     "search.sampler.sigma0: 0.3 is larger than coarse.sigma0"),
    ({"name": "cmaes", "coarse": {"trials": 1}}, None, "search.sampler.coarse.trials"),
    ({"name": "cmaes", "coarse": {"trial": 8}}, None, "Did you mean 'trials'"),
    ({"name": "cmaes", "start": "adamerge"}, None, "adamerging"),
    ({"name": "gp", "n_startup": 3}, None, "n_startup_trials"),
    ({"name": "gpp"}, None, "'gp'"),
])
def test_bad_config_is_one_line_naming_the_key(sampler, space, message) -> None:
    job = {**JOB, "search": {"sampler": sampler, **({"space": space} if space else {})}}
    with pytest.raises(ConfigError, match=message) as err:
        parse_job(job)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("space", "sampler", "message"), [
    ({"layer_groups": 1}, {"coarse": {"trials": 8}},
     "search.sampler.coarse: the space has no per-layer structure to refine"),
    ({"method": "linear", "layer_groups": 2}, {"start": "adamerging"},
     "search.sampler.start: adamerging merges task vectors into models.base"),
    ({"method": "tsv_m", "layer_groups": 2}, {"start": "adamerging"},
     "method 'tsv_m' has none"),
])
def test_search_refuses_before_any_start_up(tmp_path, space, sampler, message) -> None:
    """Model paths that do not exist: the refusal comes before anything loads."""
    from evomerge.search.driver import Search

    experts = {"e": {"path": str(tmp_path / "no-e")}, "f": {"path": str(tmp_path / "no-f")}}
    base = {} if space.get("method") == "linear" else {"base": {"path": str(tmp_path / "b")}}
    job = parse_job({**JOB, "run_dir": str(tmp_path / "run"), "models": {**base, "experts":
                     experts}, "search": {"space": {"name": "parameter", **space},
                                          "sampler": {"name": "cmaes", **sampler}}})
    with pytest.raises(ValueError, match=message) as err:
        Search(job).prepare()
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()
    dfs = {f"dfs/i/{i}": FloatDistribution(0, 1) for i in range(4)}
    with pytest.raises(ValueError, match="search.space.name is dfs"):
        make_cmaes(CmaesConfig(name="cmaes", coarse={"trials": 4}), dfs)


# -- real searches: Ray workers, tiny models ----------------------------------------------------
def coarse_job(suite, run_dir, trials: int) -> dict:
    job = job_dict(suite, run_dir, trials=trials, held_out_top_k=0,
                   space={"name": "parameter", "method": "ties", "layer_groups": 4},
                   sampler={"name": "cmaes", "seed": 1, "popsize": 4, "sigma0": 0.05,
                            "coarse": {"trials": 6, "sigma0": 0.3, "popsize": 4}})
    job["name"], job["resources"]["workers"] = "c2f", 1  # one worker: every ask sees every tell
    return job


def test_search_runs_coarse_then_fine_and_resumes_without_repeating(
    ray_local, search_suite, tmp_path
) -> None:
    from evomerge.search.driver import run_search

    run = tmp_path / "run"
    first = run_search(parse_job(coarse_job(search_suite, run, 8)), progress=False)
    before = {t.number: (phase(t), t.params) for t in first.trials}
    baselines = sum("baseline" in t.user_attrs for t in first.trials)
    assert baselines >= 3  # uniform and each expert alone, enqueued first
    assert sum(p == "coarse" for p, _ in before.values()) == 8 - baselines < 6
    assert START_ATTR not in first.user_attrs
    study = run_search(parse_job(coarse_job(search_suite, run, 18)), resume=True,
                       progress=False)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 18
    assert {t.number: (phase(t), t.params) for t in trials[:8]} == before
    phases = [phase(t) for t in trials]
    assert phases.count("coarse") == 6  # the coarse phase is not repeated, and it ended
    assert phases.count("fine") == 18 - baselines - 6 and phases[-1] == "fine"
    groups = coarse_groups({n: FloatDistribution(0, 1) for n in trials[0].params})
    coarse_space = [t for t in trials if is_coarse(t.params, groups)]
    assert all(phase(t) != "fine" for t in coarse_space)  # every fine trial refines layers
    best = min(coarse_space, key=lambda t: t.value)  # entropy: minimised
    assert study.user_attrs[START_ATTR]["trial"] == best.number
    for t in trials:  # results and export read every trial as a full fine-space recipe
        assert len(t.user_attrs["recipe"]["models"]["a"]["weight"]) == 4


def test_gp_runs_a_small_search(ray_local, search_suite, tmp_path) -> None:
    from evomerge.search.driver import run_search
    from evomerge.search.loop import ask_ahead

    data = job_dict(search_suite, tmp_path / "run", trials=8, held_out_top_k=0,
                    sampler={"name": "gp", "n_startup_trials": 3, "seed": 0},
                    space={"name": "parameter", "method": "ties", "layer_groups": 2})
    job = parse_job(data)
    assert ask_ahead(job, 64) == 0  # every GP ask conditions on every result so far
    study = run_search(job, progress=False)
    assert isinstance(study.sampler, optuna.samplers.GPSampler)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 8
    asked = [t for t in done if "baseline" not in t.user_attrs]
    assert len(asked) >= 4 and len({tuple(t.params.values()) for t in asked}) == len(asked)


def test_start_adamerging_is_the_first_mean_and_a_trial(toy_suite_tiny, tmp_path) -> None:  # noqa: F811
    from evomerge.search.driver import Search
    from evomerge.search.start import START_ATTR as ADA

    tasks = sorted(p.name for p in (toy_suite_tiny / "experts").iterdir())

    def job(steps: int):
        return parse_job({
            "name": "ada", "run_dir": str(tmp_path / "run"),
            "models": {"base": {"path": str(toy_suite_tiny / "base")},
                       "experts": {t: {"path": str(toy_suite_tiny / "experts" / t)}
                                   for t in tasks}},
            "search": {"space": {"name": "parameter", "method": "task_arithmetic",
                                 "layer_groups": 2, "bounds": {"weight": {"low": 0.2,
                                                                          "high": 1.0}}},
                       "sampler": {"name": "cmaes", "start": "adamerging", "sigma0": 1e-6,
                                   "popsize": 4}, "trials": 8},
            "evaluators": [{"name": "accuracy", "data": str(toy_suite_tiny / "data" / t),
                            "limit": 8} for t in tasks],
            "objectives": [{"weights": {f"accuracy/{t}": 1 for t in tasks}}],
            "adamerging": {"granularity": "layer", "steps": steps, "lr": 0.05,
                           "batch_size": 8},
        })

    search = Search(job(4))
    with pytest.warns(UserWarning, match="clipped to the search bounds"):
        study = search.prepare()
    stored = study.user_attrs[ADA]
    lambdas = stored["lambdas"]
    assert set(lambdas) == set(tasks) and all(len(v) == 2 for v in lambdas.values())
    raw = {f"w/{t}/{g}": lambdas[t][g] for t in tasks for g in range(2)}  # 2 layers, 2 groups
    # entropy pulls every lambda of this tiny suite from 0.3 towards 0 (the base): all clipped
    assert stored["params"] == {n: max(v, 0.2) for n, v in raw.items()}
    assert stored["clipped"] == {n: v for n, v in raw.items() if v < 0.2} == raw
    waiting = study.get_trials(states=(TrialState.WAITING,))
    ada = [t for t in waiting if t.user_attrs.get("baseline") == "adamerging"]
    assert len(ada) == 1 and ada[0].system_attrs["fixed_params"] == stored["params"]
    for _ in waiting:  # the enqueued trials first, then CMA-ES's first sample
        study.ask(search.space.distributions())
    sampled = study.ask(search.space.distributions())
    assert sampled.params == pytest.approx(stored["params"], abs=1e-3)  # the mean, sigma 1e-6
    search.close()

    # a resume reads the stored start: with 10**8 steps a second AdaMerging would never end
    resumed = Search(job(10**8), resume=True)
    thread = threading.Thread(target=resumed.prepare, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the resumed driver ran AdaMerging again"
    again = resumed.study
    assert again is not None and again.user_attrs[ADA] == stored
    held = [t for t in again.trials if t.user_attrs.get("baseline") == "adamerging"
            and not t.user_attrs.get("interrupted")]
    assert len(held) == 1  # its re-run after the interruption; not enqueued twice
    resumed.close()
