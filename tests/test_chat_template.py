"""The accuracy evaluator's ``chat_template``, ``system`` and ``field`` options and its stop
strings per task: prompts rendered with the tokenizer's own template, a clear error without one,
and a default stop that does not cut a multi-line answer in a chat."""

from __future__ import annotations

import json

import pytest

from evomerge.config import AccuracyEvalConfig, load_job
from evomerge.evaluators.accuracy import AccuracyEvaluator, chat_text
from evomerge.strict import ConfigError
from tests.test_accuracy import bigram_model

# a small chat template in the toy tokenizer's characters (as a real one, it writes the BOS)
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
ROWS = [{"question": q, "prompt": q, "answer": "ok"} for q in ("rev:abc>", "srt:31>", "a>")]


def chat_model(chain):
    model, tok = bigram_model(chain)
    tok.chat_template = TEMPLATE
    return model, tok


def write(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def score(data, model, tok, **cfg):
    ev = AccuracyEvaluator(AccuracyEvalConfig(name="accuracy", data=data, **cfg))
    return ev.evaluate(model, tok)[ev.metric]


def test_prompts_are_rendered_with_the_chat_template(tmp_path):
    """After ``assistant:`` the model says ``ok``; after a bare prompt (ending in ``>``) it says
    nothing: only prompts rendered with the template score."""
    model, tok = chat_model({":": "o", "o": "k"})
    data = write(tmp_path / "t", ROWS)
    assert score(data, model, tok, chat_template=True) == 1.0
    assert score(data, model, tok) == 0.0
    ev = AccuracyEvaluator(AccuracyEvalConfig(name="accuracy", data=data, chat_template=True,
                                              system="be brief", field="question"))
    (ids,) = ev.prompt_ids(tok, ROWS[:1])
    assert tok.decode(ids) == "<s>system:be brief\nuser:rev:abc>\nassistant:"
    assert ids.count(tok.bos_token_id) == 1  # the template's BOS, none added by the tokenizer
    assert chat_text(tok, "x") == "<s>user:x\nassistant:"


def test_a_tokenizer_without_a_chat_template_is_one_clear_error(tmp_path):
    model, tok = bigram_model({":": "o"})
    assert not tok.chat_template
    cfg = AccuracyEvalConfig(name="accuracy", data=write(tmp_path / "t", ROWS), chat_template=True)
    with pytest.raises(ValueError) as err:
        AccuracyEvaluator(cfg).evaluate(None, tok)  # refused before the model is touched
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("accuracy/t: chat_template is true but")
    assert "set chat_template: false" in msg


def test_preflight_can_tell_a_saved_tokenizer_has_a_template(tmp_path):
    """``has_chat_template`` reads the saved files (no transformers): a preflight check."""
    from evomerge.evaluators.rows import has_chat_template
    from evomerge.toy.tokenizer import make_tokenizer

    tok = make_tokenizer()
    tok.save_pretrained(tmp_path / "plain")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(tmp_path / "chat")
    assert not has_chat_template(tmp_path / "plain") and has_chat_template(tmp_path / "chat")
    assert not has_chat_template(tmp_path / "nothere")


def test_system_needs_chat_template_in_the_config(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: j\nmodels: {base: {path: b}, experts: {x: {path: x}}}\n"
        "evaluators: [{name: accuracy, data: d.jsonl, system: be brief}]\n"
        "objectives: [{metric: accuracy/d}]\n"
    )
    with pytest.raises(ConfigError, match=r"evaluators\.0\.system: .*chat_template: true"):
        load_job(job)


def test_field_names_the_prompt_key(tmp_path):
    model, tok = chat_model({":": "o", "o": "k"})
    rows = [{"question": "rev:abc>", "answer": "ok"}]
    assert score(write(tmp_path / "q", rows), model, tok, field="question",
                 chat_template=True) == 1.0
    with pytest.raises(ValueError, match="missing key"):
        AccuracyEvaluator(AccuracyEvalConfig(name="accuracy", data=write(tmp_path / "p", rows)))


def test_choice_rows_are_scored_after_the_chat_prompt(tmp_path):
    model, tok = chat_model({":": "o", "o": "k"})
    rows = [{"question": "x", "choices": ["no", "ok"], "label": "ok"}]
    ev = AccuracyEvaluator(AccuracyEvalConfig(name="accuracy", data=write(tmp_path / "c", rows),
                                              field="question", chat_template=True))
    out = ev.evaluate(model, tok)
    assert out["accuracy/c"] == 1.0 and out["scored/tokens/accuracy/c"] == 4.0  # 2 choices x 2


def test_stop_strings_per_task(tmp_path):
    """The model answers ``a\\nb`` (a multi-line answer). The default stop of a chat is the end
    of the turn only, so it is kept; without a chat template the default stays a newline (old
    configs); each task (evaluator) can set its own stop list."""
    model, tok = chat_model({":": "a", "a": "\n", "\n": "b"})
    whole = write(tmp_path / "whole", [{"prompt": "x", "answer": "a\nb"}])
    first = write(tmp_path / "first", [{"prompt": "x", "answer": "a"}])
    assert score(whole, model, tok, chat_template=True) == 1.0
    assert score(first, model, tok, chat_template=True) == 0.0
    assert score(first, model, tok, chat_template=True, stop=["\n"]) == 1.0
    assert score(first, model, tok, chat_template=True, stop=["b"]) == 1.0  # "a\n", stripped
    assert score(whole, model, tok, chat_template=True, stop=["zz"]) == 1.0
    plain = AccuracyEvaluator(AccuracyEvalConfig(name="accuracy", data=first))
    assert plain.cfg.stop is None and plain.stop == ("\n",)
    chat = AccuracyEvaluator(AccuracyEvalConfig(name="accuracy", data=first, chat_template=True))
    assert chat.stop == ()


# -- the SmolLM2 suite uses these options --------------------------------------------------------
def test_smollm2_configs_render_the_question_in_the_chat_template():
    from pathlib import Path

    from evomerge.toy import smollm2

    configs = sorted(Path(__file__).parents[1].glob("configs/smollm2*.yaml"))
    assert len(configs) == 3
    for path in configs:
        accuracy = [e for e in load_job(path).evaluators if e.name == "accuracy"]
        assert accuracy, path
        for ev in accuracy:
            assert (ev.field, ev.chat_template, ev.system, ev.stop) == (
                "question", True, smollm2.SYSTEM, None), path
            assert ev == smollm2.accuracy_config(ev.data, **ev.model_dump(
                exclude={"name", "data", "field", "chat_template", "system"}))


def test_smollm2_task_yamls_stop_at_the_end_of_the_turn_only(tmp_path):
    import yaml

    from evomerge.toy import smollm2

    smollm2._write_task_yamls(tmp_path, list(smollm2.EXPERT_TASKS))
    for task in smollm2.EXPERT_TASKS:
        cfg = yaml.safe_load((tmp_path / "tasks" / f"smollm2_{task}.yaml").read_text())
        assert cfg["task"] == f"smollm2_{task}" and cfg["doc_to_text"] == "{{prompt}}"
        assert cfg["generation_kwargs"]["until"] == ["<|im_end|>"]  # no newline: JSON whole


@pytest.mark.slow
def test_smollm2_chat_rendering_equals_the_suites_prompts(tmp_path):
    """With the real SmolLM2 tokenizer (from the GGUF, ~1 min to load), the evaluator's chat
    rendering of ``question`` gives the tokens of the rows' pre-rendered ``prompt``."""
    from transformers import AutoTokenizer

    from evomerge.toy import smollm2
    from evomerge.toy.gguf_convert import GGUF_FILE, smollm2_package_dir

    tok = AutoTokenizer.from_pretrained(smollm2_package_dir(), gguf_file=GGUF_FILE)
    for task in smollm2.EXPERT_TASKS:
        rows = smollm2.make_rows(task, {"validation": 8}, tok, seed=0)["validation"]
        data = write(tmp_path / task, rows)
        ev = AccuracyEvaluator(smollm2.accuracy_config(data))
        assert ev.prompt_ids(tok, rows) == tok([r["prompt"] for r in rows])["input_ids"]
        assert ev.stop == () and tok.eos_token == "<|im_end|>"
