"""The data-flow search space: Optuna parameters -> a DFS recipe, its config and bad input.

Fast: no Ray. The searches themselves (failed trials with their reason, resume, Pareto) are in
``tests/test_dfs_search.py``.
"""

from __future__ import annotations

import random

import pytest

from evomerge.config import ConfigError, DFSSpaceConfig, ModelsConfig, parse_job
from evomerge.recipe import DFSRecipe, Recipe
from evomerge.search.phases import dfs_job, ps_job
from evomerge.search_spaces.dfs import DFSSpace, InvalidCandidate, pool_recipe

MODELS = ModelsConfig(base={"path": "b"},
                      experts={"a": {"path": "pa"}, "b": {"path": "pb"}, "c": {"path": "pc"}})
COUNTS = {"a": 3, "b": 2}


def space_of(**kw) -> DFSSpace:
    kw.setdefault("num_layers", COUNTS)
    kw.setdefault("models", tuple(kw["num_layers"]))
    return DFSSpace(DFSSpaceConfig(name="dfs", **kw), models=MODELS)


def point(space: DFSSpace, on: list[int], scales: dict[int, float] | None = None) -> dict:
    params = {f"dfs/i/{t}": (0.3 if t in on else -0.2) for t in range(space.T)}
    params.update({n: 1.0 for n in space.distributions() if n.startswith("dfs/s/")})
    params.update({f"dfs/s/{t}": s for t, s in (scales or {}).items()})
    return params


def test_slots_are_the_layer_sequence_repeated():
    space = space_of(repeats=3)
    assert space.M == 5 and space.T == 15
    dists = space.distributions()
    assert len(dists) == 2 * 15
    assert {dists[f"dfs/i/{t}"].low for t in range(15)} == {-1.0}
    assert (dists["dfs/s/0"].low, dists["dfs/s/0"].high) == (0.5, 1.5)
    # slot t holds layer t % M of the sequence a0 a1 a2 b0 b1
    recipe = space.decode(point(space, [4, 5, 13]))
    assert recipe.layers == (("b", 1), ("a", 0), ("b", 0))


def test_indicators_choose_the_slots_and_scales_follow_them():
    space = space_of(repeats=2)
    recipe = space.decode(point(space, [1, 3, 7], scales={1: 0.7, 3: 1.3, 7: 0.9, 2: 0.6}))
    assert isinstance(recipe, DFSRecipe)
    assert recipe.layers == (("a", 1), ("b", 0), ("a", 2))
    assert recipe.scales == (0.7, 1.3, 0.9)  # slot 2 is off: its scale is not used
    assert recipe.embed_from == "a" and set(recipe.sources) == {"a", "b"}
    assert recipe.sources["b"] == "pb"


def test_indicator_zero_is_off():
    space = space_of(repeats=1)
    params = point(space, [0, 1])
    params["dfs/i/1"] = 0.0
    assert space.decode(params).layers == (("a", 0),)


def test_start_is_model_a_first_repetition():
    space = space_of(repeats=2)
    start = space.start()
    assert [t for t in range(space.T) if start[f"dfs/i/{t}"] > 0] == [0, 1, 2]
    recipe = space.decode(start)
    assert recipe.layers == (("a", 0), ("a", 1), ("a", 2)) and recipe.scales == (1.0,) * 3
    baselines = space.baselines()
    assert baselines["init"] == start
    assert space.decode(baselines["path:b"]).layers == (("b", 0), ("b", 1))


def test_embed_from_and_models_order():
    space = space_of(models=("b", "a"), embed_from="a")
    assert space.sequence[:2] == [("b", 0), ("b", 1)]
    recipe = space.decode(space.start())
    assert recipe.layers == (("b", 0), ("b", 1)) and recipe.embed_from == "a"


def test_fixed_first_and_last_layers_of_model_a():
    space = space_of(repeats=2, fix_first=True, fix_last=True)
    assert space.decode(space.start()).layers == (("a", 0), ("a", 1), ("a", 2))  # model A
    recipe = space.decode(point(space, [3, 9], scales={3: 0.8, 9: 1.2}))
    assert recipe.layers == (("a", 0), ("b", 0), ("b", 1), ("a", 2))
    assert recipe.scales == (1.0, 0.8, 1.2, 1.0)
    # every indicator off: only the fixed layers, still a model
    assert space.decode(point(space, [])).layers == (("a", 0), ("a", 2))


def test_every_indicator_off_is_no_candidate():
    space = space_of()
    with pytest.raises(InvalidCandidate, match=r"every indicator dfs/i/0..9 is <= 0"):
        space.decode(point(space, []))


def test_too_long_fails_or_truncates():
    fail = space_of(repeats=2, max_path_length=4)
    with pytest.raises(InvalidCandidate, match="the path has 5 layers, more than "
                       "search.space.max_path_length 4"):
        fail.decode(point(fail, [0, 1, 2, 3, 4]))
    assert len(fail.decode(point(fail, [0, 1, 2, 3])).layers) == 4
    cut = space_of(repeats=2, max_path_length=4, too_long="truncate", fix_last=True)
    recipe = cut.decode(point(cut, [3, 4, 5, 6, 7], scales={3: 0.6, 4: 0.7, 5: 0.8}))
    assert recipe.layers == (("b", 0), ("b", 1), ("a", 0), ("a", 2))  # fixed last stays last
    assert recipe.scales == (0.6, 0.7, 0.8, 1.0)


def test_start_longer_than_the_maximum_is_refused():
    with pytest.raises(ValueError, match=r"search.space.max_path_length: 2 is below the start "
                       r"path, model A \('a'\) with 3 layers"):
        space_of(max_path_length=2)
    with pytest.raises(ValueError, match="leaves no room beside the 2 fixed"):
        space_of(max_path_length=2, fix_first=True, fix_last=True, too_long="truncate")
    assert space_of(max_path_length=2, too_long="truncate").decode(
        space_of(max_path_length=2, too_long="truncate").start()).layers == (("a", 0), ("a", 1))


def test_matrix_scales_are_per_transition():
    space = space_of(repeats=2, scales="matrix", fix_first=True)
    names = [n for n in space.distributions() if n.startswith("dfs/s/")]
    assert len(names) == space.M ** 2 and "dfs/s/4/0" in names
    params = point(space, [3, 5])  # b0 (index 3), then a0 of the second repetition (index 0)
    params.update({"dfs/s/0/3": 0.7, "dfs/s/3/0": 1.4})
    recipe = space.decode(params)
    assert recipe.layers == (("a", 0), ("b", 0), ("a", 0))
    assert recipe.scales == (1.0, 0.7, 1.4)


@pytest.mark.parametrize("kw", [{}, {"fix_first": True, "fix_last": True},
                                {"scales": "matrix", "fix_last": True}, {"repeats": 3}])
def test_encode_inverts_decode(kw):
    space = space_of(**kw)
    rng = random.Random(0)
    dists = space.distributions()
    for _ in range(50):
        params = {n: rng.uniform(d.low, d.high) for n, d in dists.items()}
        try:
            recipe = space.decode(params)
        except InvalidCandidate:
            continue
        again = space.decode(space.encode(recipe))
        assert again == recipe
        assert Recipe.from_json(recipe.to_json()) == recipe


def test_layer_counts_read_from_config_json(tiny_models):
    models = ModelsConfig(experts={"x": {"path": str(tiny_models["a"])},
                                   "y": {"path": str(tiny_models["b"])}})
    space = DFSSpace(DFSSpaceConfig(name="dfs", repeats=2), models=models)
    assert space.counts == {"x": 4, "y": 4} and space.T == 16


def test_an_inline_ps_recipe_is_a_source(tiny_models):
    models = ModelsConfig(base={"path": str(tiny_models["base"])},
                          experts={"x": {"path": str(tiny_models["a"])},
                                   "y": {"path": str(tiny_models["b"])}})
    merge = Recipe(method="linear", sources={"x": str(tiny_models["a"]),
                                             "y": str(tiny_models["b"])},
                   models={"x": {"weight": 0.5}, "y": {"weight": 0.5}})
    cfg = DFSSpaceConfig(name="dfs", recipes={"m": merge.to_dict()}, num_layers=None)
    space = DFSSpace(cfg, models=models)
    assert space.names == ["m", "x", "y"] and space.counts["m"] == 4  # base not taking part
    recipe = space.decode(space.start())
    assert recipe.sources["m"] == merge and recipe.layers[0] == ("m", 0)
    engine_recipe = pool_recipe(cfg, models)
    assert [n for n, _ in engine_recipe.layers] == ["m", "x", "y"]


# -- config -----------------------------------------------------------------------------------
GOOD = {
    "name": "d",
    "models": {"base": {"path": "b"}, "experts": {"x": {"path": "x"}, "y": {"path": "y"}}},
    "search": {"space": {"name": "dfs"}},
    "evaluators": [{"name": "cost"}],
    "objectives": [{"metric": "cost/layers", "direction": "minimize"}],
}


def error_of(**search) -> str:
    with pytest.raises(ConfigError) as info:
        parse_job({**GOOD, "search": search})
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(("space", "expect"), [
    ({"repeats": 0}, "search.space.repeats: Input should be greater than or equal to 1"),
    ({"max_path_length": 0}, "search.space.max_path_length: Input should be greater than"),
    ({"models": ["x"]}, "search.space.models: ['x'] is one model; a dfs path needs 2"),
    ({"models": ["x", "x"]}, "search.space.models: ['x', 'x'] lists a model twice"),
    ({"models": ["x", "q"]}, "search.space.models.1: unknown model 'q'"),
    ({"embed_from": "base"}, "search.space.embed_from: 'base' is not one of the models"),
    ({"scale_bounds": {"low": 1.1, "high": 2}}, "search.space.scale_bounds: [1.1, 2] must"),
    ({"too_long": "cut"}, "search.space.too_long: Input should be 'fail' or 'truncate'"),
    ({"recipes": {"x": {"method": "linear", "sources": {"p": "p"}}}},
     "search.space.recipes.x: 'x' is already a model name"),
    ({"recipes": {"m": {"method": "linear", "sources": {"p": "p"}, "models": {"z": {}}}}},
     "search.space.recipes.m: is not a ps recipe"),
    ({"num_layers": {"base": 2}}, "search.space.num_layers.base: 'base' is not one of the"),
])
def test_bad_dfs_space_is_one_line(space, expect):
    assert expect in error_of(space={"name": "dfs", **space})


def test_then_is_checked():
    then = {"space": {"name": "dfs"}}
    ps = {"name": "parameter", "method": "linear"}
    assert "search.then: follows a ps search" in error_of(space={"name": "dfs"}, then=then)
    assert "search.then.space.models.1: unknown model 'z'" in error_of(
        space=ps, then={"space": {"name": "dfs", "models": ["ps", "z"]}})
    two = [{"metric": "cost/layers"}, {"metric": "cost/params"}]
    assert "search.then.sampler.name: cmaes is single-objective" in error_of(
        space=ps, then={**then, "objectives": two})
    assert "search.then.winner: 'a/b' is not a plain name" in error_of(
        space=ps, then={**then, "winner": "a/b"})


def test_phase_jobs():
    job = parse_job({**GOOD, "search": {
        "space": {"name": "parameter", "method": "linear"}, "trials": 5, "trial_timeout": 90,
        "then": {"space": {"name": "dfs", "repeats": 3}, "trials": 7,
                 "sampler": {"name": "nsga2"},
                 "objectives": [{"metric": "cost/layers"}, {"metric": "cost/params"}]}}})
    first = ps_job(job)
    assert first.search.then is None and first.search.trials == 5
    assert first.resolved_run_dir == job.resolved_run_dir and first.name == job.name
    winner = Recipe(method="linear", sources={"x": "x", "y": "y"},
                    models={"x": {"weight": 0.3}, "y": {"weight": 0.7}})
    second = dfs_job(job, winner)
    space = second.search.space
    assert isinstance(space, DFSSpaceConfig) and space.repeats == 3
    assert space.models == ("ps", "x", "y") and Recipe.from_dict(space.recipes["ps"]) == winner
    assert second.search.trials == 7 and len(second.objectives) == 2
    assert second.resolved_run_dir == job.resolved_run_dir
    assert first.search.trial_timeout == second.search.trial_timeout == 90  # both phases


def test_a_model_without_config_is_named(tmp_path):
    models = ModelsConfig(experts={"a": {"path": str(tmp_path / "nope")}, "b": {"path": "pb"}})
    with pytest.raises(ValueError, match=r"^models.experts.a.path: '.*nope' is no local model "
                       "folder and its config.json cannot be fetched"):
        DFSSpace(DFSSpaceConfig(name="dfs"), models=models)
