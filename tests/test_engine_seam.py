"""The Engine seam: a worker and `evomerge merge` reach the merge code only through the engine of
the recipe's kind (ps: the Workspace, dfs: the path engine); a kind with no engine is refused,
never merged as another kind."""

from __future__ import annotations

import pytest
import torch

from evomerge import cli
from evomerge.config import parse_job
from evomerge.engines import ENGINES, PSEngine, engine_for
from evomerge.merge.workspace import Workspace, merge_to_folder
from evomerge.recipe import DFSRecipe, Recipe
from evomerge.runs.export import export_recipe
from evomerge.runs.export_mergekit import export_mergekit_yaml, mergekit_config
from evomerge.search.worker import MergeWorker

REAL_DFS = "evomerge.dfs.engine:DFSEngine"


def ps_recipe(paths) -> Recipe:
    return Recipe(method="task_arithmetic", sources={n: str(p) for n, p in paths.items()},
                  base_model="base", models={"a": {"weight": 0.5}, "b": {"weight": 0.3}})


def dfs_recipe(paths) -> DFSRecipe:
    return DFSRecipe(sources={"a": str(paths["a"]), "b": str(paths["b"])},
                     layers=[("a", 0), ("b", 1), ("a", 1)], scales=[1.0, 0.8, 1.0],
                     embed_from="a")


@pytest.fixture(scope="module")
def worker(tiny_models, tmp_path_factory):
    """A MergeWorker in this process (no Ray) over the tiny models, scoring only the cost."""
    job = parse_job({
        "name": "seam", "run_dir": str(tmp_path_factory.mktemp("seam")),
        "models": {"base": {"path": str(tiny_models["base"])},
                   "experts": {n: {"path": str(tiny_models[n])} for n in ("a", "b")}},
        "evaluators": [{"name": "cost"}],
        "objectives": [{"metric": "cost/params", "direction": "minimize"}],
    })
    return MergeWorker(job.model_dump_json())


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_worker_merges_ps_through_its_engine(worker, tiny_models):
    assert set(worker.engines) == {"ps"} and worker.ping()["num_layers"] == 4
    out = worker.evaluate(ps_recipe(tiny_models).to_json())
    assert out["metrics"]["cost/layers"] == 4.0
    model, _ = worker.engines["ps"].apply(ps_recipe(tiny_models))
    ours = Workspace.from_recipe(ps_recipe(tiny_models)).apply(ps_recipe(tiny_models))
    for name, tensor in ours.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor)


def test_worker_runs_a_dfs_recipe_through_the_dfs_engine(worker, tiny_models):
    worker.evaluate(ps_recipe(tiny_models).to_json())
    before = weights(worker.engines["ps"].workspace.model)
    out = worker.evaluate(dfs_recipe(tiny_models).to_json())
    assert out["metrics"]["cost/layers"] == 3.0  # the path's length, not the sources' depth
    assert set(worker.engines) == {"ps", "dfs"}
    after = worker.engines["ps"].workspace.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the ps model untouched


def test_worker_refuses_a_legacy_dfs_path_and_merges_nothing(worker, tiny_models):
    worker.evaluate(ps_recipe(tiny_models).to_json())
    before = weights(worker.engines["ps"].workspace.model)
    # before kinds, a 'dfs' path on a ps recipe was merged as the plain linear merge
    recipe = Recipe(method="linear", sources={"a": str(tiny_models["a"])},
                    models={"a": {"weight": 1.0}},
                    dfs={"layers": [["a", 0]], "scales": [1.0], "embed_from": "a"})
    with pytest.raises(ValueError, match="carries a data-flow path"):
        worker.evaluate(recipe.to_json())
    after = worker.engines["ps"].workspace.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


class ToyEngine:
    """A test-only engine: the base model as it is, and a log of what it was asked."""

    built: list[str] = []
    applied: list[object] = []

    def __init__(self, how: str, source: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.built.append(how)
        self.model = AutoModelForCausalLM.from_pretrained(source)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.num_layers = 4

    @classmethod
    def from_job(cls, job):
        return cls("job", job.models.base.path)

    @classmethod
    def from_recipe(cls, recipe, *, load=None):
        return cls("recipe", next(iter(recipe.model_sources().values())))

    def apply(self, recipe):
        self.applied.append(recipe)
        return self.model, self.tokenizer


@pytest.fixture()
def toy_engine():
    ToyEngine.built, ToyEngine.applied = [], []
    yield ToyEngine
    for kind in ("toy", "dfs"):
        if kind in ENGINES:
            ENGINES.unregister(kind)
    ENGINES.register("dfs", REAL_DFS)
    assert ENGINES.names() == ["dfs", "ps"]


def test_a_registered_engine_is_dispatched_to_by_kind(toy_engine, tiny_models, worker):
    class ToyRecipe:
        kind = "toy"

        def model_sources(self):
            return {"base": str(tiny_models["base"])}

    with pytest.raises(ValueError, match="recipe kind 'toy' has no engine in this version"):
        engine_for(ToyRecipe())
    ENGINES.register("toy", toy_engine)
    with pytest.raises(ValueError, match="already registered"):
        ENGINES.register("toy", toy_engine)
    recipe = ToyRecipe()
    model, tokenizer = engine_for(recipe).apply(recipe)
    assert toy_engine.built == ["recipe"] and toy_engine.applied == [recipe]
    assert worker.engine("toy") is worker.engine("toy")  # built once, lazily, from the job
    assert toy_engine.built == ["recipe", "job"]
    ENGINES.unregister("toy")
    with pytest.raises(ValueError, match="recipe kind 'toy' has no engine"):
        engine_for(recipe)
    worker.engines.pop("toy")


def test_the_worker_evaluates_what_the_kinds_engine_returns(toy_engine, tiny_models, worker):
    ENGINES.unregister("dfs")
    ENGINES.register("dfs", toy_engine)  # a stand-in for the kind's engine
    worker.engines.pop("dfs", None)
    recipe = dfs_recipe(tiny_models)
    try:
        out = worker.evaluate(recipe.to_json())
    finally:
        worker.engines.pop("dfs", None)
    assert toy_engine.applied == [recipe] and out["metrics"]["cost/layers"] == 4.0


def test_evomerge_merge_writes_a_dfs_recipe_as_a_plain_model(tiny_models, tmp_path):
    from transformers import AutoConfig

    path = tmp_path / "dfs.yaml"
    path.write_text(dfs_recipe(tiny_models).to_yaml())
    assert cli.main(["merge", str(path), str(tmp_path / "out")]) == 0
    assert AutoConfig.from_pretrained(tmp_path / "out").num_hidden_layers == 3
    assert cli.main(["merge", str(path), str(tmp_path / "out")]) == 2  # the guard: no overwrite


def test_a_dfs_recipe_is_stored_and_exported_as_a_recipe(tiny_models, tmp_path):
    recipe = dfs_recipe(tiny_models)
    out = export_recipe(recipe, tmp_path / "r.yaml", "recipe")
    assert Recipe.from_yaml(out.read_text()) == recipe


def test_mergekit_export_of_a_dfs_recipe_is_a_passthrough(tiny_models, tmp_path):
    recipe = dfs_recipe(tiny_models)
    with pytest.raises(ValueError, match="dfs"):
        mergekit_config(recipe, num_layers=4)  # the ps config builder takes ps recipes only
    text = export_mergekit_yaml(recipe)
    assert "merge_method: passthrough" in text and "slices:" in text


def test_ps_engine_refuses_an_inline_recipe_source(tiny_models, tmp_path, capsys):
    inner = ps_recipe(tiny_models)
    recipe = Recipe(method="linear", sources={"m": inner, "c": str(tiny_models["c"])},
                    models={"m": {"weight": 0.5}, "c": {"weight": 0.5}})
    for attempt in (lambda: PSEngine.from_recipe(recipe),
                    lambda: Workspace({"c": str(tiny_models["c"])}).apply(recipe),
                    lambda: mergekit_config(recipe, num_layers=4),
                    lambda: merge_to_folder(recipe, tmp_path / "out")):
        with pytest.raises(ValueError, match="source 'm' is an inline recipe"):
            attempt()
    path = tmp_path / "nested.yaml"
    path.write_text(recipe.to_yaml())
    assert cli.main(["merge", str(path), str(tmp_path / "out")]) == 2
    assert "source 'm' is an inline recipe" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
