"""One contract over every registered search space and every registered sampler: the sampler
asks points inside the space's distributions for two generations of a real in-memory Optuna
study, each point decodes to a recipe, and the same seed asks the same points.

Each registered search space needs a config in ``SPACES`` and each sampler its settings in
``SAMPLER_SETTINGS`` (a small generation); a new one without them fails here until added.
"""

from __future__ import annotations

import optuna
import pytest
from pydantic import TypeAdapter

from evomerge.config import DFSSpaceConfig, ModelsConfig, ParameterSpaceConfig, SamplerConfig
from evomerge.recipe import Recipe
from evomerge.registries import SAMPLERS, SEARCH_SPACES
from evomerge.search.samplers import make_sampler

GENERATION = 4
MODELS = ModelsConfig(base={"path": "b"}, experts={"x": {"path": "x"}, "y": {"path": "y"}})
SPACES = {
    "parameter": ParameterSpaceConfig(name="parameter", method="ties",
                                      bounds={"lambda": {"low": 0.5, "high": 1.5}}),
    # 2 x 2 layers, once: 8 parameters (grid: 2^8 points); a fixed first layer, so no point
    # decodes to an empty path
    "dfs": DFSSpaceConfig(name="dfs", repeats=1, fix_first=True, num_layers={"x": 2, "y": 2}),
}
SAMPLER_SETTINGS = {
    "cmaes": {"popsize": GENERATION, "start": "uniform"},
    "nsga2": {"population_size": GENERATION},
    "tpe": {"n_startup_trials": GENERATION},
    "random": {},
    "grid": {"points": 2},
    "gp": {"n_startup_trials": GENERATION},
}


def build_space(name: str):
    assert name in SPACES, f"add a contract config for search space {name!r} in this file"
    return SEARCH_SPACES.get(name)(SPACES[name], models=MODELS)


def ask_two_generations(space, sampler_name: str, seed: int) -> list[dict[str, float]]:
    """Ask a generation, tell it, twice (as the driver does with parallel workers)."""
    assert sampler_name in SAMPLER_SETTINGS, f"add settings for sampler {sampler_name!r}"
    cfg = TypeAdapter(SamplerConfig).validate_python(
        {"name": sampler_name, "seed": seed, **SAMPLER_SETTINGS[sampler_name]})
    dists = space.distributions()
    sampler = make_sampler(cfg, dists, space.baselines().get("uniform"))
    study = optuna.create_study(sampler=sampler, direction="minimize")
    asked = []
    for _ in range(2):
        trials = [study.ask(dists) for _ in range(GENERATION)]
        for trial in trials:
            asked.append(dict(trial.params))
            study.tell(trial, sum((v - 0.3) ** 2 for v in trial.params.values()))
    return asked


@pytest.fixture(autouse=True)
def quiet_optuna():
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(verbosity)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("sampler_name", SAMPLERS.names())
@pytest.mark.parametrize("space_name", SEARCH_SPACES.names())
class TestSpaceSamplerContract:
    def test_asks_inside_the_space_and_decodes(self, space_name, sampler_name):
        space = build_space(space_name)
        dists = space.distributions()
        asked = ask_two_generations(space, sampler_name, seed=7)
        assert len(asked) == 2 * GENERATION
        for params in asked:
            assert set(params) == set(dists)
            for name, value in params.items():
                assert dists[name].low <= value <= dists[name].high, (name, value)
            recipe = space.decode(params)
            assert Recipe.from_json(recipe.to_json()) == recipe
            assert space.decode(space.encode(recipe)) == recipe
            if not getattr(space, "many_to_one", False):  # dfs: indicator magnitudes are lost
                assert space.encode(recipe) == pytest.approx(params)

    def test_same_seed_asks_the_same_points(self, space_name, sampler_name):
        space = build_space(space_name)
        assert ask_two_generations(space, sampler_name, 3) == ask_two_generations(
            space, sampler_name, 3)
