"""The dfs engine: a path over loaded layers runs like a model (logits, KV cache, generate,
evaluators), shares the loaded weights, and refuses models or paths it cannot run."""

# ruff: noqa: F811 - the shared fixtures are imported, then named as test arguments
from __future__ import annotations

import json

import pytest
import torch

from evomerge.config import AccuracyEvalConfig, EntropyEvalConfig, PerplexityEvalConfig
from evomerge.dfs.engine import DFSEngine
from evomerge.engines import ENGINES, engine_factory
from evomerge.evaluators.base import build_evaluator
from evomerge.merge.workspace import Workspace
from evomerge.recipe import DFSRecipe, Recipe
from tests.conftest import make_tiny_arch, make_tiny_llama
from tests.dfs_fixtures import PROMPTS, engine, family  # noqa: F401 (fixtures)


def path_recipe(sources, seed: int = 0) -> DFSRecipe:
    """A random path over 3 models with random scales; layer ("a", 1) is used twice."""
    gen = torch.Generator().manual_seed(seed)
    picks = [("a", 1), ("b", 0), ("a", 1), ("c", 3), ("b", 2), ("a", 3)]
    scales = (0.5 + torch.rand(len(picks), generator=gen)).tolist()
    return DFSRecipe(sources=sources, layers=picks, scales=scales, embed_from="b")


def left_padded(tokenizer, prompts=PROMPTS):
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True)


def reference_logits(engine: DFSEngine, recipe: DFSRecipe, ids: torch.Tensor) -> torch.Tensor:
    """The path computed by hand from the loaded modules (no padding, causal sdpa)."""
    src = engine.loaded[recipe.embed_from].model.model
    h = src.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    rope = src.rotary_emb(h, pos)
    for (name, i), scale in zip(recipe.layers, recipe.scales, strict=True):
        layer = engine.loaded[name].layers[i]
        h = layer(h * scale, attention_mask=None, position_ids=pos, position_embeddings=rope)
    return engine.loaded[recipe.embed_from].model.lm_head(src.norm(h))


def test_registered_as_the_dfs_engine():
    assert "dfs" in ENGINES.names()
    assert engine_factory("dfs") is DFSEngine


def test_identity_path_reproduces_model_a_bitwise(engine, family):
    sources = family[1]
    ident = DFSRecipe(sources=sources, layers=[("a", i) for i in range(4)], scales=[1.0] * 4,
                      embed_from="a")
    model, tok = engine.apply(ident)
    enc = left_padded(tok)
    with torch.no_grad():
        ours = model(**enc).logits
        theirs = engine.loaded["a"].model(**enc).logits
    assert torch.equal(ours, theirs)  # the same modules in the same order: bit for bit


def test_num_layers_counts_every_source_layer(engine):
    assert engine.num_layers == 16  # base, a, b, c: 4 decoder layers each
    assert engine.layer_table[:5] == (("base", 0), ("base", 1), ("base", 2), ("base", 3),
                                      ("a", 0))


def test_path_matches_a_hand_computed_forward_and_copies_no_weights(engine, family):
    recipe = path_recipe(family[1])
    model, tok = engine.apply(recipe)
    ids = tok(["rev:hello>olleh"], return_tensors="pt").input_ids
    with torch.no_grad():
        got, want = model(ids).logits, reference_logits(engine, recipe, ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    loaded = {p.data_ptr() for s in engine.loaded.values() for p in s.model.parameters()}
    assert all(p.data_ptr() in loaded for p in model.parameters())
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6


def test_kv_cache_has_one_entry_per_slot(engine, family):
    """With the cache, a layer used twice must keep two entries: cached decoding equals a full
    forward at every step, and greedy generate() with and without the cache agree."""
    model, tok = engine.apply(path_recipe(family[1], seed=1))
    enc = left_padded(tok)
    with torch.no_grad():
        cached = model.generate(**enc, max_new_tokens=8, do_sample=False,
                                pad_token_id=tok.pad_token_id)
        uncached = model.generate(**enc, max_new_tokens=8, do_sample=False, use_cache=False,
                                  pad_token_id=tok.pad_token_id)
        out = model(**enc, use_cache=True)
        assert len(out.past_key_values.layers) == 6
        nxt = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([enc.attention_mask, torch.ones_like(nxt)], 1)
        step = model(input_ids=nxt, attention_mask=mask, cache=out.past_key_values)
        full = model(input_ids=torch.cat([enc.input_ids, nxt], 1), attention_mask=mask)
    assert torch.equal(cached, uncached)
    assert torch.allclose(step.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=0)


def test_batched_left_padded_rows_equal_single_rows(engine, family):
    model, tok = engine.apply(path_recipe(family[1], seed=2))
    enc = left_padded(tok)
    batch = model.generate(**enc, max_new_tokens=6, do_sample=False,
                           pad_token_id=tok.pad_token_id)
    for row, prompt in zip(batch, PROMPTS, strict=True):
        one = tok([prompt], return_tensors="pt")
        alone = model.generate(**one, max_new_tokens=6, do_sample=False,
                               pad_token_id=tok.pad_token_id)[0, one.input_ids.shape[1]:]
        new = row[enc.input_ids.shape[1]:].tolist()  # after an eos, the batch row is padded
        assert new[:len(alone)] == alone.tolist()
        assert all(t == tok.pad_token_id for t in new[len(alone):])


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dfs_eval") / "rev"
    folder.mkdir()
    rows = [{"prompt": f"rev:{w}>", "answer": w[::-1]} for w in ("abc", "hello", "xy", "mnop")]
    for split in ("validation", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def test_evaluators_run_on_a_path_and_the_identity_path_scores_as_model_a(engine, family,
                                                                           eval_data):
    evaluators = [build_evaluator(c) for c in (
        AccuracyEvalConfig(name="accuracy", data=eval_data, max_new_tokens=5),
        EntropyEvalConfig(name="entropy", data=eval_data, batch_size=2),
        PerplexityEvalConfig(name="perplexity", data=eval_data, batch_size=2))]
    ident = DFSRecipe(sources=family[1], layers=[("a", i) for i in range(4)],
                      scales=[1.0] * 4, embed_from="a")
    model, tok = engine.apply(ident)
    a = engine.loaded["a"]
    for ev in evaluators:
        assert ev.evaluate(model, tok) == ev.evaluate(a.model, a.tokenizer)
    model, tok = engine.apply(path_recipe(family[1]))
    for ev in evaluators:
        (value,) = [v for k, v in ev.evaluate(model, tok).items() if not k.startswith("scored/")]
        assert value == value  # not NaN (the scored/ counts are cost, not scores)


def test_inline_ps_recipe_source_is_merged_once(family):
    """PS-then-DFS: an inline ps recipe as a source is the model the ps engine merges."""
    sources = family[1]
    ps = Recipe(method="linear", sources={"a": sources["a"], "b": sources["b"]},
                models={"a": {"weight": 0.6}, "b": {"weight": 0.4}})
    recipe = DFSRecipe(sources={"ps": ps, "c": sources["c"]},
                       layers=[("ps", 0), ("ps", 1), ("ps", 2), ("ps", 3)], scales=[1.0] * 4,
                       embed_from="ps")
    engine = engine_factory("dfs").from_recipe(recipe)
    assert engine.num_layers == 4  # only the sources the recipe uses are loaded
    model, tok = engine.apply(recipe)
    merged = Workspace.from_recipe(ps).apply(ps)
    ids = left_padded(tok)
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, merged(**ids).logits)
    mixed = DFSRecipe(sources={"ps": ps, "c": sources["c"]}, layers=[("ps", 0), ("c", 1)],
                      scales=[1.0, 0.8], embed_from="c")
    both = DFSEngine(mixed.sources)
    assert both.num_layers == 8 and both.apply(mixed)[0](**ids).logits.isfinite().all()


# -- bad input ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def odd_models(tmp_path_factory):
    """A wider Llama, a tiny GPT-NeoX and a tiny Qwen2 next to the tiny Llama."""
    root = tmp_path_factory.mktemp("dfs_odd")
    out = {}
    for name, (model, tok) in {
        "llama": make_tiny_llama(seed=0), "wide": make_tiny_llama(seed=0, hidden_size=48),
        "neox": make_tiny_arch("gpt_neox"), "qwen": make_tiny_arch("qwen2_tied"),
    }.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def test_models_of_different_hidden_sizes_are_refused(odd_models):
    with pytest.raises(ValueError, match=r"model 'wide' has hidden_size 48 but model 'llama' "
                                         r"has 32; the layers of a dfs path"):
        DFSEngine({"llama": odd_models["llama"], "wide": odd_models["wide"]})


def test_models_of_different_architectures_are_refused(odd_models):
    with pytest.raises(ValueError, match=r"model 'qwen' has model_type 'qwen2' but model "
                                         r"'llama' has 'llama'"):
        DFSEngine({"llama": odd_models["llama"], "qwen": odd_models["qwen"]})


def test_an_unsupported_architecture_is_refused(odd_models):
    with pytest.raises(ValueError, match=r"model 'neox' is a 'gpt_neox' model; the dfs engine "
                                         r"supports llama, qwen2"):
        DFSEngine({"neox": odd_models["neox"]})


def test_layer_index_out_of_range_is_refused(engine, family):
    bad = DFSRecipe(sources=family[1], layers=[("a", 0), ("c", 4)], scales=[1.0, 1.0],
                    embed_from="a")
    with pytest.raises(ValueError, match=r"layers\[1\] is \('c', 4\) but model 'c' has 4 "
                                         r"decoder layers; give a layer index from 0 to 3"):
        engine.apply(bad)


def test_other_sources_and_kinds_are_refused(engine, family):
    moved = {**family[1], "a": family[1]["b"]}
    with pytest.raises(ValueError, match="recipe source 'a' is .* but this engine loaded"):
        engine.apply(DFSRecipe(sources=moved, layers=[("a", 0)], scales=[1.0], embed_from="a"))
    with pytest.raises(ValueError, match="takes kind 'dfs' recipes only, not kind 'ps'"):
        engine.apply(Recipe(method="linear", sources=family[1]))


def test_hidden_state_outputs_are_not_recorded_on_shared_layers(engine, family):
    """transformers records hidden states with hooks on every decoder layer it finds; on a path
    those are shared, so they are kept off (empty), and the source models still record theirs."""
    model, tok = engine.apply(path_recipe(family[1]))
    ids = tok(["rev:abc>"], return_tensors="pt")
    with torch.no_grad():
        assert model(**ids, output_hidden_states=True).hidden_states == ()
        own = engine.loaded["a"].model(**ids, output_hidden_states=True).hidden_states
    assert len(own) == 5  # embeddings + 4 layers: no hook left behind by the path
