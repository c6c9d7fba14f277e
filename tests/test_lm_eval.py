"""The lm_eval evaluator against the stock ``lm_eval`` CLI, on a local task, offline.

The task's answers are the model's own greedy outputs for some rows and wrong for the others, so
the expected exact match is known in advance (validation 1/2, test 1/4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from evomerge.config import LmEvalConfig
from evomerge.evaluators.base import is_scored
from evomerge.evaluators.lm_eval import LmEvalEvaluator, numeric_metrics
from evomerge.evaluators.lm_tasks import write_toy_tasks

WORDS = ["abc", "hello", "xyz", "qwerty", "ab", "mnop", "klm", "zzzz"]
METRIC = "lm_eval/toy_rev/exact_match"
# one thread: on a shared 2-core machine OpenMP spin-waiting makes two threads many times slower
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def greedy(model, tok, prompt):
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=32, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).split("\n")[0]


def rows(model, tok, prefix, right_every):
    out = []
    for i, w in enumerate(WORDS):
        prompt = f"rev:{prefix}{w}>"
        answer = greedy(model, tok, prompt) if i % right_every == 0 else "no"
        out.append({"prompt": prompt, "answer": answer})
    return out


@pytest.fixture(scope="module")
def suite(tiny_models, tmp_path_factory, request):
    """A toy suite with one task ``toy_rev``; starts the ``lm_eval`` CLI on it at once."""
    torch.set_num_threads(1)
    model, tok = load(tiny_models["a"])
    root = tmp_path_factory.mktemp("lm_suite")
    data = root / "data" / "rev"
    data.mkdir(parents=True)
    for split, prefix, every in (("train", "t", 1), ("validation", "", 2), ("test", "q", 4)):
        lines = [json.dumps(r) for r in rows(model, tok, prefix, every)]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    tasks = write_toy_tasks(root, ["rev"])
    cli = subprocess.Popen(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
         "--model_args", f"pretrained={tiny_models['a']},dtype=float32",
         "--tasks", "toy_rev", "--include_path", str(tasks), "--device", "cpu",
         "--batch_size", "4", "--output_path", str(root / "cli")],
        env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    request.addfinalizer(cli.kill)
    return {"root": root, "tasks": tasks, "cli": cli, "model": model, "tok": tok}


def quality(metrics):
    return {k: v for k, v in metrics.items() if not is_scored(k)}


def config(suite, **kw):
    return LmEvalConfig(name="lm_eval", tasks=("toy_rev",), include_path=str(suite["tasks"]),
                        batch_size=4, **kw)


@pytest.fixture(scope="module")
def ev(suite):
    return LmEvalEvaluator(config(suite))


def test_written_task_yaml(suite):
    text = (suite["tasks"] / "toy_rev.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert cfg["task"] == "toy_rev" and cfg["target_delimiter"] == ""
    assert cfg["validation_split"] == "validation" and cfg["test_split"] == "test"
    files = cfg["dataset_kwargs"]["data_files"]
    assert set(files) == {"train", "validation", "test"}
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in files.values())


def test_write_toy_tasks_needs_the_data(tmp_path):
    (tmp_path / "data" / "x").mkdir(parents=True)
    (tmp_path / "data" / "x" / "validation.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(FileNotFoundError, match=r"x/test.jsonl"):
        write_toy_tasks(tmp_path, ["x"])
    with pytest.raises(ValueError, match="empty"):
        write_toy_tasks(tmp_path, [])


def test_scores_the_configured_split(suite, ev):
    assert quality(ev.evaluate(suite["model"], suite["tok"])) == {METRIC: 0.5}
    held_out = LmEvalEvaluator(config(suite), split="test")
    assert quality(held_out.evaluate(suite["model"], suite["tok"])) == {METRIC: 0.25}
    assert ev.num_examples == len(WORDS)


def test_held_out_tasks_run_on_their_own_split(suite):
    ev = LmEvalEvaluator(config(suite, held_out_tasks=("toy_rev",)), split="test")
    assert ev.split is None  # the YAML's test_split
    assert quality(ev.evaluate(suite["model"], suite["tok"])) == {METRIC: 0.25}


def test_limit(suite, ev):
    assert quality(ev.evaluate(suite["model"], suite["tok"], limit=1)) == {METRIC: 1.0}
    assert quality(ev.evaluate(suite["model"], suite["tok"], limit=3)) == {
        METRIC: pytest.approx(2 / 3)}
    assert LmEvalEvaluator(config(suite, limit=5)).num_examples == 5  # fidelity fractions of it


def test_scored_counts_are_the_docs_and_the_generated_tokens(suite, ev):
    """``scored/examples`` is the documents scored (the limit), ``scored/tokens`` the tokens of
    the answers generated (the model's greedy text up to the newline stop)."""
    model, tok = suite["model"], suite["tok"]
    for limit in (3, None):
        out = ev.evaluate(model, tok, limit=limit)
        words = WORDS[:limit]
        answers = [greedy(model, tok, f"rev:{w}>") for w in words]
        tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)
        assert out["scored/examples/lm_eval/toy_rev"] == len(words)
        assert out["scored/tokens/lm_eval/toy_rev"] == tokens > 0
        assert sorted(out) == [METRIC, "scored/examples/lm_eval/toy_rev",
                               "scored/tokens/lm_eval/toy_rev"]


def test_new_weights_in_the_same_model_are_scored(suite, ev, tiny_models):
    model, tok = suite["model"], suite["tok"]
    original = {k: v.clone() for k, v in model.state_dict().items()}
    other, _ = load(tiny_models["b"])
    fresh = LmEvalEvaluator(config(suite)).evaluate(other, tok)[METRIC]
    try:
        model.load_state_dict(other.state_dict())
        assert ev.evaluate(model, tok)[METRIC] == fresh != 0.5
    finally:
        model.load_state_dict(original)
    assert ev.evaluate(model, tok)[METRIC] == 0.5


def test_unknown_split_and_path(suite, tmp_path):
    with pytest.raises(ValueError, match="no split 'dev'.*validation"):
        LmEvalEvaluator(config(suite, split="dev"))
    cfg = LmEvalConfig(name="lm_eval", tasks=("toy_rev",), include_path=str(tmp_path / "no"))
    with pytest.raises(FileNotFoundError, match="include_path"):
        LmEvalEvaluator(cfg)


def test_unknown_task_lists_close_matches(suite):
    cfg = LmEvalConfig(name="lm_eval", tasks=("toy_rve",), include_path=str(suite["tasks"]))
    hint = r"unknown lm_eval task 'toy_rve'.*Did you mean:.*toy_rev"
    with pytest.raises(ValueError, match=hint):
        LmEvalEvaluator(cfg)


def test_numeric_metrics_naming():
    results = {"results": {"t": {
        "alias": "t", "sample_len": 4, "exact_match,none": 0.5, "exact_match_stderr,none": "N/A",
        "acc,strict": 1, "bleu,none": float("nan"), "flag,none": True,
    }}}
    assert numeric_metrics(results) == {
        "lm_eval/t/exact_match": 0.5, "lm_eval/t/acc/strict": 1.0,
    }


def test_equals_the_lm_eval_cli(suite):
    """Our evaluator on the in-memory model == the CLI on the same model saved to disk."""
    cli = suite["cli"]
    output, _ = cli.communicate(timeout=600)
    assert cli.returncode == 0, output.decode()[-3000:]
    (result,) = (suite["root"] / "cli").rglob("results_*.json")
    cli_score = json.loads(result.read_text())["results"]["toy_rev"]["exact_match,none"]
    ours = LmEvalEvaluator(config(suite), split="test").evaluate(suite["model"], suite["tok"])
    assert quality(ours) == {METRIC: cli_score} and cli_score == 0.25


def test_template_cache_renders_like_lm_eval_and_is_installed(suite, ev):
    import lm_eval.utils

    from evomerge.evaluators.lm_eval import _compiled, cached_apply_template

    original = lm_eval.utils.env.from_string
    doc = {"prompt": "rev:ab>", "answer": "ba", "n": 3}
    for template in ("{{prompt}}", "{{answer}}\n", "{{ n * 2 }} {{prompt|upper}}"):
        assert cached_apply_template(template, doc) == original(template).render(**doc)
    assert lm_eval.utils.apply_template is cached_apply_template  # the evaluator installed it
    _compiled.cache_clear()
    ev.evaluate(suite["model"], suite["tok"], limit=4)
    assert _compiled.cache_info().currsize >= 1 and _compiled.cache_info().hits > 0
