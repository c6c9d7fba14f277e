"""CMA-ES with IPOP restarts: runs end, populations grow, the state survives a resume."""

from __future__ import annotations

import contextlib
import json
import pickle
import sys
from collections.abc import Iterator

import cmaes
import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from evomerge.config import CmaesConfig, ConfigError, parse_job
from evomerge.search.cma_restarts import GEN_KEY, IpopCmaSampler, from_unit, to_unit
from evomerge.search.cma_state import (
    PICKLED_KEY,
    STATE_KEY,
    TRUST_PICKLED_ENV,
    RunState,
    optimizer_state,
    set_optimizer_state,
)
from evomerge.search.samplers import make_cmaes

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
    x0 = {"a": 0.5, "b": 1.0, "c": 0.0}
    sampler = IpopCmaSampler(space, popsize=4, seed=0, restarts=1, patience=2, x0=x0)
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


# -- state in storage: plain JSON, exact, no pickle -------------------------------------------
SPACE5 = {f"x{i}": FloatDistribution(0.0, 1.0) for i in range(5)}


def _bowl(p: dict[str, float]) -> float:
    return sum((i + 1) * (v - 0.3) ** 2 for i, v in enumerate(p.values()))


def _asks(storage, sampler_kw: dict, before: int, after: int, *, resume: bool) -> list:
    """(generation, params) of trials ``before .. before + after``; with ``resume`` a new
    sampler continues from trial ``before``."""
    study = optuna.create_study(storage=storage, sampler=IpopCmaSampler(SPACE5, **sampler_kw))
    name = study.study_name
    for k in range(before + after):
        if resume and k == before:
            sampler = IpopCmaSampler(SPACE5, **sampler_kw)
            study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        trial = study.ask(SPACE5)
        study.tell(trial, _bowl(trial.params) if trial.number < 30 else 9.0)  # then flat: restart
    return [(t.system_attrs[GEN_KEY], t.params) for t in study.trials[before:]]


def test_a_resumed_sampler_asks_what_an_uninterrupted_one_asks(tmp_path) -> None:
    """The pickled state kept only the covariance matrix's upper triangle: full CMA drifted."""
    for separable in (False, True):
        kw = dict(popsize=6, seed=3, restarts=2, patience=2, separable=separable)
        # at a generation's end, in its middle, and both in run 1 (from trial 36) after a restart
        for before, gen in ((30, [0, 5]), (27, [0, 4]), (45, [1, 0]), (48, [1, 1])):
            path = str(tmp_path / f"{separable}-{before}.journal")
            resumed = _asks(JournalStorage(JournalFileBackend(path)), kw, before, 12, resume=True)
            assert resumed[0][0] == gen
            uninterrupted = _asks(optuna.storages.InMemoryStorage(), kw, before, 12, resume=False)
            assert resumed == uninterrupted, (separable, before)


def _optimizer_after(separable: bool, generations: int):
    sampler = IpopCmaSampler(SPACE5, popsize=6, seed=1, separable=separable, restarts=1)
    study = optuna.create_study(sampler=sampler)
    for _ in range(6 * generations + 1):
        trial = study.ask(SPACE5)
        study.tell(trial, _bowl(trial.params))
    assert sampler.state is not None
    return sampler.state.optimizer


@pytest.mark.parametrize("separable", [False, True])
def test_set_optimizer_state_restores_every_attribute_of_the_library(separable) -> None:
    original = _optimizer_after(separable, 4)
    original._funhist_values[:2] = [float("inf"), float("nan")]  # stored as "inf" and "nan"
    saved = json.loads(json.dumps(optimizer_state(original), allow_nan=False))
    kind = cmaes.SepCMA if separable else cmaes.CMA
    assert type(original) is kind and saved["kind"] == kind.__name__
    restored = kind(mean=np.full(5, 0.5), sigma=0.9, bounds=np.tile([0.0, 1.0], (5, 1)),
                    population_size=saved["popsize"])
    set_optimizer_state(restored, saved)
    ours, theirs = vars(restored), vars(original)
    assert ours.keys() == theirs.keys()
    for name in sorted(set(theirs) - {"_rng"}):  # asks reseed the RNG
        a, b = ours[name], theirs[name]
        if isinstance(b, np.ndarray):
            assert np.array_equal(a, b, equal_nan=True) and a.dtype == b.dtype, name
        else:
            assert a == b, name
    for opt in (original, restored):  # and they go on alike, through tell and should_stop
        opt.reseed_rng(5)
    for _ in range(3):
        xs = [original.ask() for _ in range(6)]
        assert all(np.array_equal(x, restored.ask()) for x in xs)
        for opt in (original, restored):
            opt.tell([(x, float(np.sum(x**2))) for x in xs])
            assert not opt.should_stop()


def test_the_stored_state_is_plain_json_in_chunks() -> None:
    sampler = IpopCmaSampler(SPACE5, popsize=6, seed=0, restarts=1, patience=2)
    study = optuna.create_study(sampler=sampler)
    _sample_space(study, lambda p: 1.0, 6 * 3 + 1)  # a flat objective: run 1 starts at trial 18
    assert not any(PICKLED_KEY in t.system_attrs for t in study.trials)
    records, chunked = [], []
    for t in study.trials:
        if STATE_KEY in t.system_attrs:
            chunks = [t.system_attrs[f"{STATE_KEY}:{i}"] for i in range(t.system_attrs[STATE_KEY])]
            assert all(len(c) <= 2000 for c in chunks)
            chunked.append(len(chunks) > 1)
            records.append(json.loads("".join(chunks)))
    assert chunked == [True, True, False]  # B and D are stored once should_stop computed them
    assert [r["run"] for r in records] == [0, 0, 1]
    assert records[-1]["best"] == "inf"  # a new run has no best value yet
    assert records[-1]["history"] == [[0, 6], [1, 12]]
    assert set(records[0]["optimizer"]) == {"kind", "popsize", "mean", "sigma", "C", "B", "D",
                                            "p_sigma", "p_c", "generation", "tolx", "funhist"}

    def strings(x):
        if isinstance(x, dict):
            return [s for v in x.values() for s in strings(v)]
        if isinstance(x, list):
            return [s for v in x for s in strings(v)]
        return [x] if isinstance(x, str) else []

    assert set(strings(records)) <= {"CMA", "inf", "-inf", "nan"}  # no blob of any kind


def _sample_space(study: optuna.Study, objective, n: int) -> None:
    for _ in range(n):
        trial = study.ask(SPACE5)
        study.tell(trial, objective(trial.params))


@contextlib.contextmanager
def _old_module_path() -> Iterator[None]:
    """Pickle ``RunState`` as ``evomerge.cma_restarts.RunState``, its path before issue 11."""
    home = sys.modules[RunState.__module__]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RunState, "__module__", "evomerge.cma_restarts")
        mp.setitem(sys.modules, "evomerge.cma_restarts", home)
        yield


class _PicklingSampler(IpopCmaSampler):
    """Stores its state the way evomerge did before JSON (``git show`` of that ``_save``)."""

    def _save(self, study, trial, state) -> None:
        with _old_module_path():  # the pickle names RunState's module before the subpackages
            blob = pickle.dumps(state).hex()
        assert b"evomerge.cma_restarts".hex() in blob
        chunks = [blob[i : i + 2000] for i in range(0, len(blob), 2000)]
        storage = study._storage
        for i, chunk in enumerate(chunks):
            storage.set_trial_system_attr(trial._trial_id, f"{PICKLED_KEY}:{i}", chunk)
        storage.set_trial_system_attr(trial._trial_id, PICKLED_KEY, len(chunks))


def test_a_pickled_state_is_refused_unless_the_user_opts_in(tmp_path, monkeypatch) -> None:
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "old.journal")))
    old = _PicklingSampler(SPACE5, popsize=6, seed=0, restarts=1, patience=2)
    study = optuna.create_study(storage=storage, sampler=old, study_name="old")
    _sample_space(study, _bowl, 6 * 3 + 2)
    assert old.state is not None

    monkeypatch.delenv(TRUST_PICKLED_ENV, raising=False)
    refused = optuna.load_study(study_name="old", storage=storage,
                                sampler=IpopCmaSampler(SPACE5, popsize=6, seed=0, restarts=1))
    with pytest.raises(RuntimeError) as err:
        refused.ask(SPACE5)
    message = str(err.value)
    assert "\n" not in message and f"{TRUST_PICKLED_ENV}=1" in message
    assert f"system attribute {PICKLED_KEY!r}" in message and "'old'" in message

    monkeypatch.setenv(TRUST_PICKLED_ENV, "1")
    trusted = IpopCmaSampler(SPACE5, popsize=6, seed=0, restarts=1, patience=2)
    resumed = optuna.load_study(study_name="old", storage=storage, sampler=trusted)
    _sample_space(resumed, _bowl, 6)  # into the next generation, which is stored as JSON
    assert trusted.state is not None and trusted.state.history == old.state.history
    assert trusted.state.optimizer.generation == old.state.optimizer.generation + 1
    monkeypatch.delenv(TRUST_PICKLED_ENV)
    again = IpopCmaSampler(SPACE5, popsize=6, seed=0, restarts=1, patience=2)
    optuna.load_study(study_name="old", storage=storage, sampler=again).ask(SPACE5)
    assert again.state is not None and again.state.optimizer.generation == 4
