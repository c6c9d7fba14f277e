"""The perplexity and cost evaluators."""

from __future__ import annotations

import json
import math

import pytest
import torch

from evomerge.config import CostEvalConfig, PerplexityEvalConfig
from evomerge.evaluators.cost import CostEvaluator
from evomerge.evaluators.perplexity import PerplexityEvaluator

TEXTS = ["the quick brown fox", "abc", "hello world, again and again", "xy"]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def lm(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_models["b"], dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_models["b"])


def ppl(data, **kw):
    return PerplexityEvaluator(PerplexityEvalConfig(name="perplexity", data=str(data), **kw))


def test_matches_the_models_own_loss(tmp_path, lm):
    model, tok = lm
    path = write_rows(tmp_path / "one.jsonl", [{"text": TEXTS[0]}])
    enc = tok(TEXTS[0], return_tensors="pt")
    with torch.no_grad():
        loss = model(**enc, labels=enc["input_ids"]).loss
    assert ppl(path).evaluate(model, tok)["perplexity/one"] == pytest.approx(
        math.exp(loss.item()), rel=1e-5
    )


def test_padding_and_batching_do_not_change_it(tmp_path, lm):
    model, tok = lm
    path = write_rows(tmp_path / "held.jsonl", [{"text": t} for t in TEXTS])
    one = ppl(path, batch_size=1).evaluate(model, tok)["perplexity/held"]
    many = ppl(path, batch_size=4).evaluate(model, tok)["perplexity/held"]
    assert 1 < one < len(tok) * 2
    assert many == pytest.approx(one, rel=1e-5)


def test_uniform_model_has_vocab_size_perplexity(tmp_path, lm):
    model, tok = lm
    flat = type(model)(model.config).eval()
    with torch.no_grad():
        flat.lm_head.weight.zero_()
    path = write_rows(tmp_path / "u.jsonl", [{"text": t} for t in TEXTS])
    value = ppl(path).evaluate(flat, tok)["perplexity/u"]
    assert value == pytest.approx(model.config.vocab_size, rel=1e-5)


def test_prompt_answer_rows_use_prompt_plus_answer(tmp_path, lm):
    model, tok = lm
    toy = write_rows(tmp_path / "toy.jsonl", [{"prompt": "rev:abc>", "answer": "cba"}])
    text = write_rows(tmp_path / "txt.jsonl", [{"text": "rev:abc>cba"}])
    assert ppl(toy).evaluate(model, tok)["perplexity/toy"] == ppl(text).evaluate(model, tok)[
        "perplexity/txt"
    ]


def test_max_length_and_limit(tmp_path, lm):
    model, tok = lm
    path = write_rows(tmp_path / "m.jsonl", [{"text": t} for t in TEXTS])
    first = write_rows(tmp_path / "f.jsonl", [{"text": TEXTS[0][:4]}])
    got = ppl(path, max_length=5).evaluate(model, tok, limit=1)["perplexity/m"]
    assert got == pytest.approx(ppl(first).evaluate(model, tok)["perplexity/f"], rel=1e-6)


def test_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        ppl(tmp_path / "nope.jsonl")
    rows = write_rows(tmp_path / "p.jsonl", [{"text": "ab"}, {"prompt": "x"}])
    with pytest.raises(ValueError, match=r"p.jsonl: row 2 has no 'text'"):
        ppl(rows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ab"}\n\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: expected a JSON object"):
        ppl(bad)
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        ppl(tmp_path / "e.jsonl")


def test_classifier_is_refused(tmp_path, lm):
    from transformers import LlamaForSequenceClassification

    model, tok = lm
    clf = LlamaForSequenceClassification(model.config).eval()
    path = write_rows(tmp_path / "c.jsonl", [{"text": "abc"}])
    with pytest.raises(TypeError, match="causal LM"):
        ppl(path).evaluate(clf, tok)


def test_cost_counts(lm):
    model, tok = lm
    out = CostEvaluator(CostEvalConfig(name="cost")).evaluate(model, tok)
    assert out == {
        "cost/params": float(sum(p.numel() for p in model.parameters())),
        "cost/layers": float(model.config.num_hidden_layers),
        "scored/examples/cost": 0.0,  # reads no examples
        "scored/tokens/cost": 0.0,
    }


def test_cost_layers_follow_a_path_model(lm):
    model, tok = lm
    model.num_layers_run = 7
    try:
        out = CostEvaluator(CostEvalConfig(name="cost")).evaluate(model, tok)
    finally:
        del model.num_layers_run
    assert out["cost/layers"] == 7.0


def test_cost_latency(lm):
    model, tok = lm
    cfg = CostEvalConfig(name="cost", latency=True, latency_tokens=4)
    out = CostEvaluator(cfg).evaluate(model, tok)
    assert math.isfinite(out["cost/ms_per_token"]) and 0 < out["cost/ms_per_token"] < 1000
    # one warm-up and three timed runs of 4 tokens each
    assert (out["scored/examples/cost"], out["scored/tokens/cost"]) == (0.0, 16.0)


def test_cost_of_an_unknown_module():
    with pytest.raises(TypeError, match="num_layers_run"):
        CostEvaluator(CostEvalConfig(name="cost")).evaluate(torch.nn.Linear(2, 2), None)


def test_cost_of_a_dfs_path(tiny_models):
    """A DFS candidate reports its path length (a layer used twice counts twice), its distinct
    parameters once, and a latency per token of its own (it generates with one cache entry per
    slot)."""
    from evomerge.dfs.engine import DFSEngine
    from evomerge.recipe import DFSRecipe

    sources = {"a": str(tiny_models["a"]), "b": str(tiny_models["b"])}
    engine = DFSEngine(sources)
    recipe = DFSRecipe(sources=sources, layers=[("a", 0), ("b", 1), ("a", 0), ("a", 3)],
                       scales=[1.0, 0.9, 1.1, 1.0], embed_from="a")
    model, tok = engine.apply(recipe)
    cfg = CostEvalConfig(name="cost", latency=True, latency_tokens=4)
    out = CostEvaluator(cfg).evaluate(model, tok)
    assert out["cost/layers"] == 4.0
    src = engine.loaded["a"].model
    layer = sum(p.numel() for p in src.model.layers[0].parameters())
    outside = sum(p.numel() for p in src.parameters()) - 4 * layer  # embeddings, norm, head
    assert out["cost/params"] == float(outside + 3 * layer)  # a0, b1, a3: three distinct layers
    assert math.isfinite(out["cost/ms_per_token"]) and out["cost/ms_per_token"] > 0
