"""AdaMerging on tiny models: entropy falls, and the returned Recipe reproduces theta(lambda)."""

from __future__ import annotations

import json

import pytest
import torch

from evomerge.config import AdaMergingConfig, JobConfig
from evomerge.merge.reference import merge_state_dicts
from evomerge.merge.workspace import Workspace
from evomerge.search.adamerging import adamerge, merged_params, run_adamerging, task_vectors

PROMPTS = ["rev:abc>", "srt:3120>", "cpy:hello>", "swp:abcdef>", "sft:xyz>", "add:12+7>"]
LABELED = [{"prompt": "rev:abc>", "answer": "cba"}, {"prompt": "srt:31>", "answer": "13"}]


def state_dicts(paths):
    from safetensors.torch import load_file

    return {name: load_file(str(p / "model.safetensors")) for name, p in paths.items()}


def run(tiny_models, positions="last", **kw):
    torch.set_num_threads(1)
    cfg = AdaMergingConfig(**{"steps": 12, "lr": 0.05, "batch_size": 6, **kw})
    experts = {"a": str(tiny_models["a"]), "b": str(tiny_models["b"])}
    return adamerge(str(tiny_models["base"]), experts, cfg=cfg, unlabeled=PROMPTS,
                    labeled=LABELED, positions=positions, eval_every=5, progress=False)


@pytest.fixture(scope="module")
def layer_wise(tiny_models):
    return run(tiny_models, granularity="layer")


def test_entropy_goes_down(layer_wise):
    entropies = [h["entropy"] for h in layer_wise.history]
    assert len(entropies) == 12
    # every step scores the same six prompts' last tokens, so the values are comparable
    assert entropies[-1] < entropies[0] - 1e-3
    assert sum(b < a for a, b in zip(entropies, entropies[1:], strict=False)) >= 9
    vals = [h["step"] for h in layer_wise.history if "val_tf_match" in h]
    assert vals == [1.0, 6.0, 11.0, 12.0]


def test_lambdas_are_per_layer_and_clamped(layer_wise):
    for values in layer_wise.lambdas.values():
        assert len(values) == 4 and all(0.0 <= v <= 1.0 for v in values)
    assert len({v for values in layer_wise.lambdas.values() for v in values}) > 1
    assert layer_wise.lambdas != {"a": (0.3,) * 4, "b": (0.3,) * 4}


@pytest.mark.parametrize("kw", [
    {"granularity": "task", "positions": "answer", "steps": 4}, {"granularity": "layer"},
    {"granularity": "layer", "ties": True, "density": 0.4, "positions": "prompt"},
])
def test_recipe_applied_by_the_engine_gives_the_same_weights(tiny_models, layer_wise, kw):
    result = layer_wise if kw == {"granularity": "layer"} else run(tiny_models, **kw)
    recipe = result.recipe
    assert recipe.method == ("ties" if kw.get("ties") else "task_arithmetic")
    assert len(result.history) == kw.get("steps", 12)
    assert set(recipe.sources) == {"base", "a", "b"} and recipe.base_model == "base"
    paths = {n: tiny_models[n] for n in ("base", "a", "b")}
    engine = merge_state_dicts(recipe, state_dicts(paths), num_layers=4)
    ours = result.model.state_dict()
    assert set(engine) == set(ours)
    for name, tensor in engine.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6, msg=name)
    base = state_dicts({"base": tiny_models["base"]})["base"]
    assert any(not torch.equal(base[k], ours[k]) for k in base)
    live = Workspace({n: str(p) for n, p in paths.items()}, "base").apply(recipe).state_dict()
    for name, tensor in live.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_ties_trims_and_elects_signs():
    base = {"model.layers.0.w": torch.zeros(4)}
    experts = {
        "a": {"model.layers.0.w": torch.tensor([1.0, -2.0, 3.0, -4.0])},
        "b": {"model.layers.0.w": torch.tensor([-1.0, 2.0, -0.5, 0.1])},
    }
    tv = task_vectors(base, experts, num_layers=1, layer_wise=False, ties=True, density=0.5)
    assert tv.deltas["model.layers.0.w"].tolist() == [[0, 0, 3, -4], [-1, 2, 0, 0]]
    out = merged_params(tv, torch.tensor([[1.0], [0.5]]))["model.layers.0.w"]
    assert out.tolist() == [-0.5, 1.0, 3.0, -4.0]


def test_gradient_flows_to_every_lambda(tiny_models):
    from evomerge.search.adamerging import load_models

    model, _, other = load_models(str(tiny_models["base"]),
                                  {e: str(tiny_models[e]) for e in "ab"})
    theta0 = {n: p.detach() for n, p in model.named_parameters()}
    tv = task_vectors(theta0, other, num_layers=4, layer_wise=True)
    lam = torch.full((2, 4), 0.3, requires_grad=True)
    params = merged_params(tv, lam)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    torch.func.functional_call(model, params, args=(), kwargs={"input_ids": ids}).logits.sum(
    ).backward()
    assert lam.grad is not None and bool((lam.grad != 0).all())


def test_bad_input(tiny_models):
    cfg = AdaMergingConfig(steps=1)
    with pytest.raises(ValueError, match="unlabeled is empty"):
        adamerge(str(tiny_models["base"]), {"a": str(tiny_models["a"])}, cfg=cfg, unlabeled=[])
    with pytest.raises(ValueError, match="reserved"):
        adamerge(str(tiny_models["base"]), {"base": str(tiny_models["a"])}, cfg=cfg,
                 unlabeled=PROMPTS)


def test_run_adamerging_from_a_job(tiny_models, tmp_path):
    data = tmp_path / "rev"
    data.mkdir()
    for split in ("validation", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LABELED))
    job = JobConfig.model_validate({
        "name": "ada", "run_dir": str(tmp_path / "run"),
        "models": {"base": {"path": str(tiny_models["base"])},
                   "experts": {"a": {"path": str(tiny_models["a"])}}},
        "evaluators": [{"name": "accuracy", "data": str(data), "max_new_tokens": 4},
                       {"name": "entropy", "data": str(data)}, {"name": "cost"}],
        "objectives": [{"metric": "accuracy/rev"}],
        "adamerging": {"granularity": "task", "steps": 3, "lr": 0.05},
    })
    result = run_adamerging(job, progress=False)
    out = tmp_path / "run" / "adamerging"
    assert (out / "recipe.yaml").read_text() == result.recipe.to_yaml()
    summary = json.loads((out / "result.json").read_text())
    assert summary["lambdas"]["a"] == list(result.lambdas["a"])
    def scores(metrics: dict) -> set[str]:  # the scored/ counts are cost, not scores
        return {k for k in metrics if not k.startswith("scored/")}

    assert scores(summary["metrics"]["fitness"]) == {
        "accuracy/rev", "entropy/rev", "cost/params", "cost/layers"}
    assert scores(summary["metrics"]["held_out"]) == {"accuracy/rev", "entropy/rev"}
    assert summary["metrics"]["held_out"]["scored/examples/accuracy/rev"] > 0
    assert len(summary["history"]) == 3


def test_scored_positions(tiny_models):
    from evomerge.evaluators.entropy import scored_batch
    from evomerge.search.adamerging import load_models

    model, tok, _ = load_models(str(tiny_models["base"]), {})
    params = dict(model.named_parameters())
    prompts = ["rev:abc>", "a"]
    n = [len(tok(p)["input_ids"]) for p in prompts]
    ids, pick = scored_batch(model, params, tok, prompts, "prompt")
    assert pick.sum(1).tolist() == n and ids.shape == (2, max(n))
    _, pick = scored_batch(model, params, tok, prompts, "last")
    assert pick.sum(1).tolist() == [1, 1] and pick[0, n[0] - 1] == 1 and pick[1, n[1] - 1] == 1
    ids, pick = scored_batch(model, params, tok, prompts, "answer")
    for row, length in enumerate(n):
        first = int(pick[row].nonzero()[0])
        assert first == length - 1  # the last prompt token predicts the answer's first token
        assert ids[row, : length].tolist() == tok(prompts[row])["input_ids"]
    with pytest.raises(ValueError, match="positions"):
        scored_batch(model, params, tok, prompts, "all")
