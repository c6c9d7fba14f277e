"""ParameterSpace: stable names, decode/encode inverse, baselines inside the bounds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.config import ModelsConfig, ParameterSpaceConfig
from evomerge.search_spaces.parameter import ParameterSpace

MODELS = ModelsConfig(
    base={"path": "b"}, experts={"x": {"path": "x"}, "y": {"path": "y"}, "z": {"path": "z"}}
)


def space(**kw) -> ParameterSpace:
    return ParameterSpace(ParameterSpaceConfig(name="parameter", **kw), models=MODELS)


def test_stable_names_per_layer_group():
    s = space(method="ties", layer_groups=2)
    assert sorted(s.distributions()) == sorted(
        f"{p}/{m}/{g}" for p in "wd" for m in "xyz" for g in (0, 1)
    )


def test_global_granularity_shares_coefficients():
    s = space(method="task_arithmetic", per_model=False)
    assert list(s.distributions()) == ["w/all/0"]
    r = s.decode({"w/all/0": 0.4})
    assert all(r.models[e]["weight"] == 0.4 for e in "xyz")


def test_module_kinds_make_kind_dicts():
    s = space(method="task_arithmetic", layer_groups=3, module_kinds=True)
    r = s.decode({n: 0.1 * i for i, n in enumerate(s.distributions())})
    assert set(r.models["x"]["weight"]) == {"attention", "mlp", "default"}
    assert len(r.models["x"]["weight"]["mlp"]) == 3


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_encode_inverts_decode(data):
    s = space(method="ties", layer_groups=2, module_kinds=data.draw(st.booleans()))
    params = {name: data.draw(st.floats(d.low, d.high)) for name, d in s.distributions().items()}
    assert s.encode(s.decode(params)) == params


def test_bounds_and_log_scale_from_config():
    s = space(method="ties", bounds={"density": {"low": 0.05, "high": 0.9, "log": True}})
    d = s.distributions()["d/x/0"]
    assert (d.low, d.high, d.log) == (0.05, 0.9, True)


def test_fixed_and_flags_reach_the_recipe():
    s = space(method="ties", fixed={"normalize": False, "lambda": 0.7})
    r = s.default()
    assert r.parameters["normalize"] is False and r.parameters["lambda"] == 0.7
    assert r.base_model == "base" and r.sources["x"] == "x"


def test_global_parameter_searched_when_bounded():
    s = space(method="ties", bounds={"lambda": {"low": 0.5, "high": 1.5}})
    assert "lambda/0" in s.distributions()
    assert s.decode({n: 0.6 for n in s.distributions()}).parameters["lambda"] == 0.6


@pytest.mark.parametrize(
    "method", ["task_arithmetic", "ties", "dare_ties", "breadcrumbs", "linear"]
)
def test_baselines_are_inside_the_space(method):
    s = space(method=method)
    dists = s.distributions()
    base = s.baselines()
    assert "uniform" in base
    assert len({tuple(sorted(p.items())) for p in base.values()}) == len(base)  # no duplicates
    for params in base.values():
        assert set(params) == set(dists)
        assert all(dists[k].low <= v <= dists[k].high for k, v in params.items())


def test_expert_alone_baseline_weights():
    b = space(method="task_arithmetic").baselines()
    assert b["expert:y"] == {"w/x/0": 0.0, "w/y/0": 1.0, "w/z/0": 0.0}
    assert b["uniform"]["w/x/0"] == pytest.approx(1 / 3)


def test_slerp_refuses_more_than_one_expert():
    with pytest.raises(ValueError, match="at most 1"):
        space(method="slerp")
