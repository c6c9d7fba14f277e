"""Job config validation: wrong keys and names are refused with the dotted key and the fix."""

from __future__ import annotations

import copy

import pytest
from pydantic import ValidationError

from evomerge.config import ConfigError, load_job, parse_job

GOOD = {
    "name": "demo",
    "models": {"base": {"path": "b"}, "experts": {"x": {"path": "x"}, "y": {"path": "y"}}},
    "evaluators": [{"name": "accuracy", "data": "data/x"}],
    "objectives": [{"metric": "accuracy/x"}],
}


def with_(path: str, value) -> dict:
    data = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
    node[last] = value
    return data


def error_of(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_job(data)
    return str(info.value)


def test_good_config_defaults():
    job = parse_job(GOOD)
    assert job.search.sampler.name == "cmaes"
    assert job.search.space.method == "ties"
    assert str(job.resolved_run_dir) == "runs/demo"
    with pytest.raises(ValidationError):
        job.name = "other"  # frozen


def test_unknown_top_level_key_names_key_and_allowed():
    msg = error_of({**GOOD, "evaluator": []})
    assert "unknown key 'evaluator'" in msg and "Did you mean 'evaluators'" in msg
    assert "objectives" in msg  # the allowed keys are listed


def test_unknown_nested_key_has_dotted_path():
    msg = error_of(with_("evaluators.0.limt", 3))
    assert msg.startswith("job config: evaluators.0: ") and "\n" not in msg
    assert "'limt'" in msg and "'limit'" in msg


def test_unknown_evaluator_name_suggests():
    msg = error_of(with_("evaluators.0.name", "acuracy"))
    assert "evaluators.0.name" in msg and "Did you mean 'accuracy'" in msg
    assert "lm_eval" in msg


def test_unknown_sampler_suggests():
    msg = error_of(with_("search.sampler", {"name": "cmaess"}))
    assert "search.sampler.name" in msg and "Did you mean 'cmaes'" in msg


def test_unknown_method_suggests():
    msg = error_of(with_("search.space", {"name": "parameter", "method": "tie"}))
    assert "unknown merge method 'tie'" in msg and "Did you mean 'ties'" in msg


def test_popsize_below_two_refused():
    msg = error_of(with_("search.sampler", {"name": "cmaes", "popsize": 1}))
    assert "search.sampler.popsize" in msg and "greater than or equal to 2" in msg


def test_bounds_low_above_high_refused():
    space = {"name": "parameter", "method": "ties", "bounds": {"weight": {"low": 1, "high": 0}}}
    msg = error_of(with_("search.space", space))
    assert "search.space.bounds.weight" in msg and "low (1.0) > high (0.0)" in msg


def test_bounds_for_unknown_parameter_refused():
    space = {
        "name": "parameter",
        "method": "task_arithmetic",
        "bounds": {"density": {"low": 0, "high": 1}},
    }
    assert "density is not a parameter of task_arithmetic" in error_of(
        with_("search.space", space)
    )


def test_test_split_refused_unless_allowed():
    data = with_("evaluators.0.split", "test")
    assert "optimising on the test split" in error_of(data)
    assert parse_job({**data, "allow_test_split": True}).allow_test_split


def test_cmaes_refuses_several_objectives():
    data = {**GOOD, "objectives": [{"metric": "a"}, {"metric": "b", "direction": "minimize"}]}
    assert "cmaes is single-objective" in error_of(data)


def test_method_needing_base_without_base():
    data = with_("models", {"experts": {"x": {"path": "x"}}})
    assert "needs models.base" in error_of(data)


def test_bad_device_refused():
    assert "load.device" in error_of(with_("load.device", "gpu0"))


def test_load_job_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_job(tmp_path / "nope.yaml")


def test_shipped_configs_validate():
    from pathlib import Path

    configs = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))
    assert configs, "configs/ has example jobs"
    for path in configs:
        load_job(path)


@pytest.mark.parametrize("name", ["cluster", "multi_objective", "quickstart", "dfs",
                                  "dfs_pareto", "ps_dfs", "smollm2", "smollm2_pareto",
                                  "smollm2_ps_dfs"])
def test_shipped_configs_pass_evomerge_validate(name, capsys, monkeypatch):
    """`validate` checks the job; what only this machine lacks (a GPU, the hub models of the
    cluster example, the unbuilt toy suite) is a note, not a refusal."""
    from pathlib import Path

    from evomerge import cli

    root = Path(__file__).parents[1]
    monkeypatch.chdir(root)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cli.main(["validate", f"configs/{name}.yaml"]) == 0, capsys.readouterr().err
    notes = capsys.readouterr().err.splitlines()
    assert all(line.startswith("evomerge validate: note: ") for line in notes), notes
    import torch

    if name == "cluster" and not torch.cuda.is_available():
        assert any("load.device: 'cuda'" in line for line in notes), notes
