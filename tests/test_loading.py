"""Bad inputs to loading and merging fail early with messages that name the problem and fix."""

from __future__ import annotations

import shutil

import pytest
import torch

from evomerge.config import LoadConfig
from evomerge.merge.loading import load_model, parse_source, safetensors_shapes, tensor_shapes
from evomerge.merge.workspace import Workspace
from evomerge.recipe import Recipe
from evomerge.registry import UnknownNameError
from tests.conftest import make_tiny_llama


@pytest.fixture(scope="module")
def odd_models(tiny_models, tmp_path_factory):
    """Folders that cannot be merged with the tiny models, each for one reason."""
    from tokenizers import Tokenizer
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("odd")
    wide, tok = make_tiny_llama(seed=1, intermediate_size=48)
    wide.save_pretrained(root / "wide")
    tok.save_pretrained(root / "wide")
    # same weights as "a", but a tokenizer whose first two characters swap ids
    shutil.copytree(tiny_models["a"], root / "swapped")
    raw = Tokenizer.from_file(str(tiny_models["a"] / "tokenizer.json"))
    vocab = raw.get_vocab()
    first, second = sorted((t for t in vocab if len(t) == 1), key=vocab.get)[:2]
    text = raw.to_str().replace(f'"{first}":', '"@@":').replace(f'"{second}":', f'"{first}":')
    text = text.replace('"@@":', f'"{second}":')
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text), pad_token="<pad>",
                            bos_token="<s>", eos_token="</s>").save_pretrained(root / "swapped")
    # pickle weights only
    (root / "pickled").mkdir()
    shutil.copy(tiny_models["a"] / "config.json", root / "pickled")
    base_model, _ = make_tiny_llama(seed=0)
    torch.save(base_model.state_dict(), root / "pickled" / "pytorch_model.bin")
    tok.save_pretrained(root / "pickled")
    # another architecture with the same tensor names and shapes
    cfg = MistralConfig(**{k: getattr(base_model.config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads")}, tie_word_embeddings=False)
    MistralForCausalLM(cfg).save_pretrained(root / "mistral")
    tok.save_pretrained(root / "mistral")
    return {p.name: str(p) for p in root.iterdir()}


def test_parse_source():
    assert parse_source("org/model@v1") == ("org/model", "v1")
    assert parse_source("org/model") == ("org/model", None)


def test_missing_model_path(tiny_models, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"model 'x': path .*nope.* does not exist"):
        Workspace({"base": str(tiny_models["base"]), "x": missing}, "base")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Workspace({"x": str(tmp_path / "empty")})


def test_unreachable_hub_id_names_model_and_revision():
    with pytest.raises(OSError, match=r"model 'x': could not load 'no-org/no-model' at "
                                      r"revision 'v2'"):
        load_model("x", "no-org/no-model@v2", load=LoadConfig.model_validate({}))


def test_shape_mismatch_names_tensor_and_model(tiny_models, odd_models):
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' "
                                         r"has shape \(48, 32\) in model 'wide'"):
        Workspace({"base": str(tiny_models["base"]), "wide": odd_models["wide"]}, "base")


def test_different_architecture(tiny_models, odd_models):
    with pytest.raises(ValueError, match="model 'm' is mistral.*share one architecture"):
        Workspace({"base": str(tiny_models["base"]), "m": odd_models["mistral"]}, "base")


def test_different_vocabulary(tiny_models, odd_models):
    with pytest.raises(ValueError, match="tokenizer of model 'sw' differs from 'base'.*token"):
        Workspace({"base": str(tiny_models["base"]), "sw": odd_models["swapped"]}, "base")


def test_pickle_weights_refused_unless_allowed(odd_models, tiny_models):
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*allow_pickle"):
        Workspace({"p": odd_models["pickled"]})
    ws = Workspace({"base": str(tiny_models["base"]), "p": odd_models["pickled"]}, "base",
                   load=LoadConfig(allow_pickle=True, device="cpu"))
    live = ws.apply(Recipe(method="linear", sources=ws.sources, models={"p": {"weight": 1.0}}))
    base = load_model("base", str(tiny_models["base"]), load=LoadConfig(device="cpu"))
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in live.state_dict().items())


@pytest.fixture(scope="module")
def workspace(tiny_models):
    return Workspace({n: str(p) for n, p in tiny_models.items()}, "base")


def test_unknown_method_suggests_closest(workspace):
    recipe = Recipe(method="tise", sources=workspace.sources, base_model="base",
                    models={"a": {"weight": 1.0}})
    with pytest.raises(UnknownNameError, match="Did you mean 'ties'"):
        workspace.apply(recipe)


def test_unknown_or_misplaced_parameter(workspace):
    def recipe(models, parameters=None, method="ties"):
        return Recipe(method=method, sources=workspace.sources, base_model="base",
                      models=models, parameters=parameters or {})

    with pytest.raises(ValueError, match="models.a.densty .*Did you mean 'density'"):
        workspace.apply(recipe({"a": {"densty": 0.5}}))
    with pytest.raises(ValueError, match="models.a.lambda is not a parameter"):
        workspace.apply(recipe({"a": {"lambda": 0.5}}))
    with pytest.raises(ValueError, match="parameters.gamma is not a parameter of ties"):
        workspace.apply(recipe({"a": {}}, {"gamma": 0.1}))
    with pytest.raises(ValueError, match="not loaded"):
        workspace.apply(Recipe(method="linear", sources={**workspace.sources, "z": "z"},
                               models={"z": {"weight": 1.0}}))


def test_methods_with_a_base_need_one(workspace):
    r = Recipe(method="task_arithmetic", sources=workspace.sources, models={"a": {}})
    with pytest.raises(ValueError, match="needs base_model"):
        workspace.apply(r)
    r = Recipe(method="linear", sources=workspace.sources, models={"a": {}}, non_layer="base")
    with pytest.raises(ValueError, match="non_layer: base needs base_model"):
        workspace.apply(r)


def test_safetensors_shapes_read_headers_not_weights(tiny_models, tmp_path):
    model = load_model("a", str(tiny_models["a"]), load=LoadConfig(device="cpu"))
    assert safetensors_shapes(tiny_models["a"]) == tensor_shapes(model)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert safetensors_shapes(tmp_path / "sharded") == tensor_shapes(model)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\xff" * 8)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        safetensors_shapes(bad)
