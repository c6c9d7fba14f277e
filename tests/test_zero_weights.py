"""Zero total weight: a normalised linear merge refuses it with a ValueError naming the tensor,
the weights and the fix, so in a search only that trial fails (``user_attrs["error"]``) and the
search goes on. The task-arithmetic family keeps mergekit 0.1.5's rule (divide by 1: all-zero
weights give the base model), checked against mergekit itself."""

from __future__ import annotations

import pytest
import torch
from optuna.trial import TrialState
from safetensors.torch import load_file

from evomerge.config import parse_job
from evomerge.merge.reference import merge_state_dicts
from evomerge.merge.workspace import Workspace
from evomerge.recipe import Recipe
from evomerge.runs.export_mergekit import mergekit_yaml
from evomerge.search.driver import run_search
from tests.test_export import run_mergekit_yaml

ZERO_MLP = {"mlp": 0.0, "default": 0.5}  # every weight 0 on the MLP tensors only
MESSAGE = (r"linear: all weights are 0 for tensor 'model\.layers\.0\.mlp\.\w+\.weight' with "
           r"normalize: true \(a=0, b=0\), so the weighted mean is undefined; give some model a "
           r"non-zero weight \(search\.space\.bounds\.weight\.low above 0 ensures it\) or set "
           r"normalize: false")


def recipe(paths, method: str, **params) -> Recipe:
    return Recipe(method=method, sources={n: str(p) for n, p in paths.items()},
                  base_model=None if method == "linear" else "base",
                  models={"a": {"weight": ZERO_MLP}, "b": {"weight": ZERO_MLP}}, parameters=params)


def test_normalised_linear_with_zero_weights_names_the_tensor(tiny_models):
    ws = Workspace({n: str(p) for n, p in tiny_models.items()}, None)
    with pytest.raises(ValueError, match=MESSAGE):
        ws.apply(recipe(tiny_models, "linear"))
    ws.apply(recipe(tiny_models, "linear", normalize=False))  # a plain sum is defined
    sds = {n: load_file(p / "model.safetensors") for n, p in tiny_models.items()}
    with pytest.raises(ValueError, match=r"linear: all weights are 0 with normalize: true "
                                         r"\(model 0=0, model 1=0\)"):
        merge_state_dicts(recipe(tiny_models, "linear"), sds, num_layers=4)


def test_ties_with_zero_weights_gives_the_base_like_mergekit(tiny_models, tmp_path):
    r = recipe(tiny_models, "ties", normalize=True)
    base = load_file(tiny_models["base"] / "model.safetensors")
    ours = Workspace.from_recipe(r).apply(r).state_dict()
    theirs = run_mergekit_yaml(mergekit_yaml(r, num_layers=4), tmp_path)
    mlp = [n for n in base if ".mlp." in n]
    assert mlp and all(torch.equal(ours[n], base[n]) and torch.equal(theirs[n], base[n])
                       for n in mlp)


def test_zero_weight_trial_fails_alone_and_the_search_goes_on(ray_local, search_suite, tmp_path):
    root = search_suite["dir"]
    job = parse_job({
        "name": "zero", "run_dir": str(tmp_path / "run"),
        "models": {"experts": {t: {"path": str(root / "experts" / t)} for t in ("a", "b")}},
        # seed 5: the first CMA-ES generation clips trial 0 to weights (0, 0), the rest not
        "search": {"space": {"name": "parameter", "method": "linear"}, "trials": 4,
                   "sampler": {"name": "cmaes", "popsize": 4, "seed": 5, "sigma0": 2.0},
                   "baselines": False, "held_out_top_k": 0},
        "evaluators": [{"name": "entropy", "data": str(root / "data" / "a"), "limit": 8}],
        "objectives": [{"metric": "entropy/a", "direction": "minimize"}],
        "resources": {"workers": 1},
    })
    study = run_search(job, progress=False)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.FAIL) >= 1 and len(states) == 4, states
    assert states.count(TrialState.COMPLETE) >= 2, states
    for t in study.get_trials(states=(TrialState.FAIL,)):
        assert t.params == {"w/a/0": 0.0, "w/b/0": 0.0}
        assert t.user_attrs["error"].startswith("ValueError: linear: all weights are 0 for "
                                                "tensor ")
