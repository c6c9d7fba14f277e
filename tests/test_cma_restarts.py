"""CMA-ES with IPOP restarts: runs end, populations grow, the state survives a resume."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from evomerge.cma_restarts import GEN_KEY, IpopCmaSampler, from_unit, to_unit
from evomerge.config import CmaesConfig, ConfigError, parse_job
from evomerge.samplers import make_cmaes

SPACE = {"a": FloatDistribution(0.0, 1.0), "b": FloatDistribution(1e-3, 10.0, log=True)}
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _sample(sampler: IpopCmaSampler, study: optuna.Study, objective, n: int) -> None:
    for _ in range(n):
        trial = study.ask(SPACE)
        study.tell(trial, objective(trial.params))


def _runs(study: optuna.Study) -> list[int]:
    return [t.system_attrs[GEN_KEY][0] for t in study.trials]


def test_unit_mapping_round_trips_linear_and_log() -> None:
    for dist in SPACE.values():
        for value in (dist.low, dist.high, 0.5):
            assert from_unit(to_unit(value, dist), dist) == pytest.approx(value)
    assert from_unit(1.7, SPACE["a"]) == 1.0 and from_unit(-1, SPACE["b"]) == 1e-3
    assert to_unit(0.1, SPACE["b"]) == pytest.approx(2 / 4)  # 1e-3 .. 10 is 4 decades


def test_pinned_parameter_low_equals_high_is_searched_around() -> None:
    """Bounds with low == high (e.g. weight {low: 0, high: 0}) once divided by zero."""
    pinned = FloatDistribution(0.0, 0.0)
    assert to_unit(0.0, pinned) == 0.5 and from_unit(0.9, pinned) == 0.0
    space = {**SPACE, "c": pinned}
    sampler = IpopCmaSampler(space, popsize=4, seed=0, restarts=1, patience=2, x0={"a": 0.5, "b": 1.0, "c": 0.0})
    study = optuna.create_study(sampler=sampler, direction="maximize")
    for _ in range(12):
        trial = study.ask(space)
        study.tell(trial, -trial.params["a"])
    assert {t.params["c"] for t in study.trials} == {0.0}


def test_flat_objective_restarts_with_growing_population_up_to_the_limit() -> None:
    sampler = IpopCmaSampler(SPACE, popsize=4, seed=0, restarts=2, patience=3)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    _sample(sampler, study, lambda p: 0.5, 4 * 4 + 8 * 4 + 16 * 6)
    assert sampler.state is not None
    assert sampler.state.history == [(0, 4), (1, 8), (2, 16)]
    runs = _runs(study)
    assert runs == sorted(runs) and set(runs) == {0, 1, 2}
    assert runs.count(0) == 4 * 4 and runs.count(1) == 8 * 4  # 1 + patience generations each
    # a restart draws a new mean: run 1's first generation is not centred where run 0 ended
    first = [t.params["a"] for t in study.trials if t.system_attrs[GEN_KEY] == [1, 0]]
    assert len(first) == 8


def test_improving_objective_does_not_restart_and_converges() -> None:
    sampler = IpopCmaSampler(SPACE, popsize=6, sigma0=0.3, seed=1, restarts=3, patience=5)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    _sample(sampler, study, lambda p: -((p["a"] - 0.3) ** 2) - (p["b"] / 10 - 0.01) ** 2, 150)
    assert study.best_params["a"] == pytest.approx(0.3, abs=0.05)
    assert study.best_params["b"] == pytest.approx(0.1, rel=0.5)
    assert study.best_value > -1e-3


def test_state_is_restored_by_a_new_sampler_on_the_same_storage(tmp_path) -> None:
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "s.journal")))
    first = IpopCmaSampler(SPACE, popsize=4, seed=0, restarts=2, patience=2)
    study = optuna.create_study(storage=storage, sampler=first, study_name="s")
    _sample(first, study, lambda p: 1.0, 4 * 3 + 4 * 2 + 2)  # into run 1
    before = first.state
    assert before is not None and before.run == 1

    again = IpopCmaSampler(SPACE, popsize=4, seed=0, restarts=2, patience=2)
    resumed = optuna.load_study(study_name="s", storage=storage, sampler=again)
    _sample(again, resumed, lambda p: 1.0, 1)
    assert again.state is not None
    assert (again.state.run, again.state.optimizer.generation) == (
        before.run, before.optimizer.generation
    )
    assert again.state.history == before.history
    # asks are seeded by trial number: the resumed sampler does not repeat an earlier candidate
    params = [tuple(t.params.values()) for t in resumed.trials]
    assert len(set(params)) == len(params)


def test_config_chooses_the_restart_sampler_and_refuses_bad_values() -> None:
    plain = make_cmaes(CmaesConfig(name="cmaes"), SPACE)
    assert isinstance(plain, optuna.samplers.CmaEsSampler)
    ipop = make_cmaes(CmaesConfig(name="cmaes", restarts=2, restart_patience=4), SPACE)
    assert isinstance(ipop, IpopCmaSampler)
    job = {
        "name": "x",
        "models": {"base": {"path": "b"}, "experts": {"e": {"path": "e"}}},
        "search": {"sampler": {"name": "cmaes", "restarts": -1}},
        "evaluators": [{"name": "cost"}],
        "objectives": [{"metric": "cost/params", "direction": "minimize"}],
    }
    with pytest.raises(ConfigError, match="restarts"):
        parse_job(job)
    job["search"]["sampler"] = {"name": "cmaes", "restart": 2}
    with pytest.raises(ConfigError, match="restarts"):  # the unknown key's suggestion
        parse_job(job)


def test_start_point_is_the_first_mean() -> None:
    start = {"a": 0.1, "b": 5.0}
    for restarts in (0, 1):
        cfg = CmaesConfig(name="cmaes", popsize=6, sigma0=0.01, restarts=restarts,
                          start="uniform")
        study = optuna.create_study(sampler=make_cmaes(cfg, SPACE, start))
        trials = [study.ask(SPACE) for _ in range(6)]
        assert all(t.params["a"] == pytest.approx(0.1, abs=0.05) for t in trials)
        assert all(t.params["b"] == pytest.approx(5.0, rel=0.5) for t in trials)
    centered = make_cmaes(CmaesConfig(name="cmaes", sigma0=0.01), SPACE, start)  # the default
    t = optuna.create_study(sampler=centered).ask(SPACE)
    assert t.params["a"] == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError, match="cmaes start has parameters"):
        make_cmaes(CmaesConfig(name="cmaes", start="uniform"), SPACE, {"a": 0.1})
