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


def _fidelity_job(fidelity: dict) -> object:
    from evomerge.config import parse_job

    return parse_job(
        {
            "name": "f",
            "models": {"experts": {"a": {"path": "a"}, "b": {"path": "b"}}},
            "search": {"fidelity": fidelity, "space": {"name": "parameter", "method": "linear"}},
            "evaluators": [{"name": "entropy", "data": "d.jsonl"}],
            "objectives": [{"metric": "entropy/d", "direction": "minimize"}],
        },
        source="job.yaml",
    )


@pytest.mark.parametrize(
    ("fidelity", "line"),
    [
        ({"threshold": 0.7}, "search.fidelity.threshold: is only used with mode: auto"),
        ({"recheck_every": 4}, "search.fidelity.recheck_every: is only used with mode: auto"),
        (
            {"mode": "auto", "fractions": [1.0]},
            "search.fidelity.fractions: mode: auto chooses among the fractions below 1.0",
        ),
        ({"mode": "auto", "warmup": 2}, "search.fidelity.warmup: Input should be greater than"),
        ({"mode": "auto", "threshold": 1.5}, "search.fidelity.threshold: Input should be less"),
    ],
)
def test_fidelity_settings_are_checked_with_one_line(fidelity: dict, line: str) -> None:
    from evomerge.strict import ConfigError

    with pytest.raises(ConfigError) as err:
        _fidelity_job(fidelity)
    assert line in str(err.value) and len(str(err.value).splitlines()) == 1


def test_a_stored_fixed_fidelity_config_reads_back() -> None:
    """A resolved job (the worker's JSON, the study's stored job) holds every default."""
    from evomerge.config import FidelityConfig, JobConfig

    job = _fidelity_job({"fractions": [0.1, 1.0]})
    again = JobConfig.model_validate_json(job.model_dump_json())
    assert again.search.fidelity == FidelityConfig(fractions=(0.1, 1.0))
    assert again.search.fidelity.mode == "fixed"
