from __future__ import annotations

import pytest

from evomerge.config import AccuracyEvalConfig, CostEvalConfig, LmEvalConfig, Objective
from evomerge.search.fidelity import dominates, promote_multi, rung_step
from evomerge.search.objectives import check_objectives, objective_values


def test_dominates_respects_directions():
    assert dominates([1.0, 1.0], [0.5, 2.0], [1, -1])
    assert not dominates([1.0, 1.0], [1.0, 1.0], [1, 1])
    assert not dominates([1.0, 0.0], [0.0, 1.0], [1, 1])


def test_promote_multi_keeps_top_fraction():
    seen = [[float(i)] for i in range(10)]
    assert promote_multi([9.5], seen, [1], 2)
    assert not promote_multi([1.0], seen, [1], 2)


def test_rung_steps_are_pruner_rungs():
    assert [rung_step(r, 3) for r in range(3)] == [1, 3, 9]


def test_weighted_objective_is_weighted_mean():
    obj = Objective(weights={"a": 1.0, "b": 3.0})
    assert objective_values([obj], {"a": 1.0, "b": 0.0}) == [0.25]


def test_missing_metric_and_nan_raise():
    with pytest.raises(KeyError, match="metric 'c' missing"):
        objective_values([Objective(metric="c")], {"a": 1.0})
    with pytest.raises(ValueError, match="nan"):
        objective_values([Objective(metric="a")], {"a": float("nan")})


def test_objective_without_producer_refused():
    evs = [
        AccuracyEvalConfig(name="accuracy", data="toy/data/add"),
        LmEvalConfig(name="lm_eval", tasks=("toy_rot13",)),
        CostEvalConfig(name="cost"),
    ]
    check_objectives([Objective(metric="accuracy/add"), Objective(metric="cost/params")], evs)
    check_objectives([Objective(metric="lm_eval/toy_rot13/exact_match")], evs)
    with pytest.raises(ValueError, match="produced by no evaluator.*accuracy/add"):
        check_objectives([Objective(metric="accuracy/rot13")], evs)


def test_grid_sampler_works_ask_tell_past_exhaustion():
    import optuna
    from optuna.distributions import FloatDistribution

    from evomerge.config import GridConfig
    from evomerge.search.samplers import make_grid

    dists = {"w": FloatDistribution(0.0, 1.0)}
    study = optuna.create_study(sampler=make_grid(GridConfig(name="grid", points=3), dists))
    for _ in range(4):  # Optuna's GridSampler would call study.stop() and raise here
        trial = study.ask(dists)
        study.tell(trial, trial.params["w"])
    assert sorted(t.params["w"] for t in study.trials[:3]) == [0.0, 0.5, 1.0]
