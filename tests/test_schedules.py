"""Layer schedules: the resolve math, the recipe value form (JSON, YAML, a stored study), the
search space (2 or K parameters per coefficient, values inside the bounds), config errors, and
mergekit reproducing a scheduled recipe through the export."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.distributions import FloatDistribution
from safetensors.torch import load_file

from evomerge.config import ModelsConfig, ParameterSpaceConfig, parse_job
from evomerge.merge.coefficients import per_layer, resolve, schedule_at
from evomerge.merge.reference import merge_state_dicts
from evomerge.recipe import Recipe, Schedule
from evomerge.runs.export_mergekit import mergekit_config, mergekit_yaml
from evomerge.search_spaces.parameter import ParameterSpace
from evomerge.strict import ConfigError
from tests.test_export import run_mergekit_yaml

LAYERS = 4  # the tiny models' depth
MODELS = ModelsConfig(base={"path": "b"}, experts={"x": {"path": "x"}, "y": {"path": "y"}})


def lin(a: float, b: float, **kw) -> Schedule:
    return Schedule(schedule="linear", values=(a, b), **kw)


def pw(*knots: float, **kw) -> Schedule:
    return Schedule(schedule="piecewise", values=knots, **kw)


# -- resolve ------------------------------------------------------------------------------------
def test_linear_is_lines_formula():
    s = lin(0.2, 0.6)
    assert [schedule_at(s, i, 4) for i in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert schedule_at(s, 0, 1) == 0.2  # one layer: a


def test_piecewise_hits_knots_exactly_and_interpolates_between():
    s = pw(0.1, 0.9, 0.3)
    got = [schedule_at(s, i, 5) for i in range(5)]
    assert got[0] == 0.1 and got[2] == 0.9 and got[4] == 0.3
    assert got[1] == pytest.approx(0.5) and got[3] == pytest.approx(0.6)


def test_clamp_holds_values_in_range():
    s = lin(0.5, 1.0, clamp=(0.0, 1.0))
    assert per_layer(s, 3) == (0.5, 1.0, 1.0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-2, 2), min_size=2, max_size=8))
def test_piecewise_with_one_knot_per_layer_is_the_per_layer_list(knots):
    assert per_layer(pw(*knots), len(knots)) == tuple(knots)


@settings(max_examples=40, deadline=None)
@given(st.floats(-2, 2), st.floats(-2, 2), st.integers(1, 12))
def test_two_knots_equal_the_linear_schedule(a, end, layers):
    assert per_layer(pw(a, end), layers) == pytest.approx(per_layer(lin(a, end - a), layers))


def test_tensors_outside_layers_take_layer_zero_and_kinds_hold_schedules():
    value = {"attention": lin(0.1, 0.3), "default": pw(1.0, 2.0)}
    assert resolve(value, "model.layers.3.self_attn.q_proj.weight", num_layers=4) == 0.4
    assert resolve(value, "model.layers.3.mlp.up_proj.weight", num_layers=4) == 2.0
    assert resolve(value, "model.embed_tokens.weight", num_layers=4) == 1.0
    assert per_layer(value, 2) == {"attention": (0.1, 0.4), "default": (1.0, 2.0)}


# -- the recipe value ---------------------------------------------------------------------------
def scheduled_recipe(sources: dict[str, str]) -> Recipe:
    return Recipe(method="ties", sources=sources, base_model="base", models={
        "a": {"weight": lin(0.3, 0.9, clamp=(0.0, 1.0)), "density": pw(0.4, 0.9, 0.6)},
        "b": {"weight": {"attention": pw(1.0, 0.2, 0.7, 0.1), "mlp": 0.6,
                         "default": lin(0.5, -0.3)}, "density": 0.8},
    }, parameters={"lambda": 1.1})


def test_schedules_round_trip_through_json_yaml_and_a_stored_study(tmp_path):
    r = scheduled_recipe({"base": "b", "a": "m1", "b": "m2"})
    assert Recipe.from_json(r.to_json()) == r and Recipe.from_yaml(r.to_yaml()) == r
    assert yaml.safe_load(r.to_yaml())["models"]["a"]["weight"] == {
        "schedule": "linear", "values": [0.3, 0.9], "clamp": [0.0, 1.0]}
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "j.log")))
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    trial.set_user_attr("recipe", r.to_dict())
    study.tell(trial, 1.0)
    again = optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "j.log"))))
    stored = Recipe.from_dict(again.trials[0].user_attrs["recipe"])
    assert stored == r and stored.hash == r.hash


@pytest.mark.parametrize(("value", "expect"), [
    ({"schedule": "cubic", "values": [1, 2]}, "models.a.weight.schedule: Input should be"),
    ({"schedule": "linear", "values": [1, 2, 3]}, "takes values [a, b] (2 numbers), got 3"),
    ({"schedule": "piecewise", "values": [1]}, "2 or more knot values"),
    ({"schedule": "linear", "values": [0, 1], "clamp": [1, 0]}, "low > high"),
    ({"mlp": {"schedule": "linear", "values": [0]}}, "models.a.weight.mlp: a linear"),
    ({"schedule": "linear", "values": [0, 1], "knots": 3}, "models.a.weight.knots: Extra"),
])
def test_bad_schedule_in_a_recipe_is_one_line(value, expect):
    with pytest.raises(ValueError) as err:
        Recipe.from_dict({"method": "linear", "sources": {"a": "x"},
                          "models": {"a": {"weight": value}}})
    text = str(err.value)
    assert expect in text, text
    assert sum(" validation error" in line for line in text.splitlines()) == 1
    assert len([line for line in text.splitlines() if line.strip()
                and not line.lstrip().startswith("For further")]) == 2, text  # title + one line


# -- the search space ---------------------------------------------------------------------------
def space(**kw) -> ParameterSpace:
    return ParameterSpace(ParameterSpaceConfig(name="parameter", **kw), models=MODELS)


@pytest.mark.parametrize(("schedule", "per_coef"), [
    ({"kind": "linear"}, 2), ({"kind": "piecewise", "knots": 3}, 3),
    ({"kind": "piecewise", "knots": 5}, 5)])
@pytest.mark.parametrize("kinds", [False, True])
def test_dims_are_2_or_k_per_model_parameter_and_kind(schedule, per_coef, kinds):
    s = space(method="ties", schedule=schedule, module_kinds=kinds)
    dists = s.distributions()
    assert len(dists) == 2 * 2 * per_coef * (3 if kinds else 1)  # experts x (w, d) x knots
    assert all(type(d) is FloatDistribution for d in dists.values())  # CMA-ES takes them
    assert "w/x/k0" + ("/attention" if kinds else "") in dists
    r = s.decode({n: d.low for n, d in dists.items()})
    w = r.models["x"]["weight"]
    w = w["attention"] if kinds else w
    assert isinstance(w, Schedule) and w.schedule == schedule["kind"]
    assert w.clamp == (dists["w/x/k0" + ("/attention" if kinds else "")].low,
                       dists["w/x/k0" + ("/attention" if kinds else "")].high)


def test_searched_global_parameter_is_scheduled_too():
    s = space(method="ties", schedule={"kind": "linear"},
              bounds={"lambda": {"low": 0.5, "high": 1.5}})
    assert {"lambda/k0", "lambda/k1"} <= set(s.distributions())
    r = s.decode({n: 0.6 if n.startswith("lambda") else 0.5 for n in s.distributions()})
    assert r.parameters["lambda"] == lin(0.6, 0.0, clamp=(0.5, 1.5))


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_resolved_values_stay_in_the_search_bounds_and_encode_inverts(data):
    kind = data.draw(st.sampled_from(["linear", "piecewise"]))
    schedule = {"kind": kind, **({"knots": data.draw(st.integers(2, 5))} if kind != "linear"
                                 else {})}
    s = space(method="ties", schedule=schedule, module_kinds=data.draw(st.booleans()),
              bounds={"weight": {"low": -0.5, "high": 1.5}})
    dists = s.distributions()
    params = {n: data.draw(st.floats(d.low, d.high)) for n, d in dists.items()}
    r = s.decode(params)
    layers = data.draw(st.integers(1, 40))
    for model in ("x", "y"):
        for key, (low, high) in (("weight", (-0.5, 1.5)), ("density", (0.1, 1.0))):
            value = per_layer(r.models[model][key], layers)
            for vals in value.values() if isinstance(value, dict) else [value]:
                assert all(low <= v <= high for v in vals)
    back = s.encode(r)
    assert back == pytest.approx(params, abs=1e-12)


def test_baselines_are_constant_schedules_that_merge_as_the_plain_ones():
    plain, sched = space(method="ties"), space(method="ties", schedule={"kind": "linear"})
    pb, sb = plain.baselines(), sched.baselines()
    assert set(pb) == set(sb)
    for name in pb:
        r_plain, r_sched = plain.decode(pb[name]), sched.decode(sb[name])
        for model in ("x", "y"):
            for key, value in r_plain.models[model].items():
                assert per_layer(r_sched.models[model][key], 6) == (value,) * 6


# -- config -------------------------------------------------------------------------------------
JOB = {"name": "s", "models": {"base": {"path": "b"}, "experts": {"a": {"path": "a"}}},
       "evaluators": [{"name": "cost"}], "objectives": [{"metric": "cost/params"}]}


@pytest.mark.parametrize(("space_kw", "expect"), [
    ({"schedule": {"kind": "cubic"}}, "search.space.schedule.kind: Input should be 'linear' or"),
    ({"schedule": {"kind": "piecewise"}}, "search.space.schedule.knots: a piecewise schedule"),
    ({"schedule": {"kind": "linear", "knots": 3}}, "search.space.schedule.knots: a linear"),
    ({"schedule": {"kind": "piecewise", "knots": 1}}, "search.space.schedule.knots: Input should"),
    ({"schedule": {"kind": "piecewise", "knots": 2.5}}, "search.space.schedule.knots: expected"),
    ({"schedule": {"kind": "linear", "knot": 2}}, "search.space.schedule: unknown key 'knot'"),
    ({"schedule": "linear"}, "search.space.schedule: expected a mapping"),
    ({"schedule": {"kind": "linear"}, "layer_groups": 2},
     "search.space.schedule: a schedule replaces layer_groups"),
])
def test_bad_schedule_config_is_one_line_naming_the_key(space_kw, expect):
    with pytest.raises(ConfigError) as err:
        parse_job({**JOB, "search": {"space": {"name": "parameter", **space_kw}}})
    assert expect in str(err.value) and "\n" not in str(err.value), str(err.value)


# -- mergekit reads the export exactly ----------------------------------------------------------
@pytest.fixture(scope="module")
def state_dicts(tiny_models):
    return {n: load_file(p / "model.safetensors") for n, p in tiny_models.items()}


def test_export_writes_the_full_per_layer_list(tiny_models):
    r = scheduled_recipe({n: str(p) for n, p in tiny_models.items()})
    models = mergekit_config(r, num_layers=LAYERS)["models"]
    weight_a = models[0]["parameters"]["weight"]
    assert weight_a == pytest.approx([0.3, 0.6, 0.9, 1.0])  # 1.2 clamped to 1.0
    density_a = models[0]["parameters"]["density"]
    assert len(density_a) == LAYERS and density_a[0] == 0.4 and density_a[-1] == 0.6


def test_mergekit_reproduces_a_scheduled_recipe(tiny_models, state_dicts, tmp_path):
    r = scheduled_recipe({n: str(p) for n, p in tiny_models.items()})
    text = mergekit_yaml(r, num_layers=LAYERS, tensor_names=list(state_dicts["base"]))
    theirs = run_mergekit_yaml(text, tmp_path)
    ours = merge_state_dicts(r, state_dicts, num_layers=LAYERS)
    assert set(theirs) == set(ours)
    for name, tensor in ours.items():
        torch.testing.assert_close(theirs[name], tensor, atol=1e-6, rtol=0, msg=name)
    # the schedule reached the layers: layer 0 and layer 3 of a's weight differ (0.3 vs 1.0)
    flat = per_layer(r.models["a"]["weight"], LAYERS)
    assert flat[0] != flat[-1]
    assert json.dumps(yaml.safe_load(text))  # plain YAML, no Python objects


def test_workspace_applies_schedules_as_the_reference(tiny_models, state_dicts):
    from evomerge.merge.workspace import Workspace

    sources = {n: str(p) for n, p in tiny_models.items()}
    r = scheduled_recipe(sources)
    model = Workspace(sources, "base").apply(r)
    ours = merge_state_dicts(r, state_dicts, num_layers=LAYERS)
    got = model.state_dict()
    for name, tensor in ours.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-6, rtol=0, msg=name)


# -- a real search over a schedule --------------------------------------------------------------
def test_a_linear_schedule_search_stores_schedules_and_exports(ray_local, search_suite,
                                                               tmp_path):
    from optuna.trial import TrialState

    from evomerge.runs.export import export_run
    from evomerge.search.driver import run_search
    from tests.test_search import job_dict

    data = job_dict(search_suite, tmp_path / "run", trials=6)
    data["search"]["space"] = {"name": "parameter", "method": "ties", "module_kinds": True,
                               "schedule": {"kind": "linear"}}
    study = run_search(parse_job(data), progress=False)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 6
    experts = list(data["models"]["experts"])
    assert set(done[-1].params) == {f"{p}/{e}/k{i}/{k}" for p in "wd" for e in experts
                                    for i in (0, 1) for k in ("attention", "mlp", "default")}
    sampled = next(t for t in done if "baseline" not in t.user_attrs)  # k0 != k1 there
    recipe = Recipe.from_dict(sampled.user_attrs["recipe"])
    weight = recipe.models[experts[0]]["weight"]["attention"]
    assert isinstance(weight, Schedule) and weight.schedule == "linear"
    [path] = export_run(tmp_path / "run", tmp_path / "t.yaml", "mergekit", trial=sampled.number)
    config = yaml.safe_load(path.read_text())
    lists = [c["value"] for m in config["models"] for c in m["parameters"]["weight"]
             if isinstance(c["value"], list)]
    assert lists and all(len(v) == LAYERS for v in lists)  # full per-layer lists
