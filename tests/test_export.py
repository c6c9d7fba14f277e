"""Export: mergekit YAML reproduces evomerge's weights in mergekit, HF folders load and run under
lm_eval, recipe YAMLs round-trip through `evomerge merge`, run exports pick trials, bad inputs
fail cleanly and leave nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial
from safetensors.torch import load_file

from evomerge import cli
from evomerge.merge.reference import merge_state_dicts
from evomerge.recipe import DFSPath, Recipe
from evomerge.runs.export import export_recipe, export_run
from evomerge.runs.export_mergekit import mergekit_config, mergekit_yaml
from evomerge.runs.guard import atomic
from evomerge.runs.model_card import RECIPE_FILE

NUM_LAYERS = 4  # tests/conftest.py TINY
NON_LAYER = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
# Max |mergekit - evomerge| allowed per method (float32 models). linear and task arithmetic do
# the same float32 operations in the same order; TIES/breadcrumbs may differ where magnitudes
# tie at the trimming threshold, slerp in trigonometry rounding. All were bitwise equal here.
TOL = {"linear": 0.0, "task_arithmetic": 0.0, "ties": 1e-6, "breadcrumbs": 1e-6, "slerp": 1e-6,
       "dare_linear": 0.0}
# mergekit parameters that change the result of each method (mergekit also accepts e.g. density
# for task_arithmetic and ignores it): an export must write nothing else.
EFFECTIVE = {
    "linear": {"weight", "normalize"},
    "task_arithmetic": {"weight", "lambda", "normalize"},
    "ties": {"weight", "density", "lambda", "normalize", "rescale"},
    "dare_linear": {"weight", "density", "lambda", "normalize", "rescale"},
    "dare_ties": {"weight", "density", "lambda", "normalize", "rescale"},
    "breadcrumbs": {"weight", "density", "gamma", "lambda", "normalize", "rescale"},
    "slerp": {"t"},
}
KINDS = {"self_attn": (0.1, 0.2, 0.3, 0.4), "mlp": 0.7, "default": (0.5, 0.6)}


def _recipe(paths, method, models, parameters=None, **kw) -> Recipe:
    needs_base = method != "linear" or kw.get("non_layer") == "base"
    return Recipe(method=method, sources={n: str(p) for n, p in paths.items()},
                  base_model="base" if needs_base else None, models=models,
                  parameters=parameters or {}, **kw)


CASES = {
    "linear": ("linear", {"a": {"weight": 0.3}, "b": {"weight": 0.5},
                          "c": {"weight": (0.1, 0.9)}}, {"normalize": False}, {}),
    "task_arithmetic-kinds": ("task_arithmetic", {"a": {"weight": KINDS}, "b": {"weight": 0.4}},
                              {"lambda": 0.8}, {}),
    "ties-groups": ("ties", {"a": {"weight": 0.7, "density": 0.4},
                             "b": {"weight": 0.5, "density": (0.3, 0.8)}},
                    {"normalize": False, "lambda": 1.2}, {}),
    "ties-kinds-rescale": ("ties", {"a": {"weight": {"mlp": 0.9, "default": 0.4},
                                          "density": {"self_attn": 0.3, "default": 0.6}},
                                    "b": {"weight": 0.5}},
                           {"rescale": True, "density": 0.7}, {}),
    "breadcrumbs": ("breadcrumbs", {"a": {"weight": 0.7, "density": 0.8, "gamma": 0.05},
                                    "b": {"weight": 0.5, "density": (0.9, 0.7)}},
                    {"lambda": 0.9}, {}),
    "slerp-kinds": ("slerp", {"a": {}}, {"t": {"self_attn": (0.2, 0.8), "default": 0.4}}, {}),
    "task_arithmetic-base": ("task_arithmetic", {"a": {"weight": (0.5, 0.9)}, "b": {}},
                             {"weight": 0.4}, {"non_layer": "base"}),
    "linear-base": ("linear", {"a": {"weight": (0.5, 0.9)}, "b": {"weight": 0.4}}, {},
                    {"non_layer": "base"}),
    "ties-base": ("ties", {"a": {"weight": 0.7, "density": 0.5}, "b": {"weight": 0.6}},
                  {}, {"non_layer": "base"}),
    "slerp-base": ("slerp", {"b": {}}, {"t": (0.3, 0.6)}, {"non_layer": "base"}),
    "dare_linear-density1": ("dare_linear", {"a": {"weight": 0.6, "density": 1.0},
                                             "b": {"weight": 0.3}}, {"lambda": 1.1}, {}),
}


@pytest.fixture(scope="module")
def state_dicts(tiny_models):
    return {n: load_file(p / "model.safetensors") for n, p in tiny_models.items()}


def run_mergekit_yaml(text: str, tmp: Path) -> dict[str, torch.Tensor]:
    """The `mergekit-yaml CONFIG OUT` command, run in this process (its click entry point)."""
    from mergekit.scripts.run_yaml import main

    config, out = tmp / "mergekit.yaml", tmp / "mergekit-out"
    config.write_text(text)
    main([str(config), str(out), "--quiet", "--no-copy-tokenizer"], standalone_mode=False)
    return load_file(out / "model.safetensors")


def written_keys(config: dict) -> set[str]:
    keys = set(config.get("parameters", {}))
    for entry in config["models"]:
        keys |= set(entry.get("parameters", {}))
    return keys


@pytest.mark.parametrize("case", list(CASES))
def test_mergekit_yaml_reproduces_evomerge(case, tiny_models, state_dicts, tmp_path):
    from mergekit.merge_methods import registry

    method, models, params, kw = CASES[case]
    recipe = _recipe(tiny_models, method, models, params, **kw)
    text = mergekit_yaml(recipe, num_layers=NUM_LAYERS, tensor_names=list(state_dicts["base"]))
    config = yaml.safe_load(text)
    keys = written_keys(config)
    assert keys <= EFFECTIVE[method], keys - EFFECTIVE[method]
    assert keys <= {p.name for p in registry.get(method).spec.parameters}

    theirs = run_mergekit_yaml(text, tmp_path)
    ours = merge_state_dicts(recipe, state_dicts, num_layers=NUM_LAYERS)
    assert set(theirs) == set(ours)
    for name, tensor in ours.items():
        torch.testing.assert_close(theirs[name], tensor, atol=TOL[method], rtol=0, msg=name)
    changed = [n for n in ours if not torch.equal(ours[n], state_dicts["base"][n])]
    assert len(changed) > 20  # the merge did something the comparison could catch
    if recipe.non_layer == "base":
        assert not set(NON_LAYER) & set(changed)
    else:
        assert set(NON_LAYER) <= set(changed)


def test_per_layer_lists_have_one_value_per_layer(tiny_models):
    recipe = _recipe(tiny_models, *CASES["task_arithmetic-kinds"][:3])
    config = mergekit_config(recipe, num_layers=6)
    weight = config["models"][0]["parameters"]["weight"]
    assert weight == [{"filter": "self_attn", "value": [0.1, 0.1, 0.2, 0.3, 0.3, 0.4]},
                      {"filter": "mlp", "value": 0.7},
                      {"value": [0.5, 0.5, 0.5, 0.6, 0.6, 0.6]}]
    assert config["parameters"] == {"lambda": 0.8, "normalize": False}  # flags always written
    slerp = mergekit_config(_recipe(tiny_models, "slerp", {"a": {}}), num_layers=4)
    assert slerp["parameters"] == {"t": 0.5}  # required by mergekit, evomerge's default


def test_dare_export_notes_seed_and_keeps_l1_norm(tiny_models, state_dicts, tmp_path):
    recipe = _recipe(tiny_models, "dare_linear", {"a": {"weight": 0.8, "density": 0.5}},
                     {"lambda": 0.9}, seed=7)
    text = mergekit_yaml(recipe, num_layers=NUM_LAYERS)
    assert "cannot take that seed" in text and text.startswith("#")
    theirs = run_mergekit_yaml(text, tmp_path)
    ours = merge_state_dicts(recipe, state_dicts, num_layers=NUM_LAYERS)
    base = state_dicts["base"]
    name = "model.layers.1.mlp.down_proj.weight"
    d_ours, d_theirs = ours[name] - base[name], theirs[name] - base[name]
    assert not torch.equal(d_ours, d_theirs)  # different random masks, as documented
    # rescale keeps each sparsified task vector's L1 norm, whatever the mask
    torch.testing.assert_close(d_theirs.abs().sum(), d_ours.abs().sum(), rtol=1e-4, atol=0)
    for d in (d_ours, d_theirs):
        assert 0.45 < (d != 0).float().mean().item() < 0.55


def test_mergekit_export_refusals(tiny_models):
    dfs = _recipe(tiny_models, "linear", {"a": {}}, dfs=DFSPath(
        layers=(("a", 0), ("b", 1)), scales=(1.0, 1.0), embed_from="a"))
    with pytest.raises(ValueError, match="data-flow"):
        mergekit_config(dfs, num_layers=4)
    flag = _recipe(tiny_models, "ties", {"a": {}}, {"normalize": (1.0, 0.0)})
    with pytest.raises(ValueError, match="flag 'normalize' varies over layers"):
        mergekit_config(flag, num_layers=4)
    too_many = _recipe(tiny_models, "ties", {"a": {"weight": (0.1,) * 5}})
    with pytest.raises(ValueError, match="5 per-layer-group values"):
        mergekit_config(too_many, num_layers=4)
    base = _recipe(tiny_models, "ties", {"a": {}}, non_layer="base")
    with pytest.raises(ValueError, match="cannot select it alone"):
        mergekit_config(base, num_layers=4, tensor_names=["norm.weight",
                                                          "model.layers.0.mlp.norm.weight"])


# -- Hugging Face folder -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_export(tiny_models, tmp_path_factory):
    recipe = _recipe(tiny_models, *CASES["ties-kinds-rescale"][:3])
    out = tmp_path_factory.mktemp("hf") / "merged"
    export_recipe(recipe, out, "hf", metrics={"acc": 0.625}, held_out={"acc": 0.5},
                  study_name="demo", trial=7)
    return recipe, out


def test_hf_folder_loads_in_fresh_process_with_same_logits(hf_export, tmp_path):
    from evomerge.merge.workspace import Workspace

    recipe, out = hf_export
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "README.md", RECIPE_FILE} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    ids = [[1, 5, 9, 14, 3, 7, 22, 30]]
    script = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        f"torch.save(m(torch.tensor({ids})).logits.detach(), sys.argv[2])\n"
    )
    subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "logits.pt")],
                   check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    torch.set_num_threads(1)
    model = Workspace.from_recipe(recipe).apply(recipe)
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-6, rtol=0)


def test_model_card_records_recipe_scores_and_provenance(hf_export):
    import evomerge

    recipe, out = hf_export
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    for text in ("study `demo`", "trial 7", "| acc | 0.625 |", "| acc | 0.5 |", "`ties`",
                 f"evomerge {evomerge.__version__}", "UTC", str(recipe.sources["a"]),
                 "merge_method: ties", "Held-out scores"):
        assert text in card, text
    block = card.split("## Recipe")[1].split("```yaml\n")[1].split("```")[0]
    assert Recipe.from_yaml(block) == recipe
    assert Recipe.from_yaml((out / RECIPE_FILE).read_text()) == recipe


def test_lm_eval_cli_runs_on_export(hf_export, tmp_path):
    from evomerge.evaluators.lm_tasks import write_toy_tasks

    _, out = hf_export
    data = tmp_path / "suite" / "data" / "copy"
    data.mkdir(parents=True)
    for split in ("validation", "test"):
        rows = [{"prompt": f"copy {w}:", "answer": w} for w in ("ab", "cd")]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = write_toy_tasks(tmp_path / "suite", ["copy"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "ds")}
    subprocess.run(
        ["lm_eval", "--model", "hf", "--model_args", f"pretrained={out}", "--tasks", "toy_copy",
         "--include_path", str(tasks), "--device", "cpu", "--batch_size", "2",
         "--output_path", str(tmp_path / "results")],
        check=True, env=env, timeout=300, capture_output=True,
    )
    (result,) = (tmp_path / "results").rglob("results_*.json")
    scores = json.loads(result.read_text())["results"]["toy_copy"]
    assert 0.0 <= scores["exact_match,none"] <= 1.0


def test_recipe_yaml_round_trips_through_evomerge_merge(hf_export, tmp_path):
    recipe, hf_out = hf_export
    path = export_recipe(recipe, tmp_path / "recipe.yaml", "recipe", metrics={"acc": 0.625})
    text = path.read_text()
    assert text.startswith("# Exported by evomerge") and Recipe.from_yaml(text) == recipe
    assert cli.main(["merge", str(path), str(tmp_path / "again")]) == 0
    again = load_file(tmp_path / "again" / "model.safetensors")
    first = load_file(hf_out / "model.safetensors")
    assert again.keys() == first.keys()
    assert all(torch.equal(again[k], first[k]) for k in first)


# -- exports from a run ---------------------------------------------------------------------------
def make_run(run_dir: Path, paths, objectives, trials) -> Path:
    """A run folder as `evomerge search` leaves it: job.yaml and a journal study."""
    name = run_dir.name
    job = {
        "name": name, "run_dir": str(run_dir),
        "models": {"base": {"path": str(paths["base"])},
                   "experts": {n: {"path": str(paths[n])} for n in ("a", "b")}},
        "search": {"sampler": {"name": "nsga2" if len(objectives) > 1 else "cmaes"}},
        "evaluators": [{"name": "entropy", "data": "unused.jsonl"}],
        "objectives": [{"metric": m, "direction": d} for m, d in objectives],
    }
    run_dir.mkdir(parents=True)
    (run_dir / "job.yaml").write_text(yaml.safe_dump(job))
    storage = JournalStorage(JournalFileBackend(str(run_dir / "study.journal")))
    study = optuna.create_study(study_name=name, storage=storage,
                                directions=[d for _, d in objectives])
    for state, values, recipe, metrics in trials:
        attrs = {"recipe": recipe.to_dict(), "metrics": metrics} if recipe else {"error": "boom"}
        study.add_trial(create_trial(state=state, values=values, user_attrs=attrs))
    return run_dir


@pytest.fixture(scope="module")
def run(tiny_models, tmp_path_factory):
    def ties(w):
        return _recipe(tiny_models, "ties", {"a": {"weight": w, "density": 0.5},
                                             "b": {"weight": 0.5}})

    done = TrialState.COMPLETE
    root = tmp_path_factory.mktemp("runs")
    run_dir = make_run(root / "single", tiny_models, [("acc", "maximize")], [
        (done, [0.4], ties(0.3), {"acc": 0.4}),
        (TrialState.FAIL, None, None, None),
        (done, [0.7], ties(0.6), {"acc": 0.7}),
        (TrialState.PRUNED, None, ties(0.9), {}),
    ])
    study = optuna.load_study(study_name="single", storage=JournalStorage(
        JournalFileBackend(str(run_dir / "study.journal"))))
    study.set_user_attr("held_out:2", {"metrics": {"acc": 0.65}})
    return run_dir, ties


def test_export_run_trial_and_best(run, tmp_path, capsys):
    run_dir, ties = run
    out = tmp_path / "t0.yaml"
    assert cli.main(["export", str(run_dir), str(out), "--trial", "0", "--format", "recipe"]) == 0
    assert Recipe.from_yaml(out.read_text()) == ties(0.3)
    assert "study 'single' trial 0" in out.read_text()
    best = tmp_path / "best.yaml"
    assert cli.main(["export", str(run_dir), str(best), "--format", "mergekit"]) == 0
    text = best.read_text()
    assert "trial 2" in text and "acc=0.7" in text and "held-out metrics: acc=0.65" in text
    assert yaml.safe_load(text) == mergekit_config(ties(0.6), num_layers=NUM_LAYERS)
    assert capsys.readouterr().out.split() == [str(out), str(best)]


@pytest.mark.parametrize("args, message", [
    (["--trial", "9"], "trial 9 does not exist in study 'single'; valid trial numbers: 0..3"),
    (["--trial", "1"], "trial 1 is FAIL; only COMPLETE trials can be exported (its error: boom)"),
    (["--trial", "3"], "trial 3 is PRUNED; only COMPLETE trials can be exported"),
])
def test_export_run_refuses_bad_trials(run, tmp_path, capsys, args, message):
    out = tmp_path / "x.yaml"
    assert cli.main(["export", str(run[0]), str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_existing_out_needs_force_and_force_replaces(run, tmp_path, capsys, monkeypatch):
    run_dir, ties = run
    out = tmp_path / "m.yaml"
    export_run(run_dir, out, "recipe", trial=0)  # a previous export: the only thing --force takes
    before = out.read_text()
    assert cli.main(["export", str(run_dir), str(out), "--format", "recipe"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert out.read_text() == before
    assert cli.main(["export", str(run_dir), str(out), "--format", "recipe", "--force"]) == 0
    assert Recipe.from_yaml(out.read_text()) == ties(0.6)
    folder = tmp_path / "folder"
    export_run(run_dir, folder, "mergekit", pareto=True)
    export_run(run_dir, folder, "recipe", pareto=True, force=True)
    assert sorted(p.name for p in folder.iterdir()) == [".evomerge-export", "index.csv",
                                                        "trial-2.yaml"]
    work = tmp_path / "work"  # a throwaway current folder: --force must never replace it
    work.mkdir()
    monkeypatch.chdir(work)
    for precious in (run_dir, Path(ties(0.6).sources["a"]).parent, work, tmp_path):
        with pytest.raises(ValueError, match="refusing to replace"):
            export_run(run_dir, precious, "recipe", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "m.yaml", "work"]


def test_unwritable_out_is_a_clear_error(run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["export", str(run[0]), str(blocker / "sub" / "x.yaml")]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_pareto_export_writes_front_and_index(tiny_models, tmp_path):
    recipes = [_recipe(tiny_models, "task_arithmetic", {"a": {"weight": w}})
               for w in (0.2, 0.5, 0.8)]
    done = TrialState.COMPLETE
    two = [("acc", "maximize"), ("cost", "minimize")]
    run_dir = make_run(tmp_path / "multi", tiny_models, two, [
        (done, [0.5, 2.0], recipes[0], {"acc": 0.5, "cost": 2.0, "extra": 1.5}),
        (done, [0.4, 3.0], recipes[1], {"acc": 0.4, "cost": 3.0, "extra": 2.5}),  # dominated
        (done, [0.7, 4.0], recipes[2], {"acc": 0.7, "cost": 4.0, "extra": 3.5}),
    ])
    with pytest.raises(ValueError, match=r"2 trials are Pareto-optimal \(0, 2\)"):
        export_run(run_dir, tmp_path / "best.yaml", "recipe")
    out = tmp_path / "front"
    paths = export_run(run_dir, out, "mergekit", pareto=True)
    assert paths == [out / "trial-0.yaml", out / "trial-2.yaml"]
    assert sorted(p.name for p in out.iterdir()) == [".evomerge-export", "index.csv",
                                                     "trial-0.yaml", "trial-2.yaml"]
    rows = (out / "index.csv").read_text().splitlines()
    assert rows[0] == "trial,path,objective:acc,objective:cost,acc,cost,extra"
    assert rows[1:] == ["0,trial-0.yaml,0.5,2.0,0.5,2.0,1.5", "2,trial-2.yaml,0.7,4.0,0.7,4.0,3.5"]
    assert yaml.safe_load(paths[1].read_text())["models"][0]["parameters"] == {"weight": 0.8}


def test_failed_pareto_hf_export_leaves_nothing(tiny_models, tmp_path):
    good = _recipe(tiny_models, "task_arithmetic", {"a": {"weight": 0.5}})
    missing = {**tiny_models, "b": tmp_path / "no-such-model"}
    bad = _recipe(missing, "task_arithmetic", {"b": {"weight": 0.5}})
    done = TrialState.COMPLETE
    run_dir = make_run(tmp_path / "runs" / "broken", tiny_models,
                       [("acc", "maximize"), ("cost", "minimize")],
                       [(done, [0.5, 1.0], good, {}), (done, [0.6, 2.0], bad, {})])
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        export_run(run_dir, tmp_path / "new" / "deeper" / "out", "hf", pareto=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_atomic_write_is_hidden_until_done(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic(out, force=False) as tmp:
            tmp.mkdir()
            (tmp / "config.json").write_text("{}")
            assert tmp.parent == tmp_path and tmp.name.startswith(".model.partial-")
            assert not out.exists()
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic(out, force=False) as tmp:
        tmp.mkdir()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_unknown_format_is_refused(tiny_models, tmp_path):
    recipe = _recipe(tiny_models, "linear", {"a": {}})
    with pytest.raises(ValueError, match="format 'gguf' is not one of mergekit, hf, recipe"):
        export_recipe(recipe, tmp_path / "x", "gguf")
