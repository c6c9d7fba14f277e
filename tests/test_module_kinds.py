"""Module kinds that fit the architecture: ``attention`` / ``mlp`` / ``default`` select each
architecture's attention and MLP modules (checked against the models' own module classes), a
kind that matches nothing is refused before any start-up, and the exported mergekit filters
select the same tensors (checked through mergekit where it runs, and its GPT-NeoX failure
checked too, so the export's warning stays true)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge import cli
from evomerge.config import ModelsConfig, ParameterSpaceConfig
from evomerge.merge.coefficients import SEARCH_KINDS, assign_kinds, resolve
from evomerge.merge.reference import merge_state_dicts
from evomerge.recipe import Recipe, Schedule
from evomerge.runs.export_mergekit import export_mergekit_yaml, mergekit_config
from evomerge.runs.model_card import model_card
from evomerge.search import driver
from evomerge.search_spaces.parameter import ParameterSpace
from tests.test_export import run_mergekit_yaml

LAYERS = 4


def module_sets(model: torch.nn.Module) -> dict[str, set[str]]:
    """Parameter names under the model's own attention and MLP modules (by class name)."""
    out: dict[str, set[str]] = {"attention": set(), "mlp": set()}
    for prefix, module in model.named_modules():
        cls = type(module).__name__
        kind = "attention" if cls.endswith("Attention") else "mlp" if cls.endswith("MLP") else None
        if kind:
            out[kind] |= {f"{prefix}.{n}" for n, _ in module.named_parameters()}
    return out


def check_kinds(names: list[str], model: torch.nn.Module) -> dict[str, list[str]]:
    got = assign_kinds(SEARCH_KINDS, names)
    want = module_sets(model)
    assert set(got["attention"]) == want["attention"] & set(names)
    assert set(got["mlp"]) == want["mlp"] & set(names)
    assert set(got["default"]) == set(names) - want["attention"] - want["mlp"]
    assert all(got.values()), {k: len(v) for k, v in got.items()}
    return got


@pytest.fixture(scope="module")
def loaded(arch_models):
    from transformers import AutoModelForCausalLM

    arch, paths = arch_models
    sds = {n: load_file(p / "model.safetensors") for n, p in paths.items()}
    model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
    return arch, paths, sds, model


def test_every_kind_matches_the_architecture_modules(loaded):
    arch, _, sds, model = loaded
    got = check_kinds(list(sds["base"]), model)
    legacy = assign_kinds(["self_attn", "mlp", "default"], list(sds["base"]))
    if arch == "gpt_neox":  # the old name never matched here; 'attention' does
        assert legacy["self_attn"] == [] and got["attention"]
    else:  # the old name is the same kind on self_attn architectures
        assert legacy["self_attn"] == got["attention"]


@pytest.mark.parametrize("arch", ["gpt2", "phi3", "gemma"])
def test_more_architectures(arch):
    import transformers as tf

    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                 head_dim=8)
    model = {
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=2,
                                                         n_head=2, n_positions=32)),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**small, pad_token_id=0)),
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**small)),
    }[arch]()
    check_kinds(list(model.state_dict()), model)


def kinds_recipe(paths: dict[str, Path], weight_a) -> Recipe:
    return Recipe(method="task_arithmetic", sources={n: str(p) for n, p in paths.items()},
                  base_model="base", models={"a": {"weight": weight_a}, "b": {"weight": 0.25}},
                  parameters={"lambda": 1.0})


def test_each_kind_value_reaches_its_tensors(loaded):
    """What a module_kinds search decodes to, merged: attention at 0 keeps the base, mlp at 1
    takes model a, the rest moves half way; on every architecture, no dead kind."""
    _, paths, sds, _ = loaded
    models = ModelsConfig(base={"path": str(paths["base"])},
                          experts={"a": {"path": str(paths["a"])}})
    space = ParameterSpace(ParameterSpaceConfig(name="parameter", method="task_arithmetic",
                                                module_kinds=True), models=models)
    value = {"attention": 0.0, "mlp": 1.0, "default": 0.5}
    recipe = space.decode({f"w/a/0/{k}": v for k, v in value.items()})
    assert recipe.models["a"]["weight"] == value
    out = merge_state_dicts(recipe, {n: sds[n] for n in ("base", "a")}, num_layers=LAYERS)
    base, a = sds["base"], sds["a"]
    for kind, names in assign_kinds(SEARCH_KINDS, list(base)).items():
        for n in names:
            want = base[n] + value[kind] * (a[n] - base[n])
            torch.testing.assert_close(out[n], want, atol=1e-6, rtol=0, msg=n)


def mergekit_pick(setting, name: str):
    """The value mergekit's filter rule gives tensor ``name`` (first substring match)."""
    if not isinstance(setting, list) or not all(isinstance(c, dict) for c in setting):
        return setting
    for cond in setting:
        if "filter" not in cond or cond["filter"] in name:
            return cond["value"]
    return None


WEIGHT_A = {"attention": Schedule(schedule="linear", values=(0.1, 0.6)),
            "mlp": (0.9, 0.3), "default": 0.45}
FILTERS = {"llama_gqa": ["self_attn", "mlp"], "qwen2_tied": ["self_attn", "mlp"],
           "gpt_neox": [".attention.", "mlp"]}


def test_exported_filters_select_the_tensors_evomerge_merged(loaded):
    arch, paths, sds, _ = loaded
    recipe = kinds_recipe(paths, WEIGHT_A)
    names = list(sds["base"])
    setting = mergekit_config(recipe, num_layers=LAYERS, tensor_names=names)["models"][0][
        "parameters"]["weight"]
    assert [c["filter"] for c in setting if "filter" in c] == FILTERS[arch]
    unnamed = mergekit_config(recipe, num_layers=LAYERS)["models"][0]["parameters"]["weight"]
    assert len(unnamed) == 4 + 1 + 1  # every attention filter when the names are unknown
    for setting_ in (setting, unnamed):
        for n in names:
            picked = mergekit_pick(setting_, n)
            if isinstance(picked, list):  # a per-layer list: mergekit reads layer i's entry
                from evomerge.merge.coefficients import layer_index

                picked = picked[layer_index(n) or 0]
            assert picked == pytest.approx(resolve(WEIGHT_A, n, num_layers=LAYERS)), n


def test_mergekit_agrees_or_fails_as_the_export_warns(loaded, tmp_path):
    arch, paths, sds, _ = loaded
    recipe = kinds_recipe(paths, WEIGHT_A)
    if arch == "gpt_neox":
        with pytest.warns(UserWarning, match="stock mergekit 0.1.5 does not run these gpt_neox"):
            text = export_mergekit_yaml(recipe)
        assert "# WARNING: stock mergekit" in text
        with pytest.raises(RuntimeError, match="attention.bias required but not present"):
            run_mergekit_yaml(text, tmp_path)  # the claim the warning makes, still true
        card = model_card(recipe, title="t", mergekit_yaml=text)
        assert "No runnable mergekit config: stock mergekit 0.1.5 does not run" in card
        assert "The same merge as a mergekit config" not in card
        return
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = export_mergekit_yaml(recipe)
    assert "WARNING" not in text
    assert "The same merge as a mergekit config" in model_card(recipe, title="t",
                                                               mergekit_yaml=text)
    theirs = run_mergekit_yaml(text, tmp_path)
    ours = merge_state_dicts(recipe, sds, num_layers=LAYERS)
    assert set(theirs) == set(ours)
    for name, tensor in ours.items():
        torch.testing.assert_close(theirs[name], tensor, atol=1e-6, rtol=0, msg=name)


def test_legacy_self_attn_recipes_merge_as_before(tiny_models):
    sds = {n: load_file(p / "model.safetensors") for n, p in tiny_models.items()}
    old = {"self_attn": 0.2, "mlp": 0.7, "default": 0.4}
    new = {"attention": 0.2, "mlp": 0.7, "default": 0.4}
    a = merge_state_dicts(kinds_recipe(tiny_models, old), sds, num_layers=LAYERS)
    b = merge_state_dicts(kinds_recipe(tiny_models, new), sds, num_layers=LAYERS)
    assert all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(ValueError, match="both 'attention' and its legacy name"):
        kinds_recipe(tiny_models, {**new, "self_attn": 0.1})


# -- a kind that matches nothing: refused before any start-up ------------------------------------
@pytest.fixture(scope="module")
def opt_family(tmp_path_factory) -> dict[str, Path]:
    """A tiny OPT (its MLP is fc1/fc2 right under the layer: no 'mlp' in any tensor name)."""
    from transformers import OPTConfig, OPTForCausalLM

    from evomerge.toy.tokenizer import make_tokenizer

    tok = make_tokenizer()
    root = tmp_path_factory.mktemp("opt")
    cfg = OPTConfig(vocab_size=len(tok), hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16)
    out = {}
    for i, name in enumerate(("base", "a")):
        torch.manual_seed(i)
        OPTForCausalLM(cfg).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def job_file(tmp: Path, base: Path, expert: Path, **space) -> Path:
    job = {"name": "k", "run_dir": str(tmp / "run"),
           "models": {"base": {"path": str(base)}, "experts": {"a": {"path": str(expert)}}},
           "search": {"space": {"name": "parameter", "method": "task_arithmetic", **space},
                      "trials": 2},
           "evaluators": [{"name": "cost"}], "objectives": [{"metric": "cost/params"}]}
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _refuse(*args, **kwargs):
    raise AssertionError("a refused job reached the study or the worker pool")


def test_kind_matching_nothing_is_refused_in_one_line(opt_family, tmp_path, monkeypatch,
                                                      capsys):
    monkeypatch.setattr(driver, "open_study", _refuse)
    monkeypatch.setattr(driver, "WorkerPool", _refuse)
    ray_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    job = job_file(tmp_path, opt_family["base"], opt_family["a"], module_kinds=True)
    for command in ("validate", "search"):
        assert cli.main([command, str(job)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1, err
        assert "search.space.module_kinds: kind 'mlp' matches no tensor of models.base.path" \
            in err[0] and "model_type opt" in err[0] and "module_kinds: false" in err[0]
    assert not (tmp_path / "run").exists()
    assert ("ray" in sys.modules and sys.modules["ray"].is_initialized()) == ray_before
    plain = job_file(tmp_path, opt_family["base"], opt_family["a"])
    assert cli.main(["validate", str(plain)]) == 0  # without kinds the job is fine
    capsys.readouterr()


def test_module_kinds_validate_on_every_fixture_architecture(arch_models, tmp_path, capsys):
    _, paths = arch_models
    job = job_file(tmp_path, paths["base"], paths["a"], module_kinds=True,
                   schedule={"kind": "piecewise", "knots": 3})
    assert cli.main(["validate", str(job)]) == 0, capsys.readouterr().err
    capsys.readouterr()
