"""The entropy evaluator: known values, padding invariance, classifiers, bad input."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from evomerge.config import EntropyEvalConfig
from evomerge.evaluators.entropy import EntropyEvaluator, entropy

PROMPTS = ["rev:abc>", "srt:3120>", "cpy:hello world>", "a", "swp:abcdefgh>"]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("entropy_data") / "mix"
    folder.mkdir()
    write_rows(folder / "validation.jsonl", [{"prompt": p} for p in PROMPTS])
    return folder


@pytest.fixture(scope="module")
def lm(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_models["a"], dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_models["a"])


def cfg(data, **kw):
    return EntropyEvalConfig(name="entropy", data=str(data), **kw)


class FixedLogits(torch.nn.Module):
    """A causal 'LM' whose every next-token distribution has the given logits."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("row", torch.as_tensor(logits, dtype=torch.float32))

    @property
    def device(self):
        return self.row.device

    def forward(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        return SimpleNamespace(logits=self.row.expand(b, t, -1))


def test_entropy_function_known_values():
    assert entropy(torch.zeros(7)).item() == pytest.approx(math.log(7), abs=1e-6)
    assert entropy(torch.tensor([0.0, float("-inf"), float("-inf")])).item() == 0.0
    two = entropy(torch.tensor([0.0, 0.0, float("-inf")])).item()
    assert two == pytest.approx(math.log(2), abs=1e-6)


def test_uniform_logits_give_log_vocab(data, lm):
    _, tok = lm
    out = EntropyEvaluator(cfg(data)).evaluate(FixedLogits(torch.zeros(len(tok))), tok)
    assert out["entropy/mix"] == pytest.approx(math.log(len(tok)), abs=1e-6)


def test_one_hot_logits_give_zero(data, lm):
    _, tok = lm
    logits = torch.full((len(tok),), -1e4)
    logits[5] = 1e4
    assert EntropyEvaluator(cfg(data)).evaluate(FixedLogits(logits), tok)["entropy/mix"] == 0.0


def test_uniform_head_on_a_real_model(data, lm):
    model, tok = lm
    zeroed = type(model)(model.config).eval()
    zeroed.load_state_dict(model.state_dict())
    with torch.no_grad():
        zeroed.lm_head.weight.zero_()
    value = EntropyEvaluator(cfg(data)).evaluate(zeroed, tok)["entropy/mix"]
    assert value == pytest.approx(math.log(model.config.vocab_size), abs=1e-5)


def test_padding_does_not_change_the_value(data, lm):
    model, tok = lm
    alone = EntropyEvaluator(cfg(data, batch_size=1)).evaluate(model, tok)["entropy/mix"]
    padded = EntropyEvaluator(cfg(data, batch_size=5)).evaluate(model, tok)["entropy/mix"]
    assert 0 < alone < math.log(len(tok))
    assert padded == pytest.approx(alone, rel=1e-5)


def test_mean_is_over_tokens_and_limit_caps_rows(data, lm, tmp_path):
    model, tok = lm
    per_row = []
    for i, p in enumerate(PROMPTS[:2]):
        one = write_rows(tmp_path / f"r{i}.jsonl", [{"prompt": p}])
        per_row.append(EntropyEvaluator(cfg(one)).evaluate(model, tok)[f"entropy/r{i}"])
    n = [len(tok(p)["input_ids"]) for p in PROMPTS[:2]]
    expected = (per_row[0] * n[0] + per_row[1] * n[1]) / sum(n)
    got = EntropyEvaluator(cfg(data)).evaluate(model, tok, limit=2)["entropy/mix"]
    assert got == pytest.approx(expected, rel=1e-5)


def test_sequence_classifier_uses_class_distributions(data, lm):
    from transformers import LlamaForSequenceClassification

    model, tok = lm
    clf = LlamaForSequenceClassification(model.config.__class__(
        **{**model.config.to_dict(), "num_labels": 3})).eval()
    with torch.no_grad():
        clf.score.weight.zero_()
    value = EntropyEvaluator(cfg(data, batch_size=2)).evaluate(clf, tok)["entropy/mix"]
    assert value == pytest.approx(math.log(3), abs=1e-6)
    with torch.no_grad():
        clf.score.weight.normal_()
    one = EntropyEvaluator(cfg(data, batch_size=1)).evaluate(clf, tok)["entropy/mix"]
    many = EntropyEvaluator(cfg(data, batch_size=5)).evaluate(clf, tok)["entropy/mix"]
    assert 0 < one < math.log(3) and many == pytest.approx(one, rel=1e-5)


def test_label_and_field(tmp_path, lm):
    model, tok = lm
    path = write_rows(tmp_path / "q.jsonl", [{"question": "rev:abc>"}])
    out = EntropyEvaluator(cfg(path, field="question", label="qa")).evaluate(model, tok)
    assert list(out) == ["entropy/qa", "scored/examples/entropy/qa", "scored/tokens/entropy/qa"]
    assert out["scored/examples/entropy/qa"] == 1.0
    assert out["scored/tokens/entropy/qa"] == len(tok("rev:abc>")["input_ids"])


def test_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="validation.jsonl"):
        EntropyEvaluator(cfg(tmp_path))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        EntropyEvaluator(cfg(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        EntropyEvaluator(cfg(empty))
    other = write_rows(tmp_path / "other.jsonl", [{"prompt": "a"}, {"text": "b"}])
    with pytest.raises(ValueError, match=r"other.jsonl: row 2 has no 'prompt'"):
        EntropyEvaluator(cfg(other))


def test_limit_below_one_is_refused(data, lm):
    model, tok = lm
    with pytest.raises(ValueError, match="limit must be >= 1"):
        EntropyEvaluator(cfg(data)).evaluate(model, tok, limit=0)
