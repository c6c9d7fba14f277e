"""One contract, run over every merge method in ``evomerge.merge.methods_spec.METHODS`` (and over a
throwaway method this file registers, to show that one declaration plus a kernel is enough).

Everything a case needs comes from the method's spec; a method without a per-model ``weight``
needs an entry in ``ONE_HOT`` (its parameters that reproduce the first model), or the one-hot
test fails until one is added.
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.config import ModelsConfig, ParameterSpaceConfig
from evomerge.merge import merge_methods as mm
from evomerge.merge.methods_spec import (
    METHODS,
    VALID_RANGE,
    WEIGHT,
    MethodSpec,
    ParamSpec,
    in_range,
    register_method,
    unregister_method,
)
from evomerge.merge.reference import merge_state_dicts, plan_merge
from evomerge.merge.workspace import Workspace
from evomerge.recipe import Recipe
from evomerge.registry import UnknownNameError
from evomerge.runs.export_mergekit import mergekit_yaml
from evomerge.search_spaces.parameter import ParameterSpace

LAYERS = 4  # tests/conftest.py TINY
ONE_HOT = {  # global parameters that give the first model exactly
    "slerp": {"t": 1.0}, "karcher": {}, "nearswap": {"t": 1.0}, "ram": {"epsilon": 0.0},
    "ramplus_tl": {"epsilon": 0.0}, "tsv_m": {}, "sce": {"select_topk": 1.0},
}
MIXES_BY_DESIGN = {  # methods with no setting that returns one model alone, and why
    "model_stock": "interpolates towards the base by the experts' angle",
    "arcee_fusion": "keeps the base where the expert's change is not salient",
    "iso_c": "flattens the task matrix's spectrum",
    "iso_cts": "flattens the task matrix's spectrum",
}


def scaled_linear(base, tensors, *, weight, scale, normalize):
    """The throwaway method's kernel: ``scale`` times the linear merge."""
    return (mm.linear(None, tensors, weight=weight, normalize=normalize).float() * scale).to(
        tensors.dtype)


SCALED = MethodSpec(
    "scaled_linear", kernel=scaled_linear, needs_base=False, model_params={"weight": WEIGHT},
    global_params={"scale": ParamSpec(1.0, 0.5, 1.5, valid=(0.0, math.inf, False, False))},
    flags={"normalize": True},
)
NAMES = [*METHODS.names(), SCALED.name]


@pytest.fixture
def spec(method):
    """The method's spec; the throwaway one is registered for the test and removed after."""
    if method != SCALED.name:
        yield METHODS[method]
        return
    register_method(SCALED)
    try:
        yield SCALED
    finally:
        unregister_method(SCALED.name)


@pytest.fixture(scope="module")
def sources(tiny_models) -> dict[str, str]:
    return {n: str(tiny_models[n]) for n in ("base", "a", "b")}


@pytest.fixture(scope="module")
def state_dicts(sources):
    return {n: load_file(f"{p}/model.safetensors") for n, p in sources.items()}


@pytest.fixture(scope="module")
def workspace(sources) -> Workspace:
    torch.set_num_threads(1)
    return Workspace(sources, "base")


def experts(spec: MethodSpec) -> list[str]:
    return ["a", "b"][: spec.max_models or 2]


def recipe(spec: MethodSpec, sources, models: dict, parameters=None) -> Recipe:
    return Recipe(method=spec.name, sources=sources,
                  base_model="base" if spec.needs_base else None, models=models,
                  parameters=parameters or {}, seed=3)


def space(spec: MethodSpec, sources, **kw) -> ParameterSpace:
    models = ModelsConfig(base={"path": sources["base"]},
                          experts={e: {"path": sources[e]} for e in experts(spec)})
    return ParameterSpace(ParameterSpaceConfig(name="parameter", method=spec.name, **kw),
                          models=models)


def point(space: ParameterSpace) -> dict[str, float]:
    """A deterministic point spread over every distribution of ``space``."""
    dists = space.distributions()
    return {n: d.low + (d.high - d.low) * (0.2 + 0.6 * ((i * 0.618) % 1))
            for i, (n, d) in enumerate(dists.items())}


def assert_close(x: dict, y: dict) -> None:
    assert set(x) == set(y)
    for key, tensor in y.items():
        torch.testing.assert_close(x[key], tensor, rtol=1e-5, atol=1e-6, msg=key)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", NAMES)
class TestMethodContract:
    def test_spec_is_registered_and_consistent(self, spec):
        assert METHODS[spec.name] is spec and callable(spec)
        for key, param in {**spec.model_params, **spec.global_params}.items():
            assert VALID_RANGE[key] == param.valid
            assert param.low <= param.start <= param.high and in_range(param.valid, param.default)

    def test_one_hot_reproduces_model_a(self, spec, sources, state_dicts):
        if "weight" in spec.model_params:
            models = {e: {"weight": 1.0 if e == "a" else 0.0} for e in experts(spec)}
            parameters = {}
        elif spec.name in MIXES_BY_DESIGN:  # then it must really mix: not model a, not the base
            s = space(spec, sources)
            out = merge_state_dicts(s.decode(point(s)), state_dicts, num_layers=LAYERS)
            for other in ("a", "base"):
                assert any(not torch.equal(out[k], v) for k, v in state_dicts[other].items())
            return
        else:
            assert spec.name in ONE_HOT, f"add a ONE_HOT case for merge method {spec.name!r}"
            models, parameters = {"a": {}}, ONE_HOT[spec.name]
        out = merge_state_dicts(recipe(spec, sources, models, parameters), state_dicts,
                                num_layers=LAYERS)
        assert_close(out, state_dicts["a"])

    def test_identical_inputs_are_a_fixed_point(self, spec, sources, state_dicts):
        same = {n: state_dicts["base"] for n in sources}
        s = space(spec, sources)
        out = merge_state_dicts(s.decode(point(s)), same, num_layers=LAYERS)
        assert_close(out, state_dicts["base"])

    def test_lambda_zero_gives_base(self, spec, sources, state_dicts):
        if "lambda" not in spec.global_params:
            pytest.skip(f"{spec.name} has no lambda")
        s = space(spec, sources, fixed={"lambda": 0.0})
        r = s.decode(point(s))
        out = merge_state_dicts(r, state_dicts, num_layers=LAYERS)
        assert all(torch.equal(out[k], v) for k, v in state_dicts["base"].items())

    @pytest.mark.parametrize("shape", [{}, {"layer_groups": 2, "module_kinds": True}])
    def test_workspace_equals_reference(self, spec, shape, sources, state_dicts, workspace):
        s = space(spec, sources, **shape)
        r = s.decode(point(s))
        live = snapshot(workspace.apply(r))
        pure = merge_state_dicts(r, state_dicts, num_layers=LAYERS)
        assert_close(live, pure)
        assert any(not torch.equal(pure[k], v) for k, v in state_dicts["base"].items())

    def test_baselines_decode_to_valid_recipes(self, spec, sources):
        s = space(spec, sources, layer_groups=2)
        dists = s.distributions()
        # a method with no searchable parameter (model_stock, arcee_fusion) is one merge
        searchable = any(p.low < p.high for p in (*spec.model_params.values(),
                                                  *spec.global_params.values()))
        assert "uniform" in s.baselines() and (bool(dists) or not searchable)
        for params in s.baselines().values():
            assert set(params) == set(dists)
            r = s.decode(params)
            assert Recipe.from_json(r.to_json()) == r
            assert s.encode(r) == params
            plan_merge(r, available=list(sources))
            for name, value in params.items():
                d = dists[name]
                assert d.low <= value <= d.high

    def test_mergekit_export_or_clear_refusal(self, spec, sources):
        s = space(spec, sources, layer_groups=2)
        r = s.decode(point(s))
        if spec.mergekit is None:
            with pytest.raises(ValueError, match="no mergekit equivalent.*--format hf"):
                mergekit_yaml(r, num_layers=LAYERS)
            return
        from mergekit.config import MergeConfiguration
        from mergekit.merge_methods import registry

        config = yaml.safe_load(mergekit_yaml(r, num_layers=LAYERS))
        MergeConfiguration.model_validate(config)
        assert config["merge_method"] == spec.mergekit
        known = {p.name for p in registry.get(spec.mergekit).spec.parameters}
        written = set(config["parameters"]).union(*(m["parameters"] for m in config["models"]))
        assert written <= known, written - known


def test_a_new_method_is_one_declaration(sources, state_dicts, workspace):
    """scaled_linear, declared in this file only: registered, searched, merged, removed."""
    register_method(SCALED)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_method(SCALED)
        s = space(SCALED, sources, bounds={"scale": {"low": 0.5, "high": 0.9}})
        assert sorted(s.distributions()) == ["scale/0", "w/a/0", "w/b/0"]
        r = s.decode({"scale/0": 0.5, "w/a/0": 1.0, "w/b/0": 1.0})
        pure = merge_state_dicts(r, state_dicts, num_layers=LAYERS)
        half = {k: (state_dicts["a"][k] + state_dicts["b"][k]) / 4 for k in pure}
        assert_close(pure, half)
        assert_close(snapshot(workspace.apply(r)), pure)
        with pytest.raises(ValueError, match="scale.*valid range"):
            ParameterSpaceConfig(name="parameter", method=SCALED.name,
                                 bounds={"scale": {"low": -1.0, "high": 1.0}})
    finally:
        unregister_method(SCALED.name)
    assert SCALED.name not in METHODS and "scale" not in VALID_RANGE
    with pytest.raises(UnknownNameError, match="Did you mean 'linear'"):
        METHODS["lineer"]


def test_registration_refuses_inconsistent_specs():
    clash = MethodSpec("odd", kernel=scaled_linear, needs_base=False,
                       model_params={"weight": ParamSpec(1.0, 0.0, 1.0, short="x")},
                       flags={"normalize": True})
    with pytest.raises(ValueError, match="'weight' has valid="):
        register_method(clash)
    assert "odd" not in METHODS
    with pytest.raises(ValueError, match="family 'task_arithmetic' needs"):
        MethodSpec("half", kernel="evomerge.merge.merge_methods:gta", needs_base=True,
                   model_params={"weight": WEIGHT}, family="task_arithmetic",
                   sparsifier="magnitude", flags={"normalize": True})
    with pytest.raises(ValueError, match="outside its valid range"):
        ParamSpec(2.0, 0.0, 1.0, valid=(0.0, 1.0, True, True))


def test_expert_alone_baselines_cover_searched_globals(sources):
    """They once left out lambda/0, which Optuna then filled at random."""
    s = space(METHODS["ties"], sources, bounds={"lambda": {"low": 0.5, "high": 1.5}})
    for params in s.baselines().values():
        assert set(params) == set(s.distributions())
