"""The accuracy evaluator: generation and log-likelihood scoring, padding, batching, errors."""

from __future__ import annotations

import json

import pytest
import torch

from evomerge.config import AccuracyEvalConfig
from evomerge.evaluators.accuracy import AccuracyEvaluator, choose, generate
from evomerge.evaluators.base import is_scored
from evomerge.toy.tokenizer import make_tokenizer

PROMPTS = ["rev:abc>", "x>", "cpy:abcdefgh>", "srt:31>", "swp:abcdef>", "a>", "sft:zz>",
           "rev:qwertyui>", "cpy:m>", "add:1+2>"]


def bigram_model(chain: dict[str, str]):
    """A real LlamaForCausalLM whose weights make the next token depend on the current one only.

    Attention and MLP outputs are zero, so the residual stream is the one-hot embedding of the
    current token; ``lm_head`` maps token ``a`` to ``chain[a]`` (any other token to EOS).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    vocab, hidden = len(tok), 64
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=8,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=64, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    head = torch.zeros(vocab, hidden)
    head[tok.eos_token_id, :vocab] = 1.0
    for a, b in chain.items():
        ia, ib = tok.convert_tokens_to_ids([a, b])
        head[:, ia] = 0.0
        head[ib, ia] = 5.0
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
        model.model.embed_tokens.weight.copy_(torch.eye(vocab, hidden))
        model.lm_head.weight.copy_(head)
    return model, tok


CBA = {">": "c", "c": "b", "b": "a", "a": "\n"}  # after any prompt ending in ">": "cba\n"


@pytest.fixture(scope="module")
def forced():
    return bigram_model(CBA)


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def quality(metrics):
    """The metrics without the ``scored/`` cost counts (tests/test_scored_counts.py has those)."""
    return {k: v for k, v in metrics.items() if not is_scored(k)}


def evaluator(tmp_path, rows, **cfg):
    folder = tmp_path / "mytask"
    write(folder / "validation.jsonl", rows)
    return AccuracyEvaluator(AccuracyEvalConfig(name="accuracy", data=str(folder), **cfg))


# -- generation --------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_a_model_that_emits_the_answer_scores_one(forced, tmp_path, batch_size):
    rows = [{"prompt": p, "answer": "cba"} for p in PROMPTS]
    out = evaluator(tmp_path, rows, batch_size=batch_size).evaluate(*forced)
    assert quality(out) == {"accuracy/mytask": 1.0}


def test_exact_match_fraction_limit_and_label(forced, tmp_path):
    rows = [{"prompt": p, "answer": "cba" if i % 4 else "abc"} for i, p in enumerate(PROMPTS)]
    ev = evaluator(tmp_path, rows, label="mine")
    assert quality(ev.evaluate(*forced)) == {"accuracy/mine": 0.7}  # rows 0, 4, 8 are wrong
    assert quality(ev.evaluate(*forced, limit=4)) == {"accuracy/mine": 0.75}
    assert quality(evaluator(tmp_path, rows, limit=2).evaluate(*forced, limit=5)) == {
        "accuracy/mytask": 0.5}
    assert ev.num_examples == len(PROMPTS)
    assert evaluator(tmp_path, rows, limit=2).num_examples == 2  # fidelity fractions of this


@pytest.mark.parametrize(
    "normalize, answer, expected",
    [("strip", " cba ", 1.0), ("none", " cba", 0.0), ("none", "cba", 1.0),
     ("lower_strip", "CBA ", 1.0), ("strip", "CBA", 0.0)],
)
def test_normalize(forced, tmp_path, normalize, answer, expected):
    rows = [{"prompt": "rev:abc>", "answer": answer}]
    assert quality(evaluator(tmp_path, rows, normalize=normalize).evaluate(*forced)) == {
        "accuracy/mytask": expected}


def test_stop_strings_and_eos(forced):
    model, tok = forced
    assert generate(model, tok, ["a>"], max_new_tokens=8, stop=("\n",)) == ["cba"]
    assert generate(model, tok, ["a>"], max_new_tokens=8, stop=("b", "\n")) == ["c"]
    assert generate(model, tok, ["a>"], max_new_tokens=8, stop=("ba",)) == ["c"]
    assert generate(model, tok, ["a>"], max_new_tokens=8, stop=()) == ["cba\n"]  # then EOS
    assert generate(model, tok, ["a>"], max_new_tokens=2, stop=("\n",)) == ["cb"]


def test_left_padded_batches_match_unpadded_hf_generate(tiny_models):
    """Greedy text from padded batches equals ``model.generate`` run on each prompt alone."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import perturbed

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["base"]).eval()
    model = perturbed(model, seed=7, scale=0.5)  # sharper logits: no near-ties to flip
    tok = make_tokenizer()
    expected = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        expected.append(text.split("\n")[0])
    assert len(set(expected)) > 3  # the model's outputs depend on the prompt
    with torch.inference_mode():
        for bs in (1, 4, 16):
            assert generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=bs) == expected


def generate_to_the_end_then_cut(model, tok, prompt, max_new, stop):
    """The reference: ``max_new`` greedy tokens of ``prompt`` alone (no cache, no batch), then
    the text cut at EOS or the first stop string, and how many tokens that end took."""
    ids = tok(prompt)["input_ids"]
    new = []
    for _ in range(max_new):
        new.append(int(model(torch.tensor([ids + new])).logits[0, -1].argmax()))
    end = next((k for k in range(1, max_new + 1) if new[k - 1] == tok.eos_token_id
                or any(s in tok.decode(new[:k], skip_special_tokens=True) for s in stop)),
               max_new)
    text = tok.decode([t for t in new[:end] if t != tok.eos_token_id], skip_special_tokens=True)
    cuts = [text.find(s) for s in stop if s in text]
    return (text[: min(cuts)] if cuts else text), end


@pytest.mark.parametrize("stop", [("\n",), ("y", "zv"), (".>", "?"), ()])
def test_early_stop_equals_generating_to_the_end_then_cutting(tiny_models, stop):
    """Batched generation that drops each finished sequence from the batch gives the texts
    (and token counts) of generating every prompt alone to ``max_new_tokens`` then cutting;
    the batch shrinks as sequences stop."""
    from transformers import AutoModelForCausalLM

    from evomerge.evaluators.generation import generate_ids
    from tests.conftest import perturbed

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["base"]).eval()
    model = perturbed(model, seed=7, scale=0.5)
    tok = make_tokenizer()
    with torch.inference_mode():
        want = [generate_to_the_end_then_cut(model, tok, p, 12, stop) for p in PROMPTS]
        seqs = [tok(p)["input_ids"] for p in PROMPTS]
        sizes = []
        hook = model.register_forward_pre_hook(
            lambda _m, _a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True)
        try:
            got = generate_ids(model, tok, seqs, max_new_tokens=12, stop=stop, batch_size=16)
        finally:
            hook.remove()
        assert got == want
        for bs in (1, 3):
            assert generate_ids(model, tok, seqs, max_new_tokens=12, stop=stop,
                                batch_size=bs) == want
    assert sizes[0] == 1  # the prompts' shared prefix ("<s>" at least), once
    steps = sizes[1:]
    assert steps == sorted(steps, reverse=True) and steps[0] == len(PROMPTS)
    assert len(steps) == max(n for _, n in want)  # no step after the last sequence stopped
    if len({n for _, n in want}) > 1:
        assert steps[-1] < steps[0]  # finished sequences left the batch


# -- log-likelihood --------------------------------------------------------------------------
def test_choices_by_log_likelihood(forced, tmp_path):
    rows = [
        {"prompt": "rev:abc>", "choices": ["cba", "abc", "zz"], "label": 0},
        {"prompt": "x>", "choices": ["abc", "cba"], "label": "cba"},
        {"prompt": "cpy:ab>", "choices": ["ab", "cb"], "label": 0},  # the model says "cb"
        {"prompt": "srt:1>", "choices": ["c", "cb", "cba\n"], "label": 0},  # shortest: least loss
    ]
    for bs in (1, 2, 16):
        assert quality(evaluator(tmp_path, rows, batch_size=bs).evaluate(*forced)) == {
            "accuracy/mytask": 0.75}


def test_choose_matches_unbatched_log_likelihood(tiny_models):
    from transformers import AutoModelForCausalLM

    from tests.conftest import perturbed

    model = AutoModelForCausalLM.from_pretrained(tiny_models["a"]).eval()
    model = perturbed(model, seed=8, scale=0.5)
    tok = make_tokenizer()
    rows = [{"prompt": p, "choices": ["ab", "qz", "zy", p[-3:-1]], "label": 0} for p in PROMPTS]
    expected = []
    with torch.inference_mode():
        for row in rows:
            scores = []
            for choice in row["choices"]:
                prompt = tok(row["prompt"])["input_ids"]
                ids = torch.tensor([prompt + tok(choice, add_special_tokens=False)["input_ids"]])
                logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
                targets = ids[0, 1:]
                scores.append(float(logp[torch.arange(len(targets)), targets][len(prompt) - 1:]
                                    .sum()))
            expected.append(scores.index(max(scores)))
        assert len(set(expected)) > 1
        for bs in (1, 5, 64):
            assert choose(model, tok, rows, batch_size=bs) == expected


# -- data errors -----------------------------------------------------------------------------
def test_missing_file_names_the_path(tmp_path):
    cfg = AccuracyEvalConfig(name="accuracy", data=str(tmp_path / "nothere"))
    with pytest.raises(FileNotFoundError, match="nothere"):
        AccuracyEvaluator(cfg)
    write(tmp_path / "t" / "validation.jsonl", [{"prompt": "a>", "answer": "b"}])
    with pytest.raises(FileNotFoundError, match="heldout.jsonl"):
        AccuracyEvaluator(AccuracyEvalConfig(name="accuracy", data=str(tmp_path / "t")),
                          split="heldout")


def test_a_single_file_and_its_label(forced, tmp_path):
    path = write(tmp_path / "probe.jsonl", [{"prompt": "a>", "answer": "cba"}])
    ev = AccuracyEvaluator(AccuracyEvalConfig(name="accuracy", data=str(path)))
    assert quality(ev.evaluate(*forced)) == {"accuracy/probe": 1.0}


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"prompt": "a>", "answer": "b"}', '{"prompt": "a>", "answer": '], r"bad\.jsonl:2"),
        (['{"prompt": "a>", "answer": "b"}', '["a", "b"]'], r"bad\.jsonl:2: expected"),
        (['{"prompt": "a>", "answer": "b"}', '{"answer": "b"}'], r"bad\.jsonl:2: missing"),
        (['{"prompt": "a>", "answer": "b"}', '{"prompt": "c>"}'], r"row 2 lacks \['answer'\]"),
        (['{"prompt": "a>", "choices": ["x"], "label": 0}', '{"prompt": "a>", "answer": "b"}'],
         r"row 2 lacks"),
        (['{"prompt": "a>", "choices": ["x", "y"], "label": 2}'], r"row 1: label 2"),
        (['{"prompt": "a>", "choices": [], "label": 0}'], r"row 1: 'choices'"),
        (['{"prompt": "a>", "choices": ["x"], "label": true}'], r"row 1: label True"),
        (["", "  "], r"bad\.jsonl: the dataset is empty"),
    ],
)
def test_bad_data_names_file_and_line(tmp_path, lines, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=match):
        AccuracyEvaluator(AccuracyEvalConfig(name="accuracy", data=str(path)))
