"""The toy suite: tasks, training loop, a tiny build (layout, loading, cache, determinism)."""

from __future__ import annotations

import json
import random
import shutil
import time

import pytest
import torch

from evomerge.toy.build import EXPERT_TASKS, TASKS, build_suite, suite_is_valid
from evomerge.toy.tasks import TASKS as ALL_TASKS
from evomerge.toy.tasks import make_example, make_splits
from evomerge.toy.tokenizer import CHARS, make_tokenizer
from evomerge.toy.train import encode_rows, make_model, train
from tests.toy_fixtures import toy_suite_tiny  # noqa: F401  (until conftest imports it)

SPLITS = ("train", "validation", "test")


# -- tasks -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "task, text, answer",
    [("copy", "abc", "abc"), ("reverse", "abc", "cba"), ("sort", "3141", "1134"),
     ("swap", "abcde", "badce"), ("shift", "azy", "baz"), ("rot13", "anz", "nam"),
     ("mirror", "abz", "zya"), ("add", "12+990", "1002")],
)
def test_task_answers(task, text, answer):
    assert _answer_of(task, text) == answer


def _answer_of(task, text):
    """``make_example`` fed a random source that draws exactly ``text``."""
    class Fixed(random.Random):
        def randint(self, a, b):  # the length draw, then (for add) the two numbers
            return self.values.pop(0)

        def choice(self, seq):
            return self.chars.pop(0)

    rng = Fixed()
    if task == "add":
        a, b = text.split("+")
        rng.values, rng.chars = [int(a), int(b)], []
    else:
        rng.values, rng.chars = [len(text)], list(text)
    example = make_example(task, rng)
    assert example["prompt"] == f"{ALL_TASKS[task][0]}:{text}>"
    return example["answer"]


@pytest.mark.parametrize("task", list(ALL_TASKS))
def test_splits_disjoint_deterministic_and_in_vocabulary(task):
    sizes = {"test": 30, "validation": 30, "train": 200}
    splits = make_splits(task, sizes, seed=3)
    assert splits == make_splits(task, sizes, seed=3)
    assert splits != make_splits(task, sizes, seed=4)
    prompts = [r["prompt"] for rows in splits.values() for r in rows]
    assert len(prompts) == len(set(prompts)) == 260
    for rows in splits.values():
        for row in rows:
            assert set(row["prompt"] + row["answer"] + "\n") <= set(CHARS), row


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match="reverse"):
        make_example("revers", random.Random(0))


# -- training ----------------------------------------------------------------------------------
TINY_ARCH = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1)


def test_loss_covers_only_the_answer_and_newline():
    tok = make_tokenizer()
    ids, labels = encode_rows([{"prompt": "rev:ab>", "answer": "ba"},
                               {"prompt": "rev:abcd>", "answer": "dcba"}], tok)
    for i, (prompt, answer) in enumerate([("rev:ab>", "ba"), ("rev:abcd>", "dcba")]):
        kept = labels[i][labels[i] != -100].tolist()
        assert tok.decode(kept) == answer + "\n"
        start = 1 + len(prompt)  # <s> then one token per character
        assert (labels[i, :start] == -100).all()
        assert tok.decode(ids[i, :start].tolist(), skip_special_tokens=True) == prompt


def test_training_is_seeded_and_freezes_what_it_is_told():
    torch.set_num_threads(1)
    tok = make_tokenizer()
    data = {"copy": encode_rows(make_splits("copy", {"train": 64})["train"], tok)}

    def run(seed):
        model = make_model(tok, seed=0, **TINY_ARCH)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        losses = train(model, data, {"copy": 1.0}, steps=4, batch_size=8, lr=1e-3, seed=seed,
                       warmup=1, trainable=lambda name: ".layers.1." in name)
        return before, model.state_dict(), losses

    before, a, losses_a = run(seed=0)
    _, b, losses_b = run(seed=0)
    _, c, _ = run(seed=1)
    assert losses_a == losses_b and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    for name in a:
        assert torch.equal(a[name], before[name]) != (".layers.1." in name), name


def test_training_rejects_an_empty_parameter_set_and_unknown_tasks():
    tok = make_tokenizer()
    model = make_model(tok, **TINY_ARCH)
    data = {"copy": encode_rows([{"prompt": "cpy:ab>", "answer": "ab"}], tok)}
    with pytest.raises(ValueError, match="froze every parameter"):
        train(model, data, {"copy": 1.0}, steps=1, batch_size=1, lr=1e-3,
              trainable=lambda name: False)
    with pytest.raises(ValueError, match="without data"):
        train(model, data, {"sort": 1.0}, steps=1, batch_size=1, lr=1e-3)


# -- the built suite -------------------------------------------------------------------------
def test_layout(toy_suite_tiny):  # noqa: F811
    root = toy_suite_tiny
    folders = [root / "base"] + [root / "experts" / t for t in EXPERT_TASKS]
    for folder in folders:
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (folder / name).is_file(), folder / name
    for task in TASKS:
        for split in SPLITS:
            rows = [json.loads(x) for x in (root / "data" / task / f"{split}.jsonl").open()]
            assert rows and all(set(r) == {"prompt", "answer"} for r in rows)
        assert (root / "tasks" / f"toy_{task}.yaml").is_file()
    targets = json.loads((root / "targets.json").read_text())
    names = {"base", "task_arithmetic_uniform", *(f"expert/{t}" for t in EXPERT_TASKS)}
    assert set(targets["accuracy"]) == names
    for row in targets["accuracy"].values():
        assert set(row) == {*TASKS, "expert_avg"} and all(0 <= v <= 1 for v in row.values())
    assert targets["build_seconds"] > 0 and targets["settings"]["size"] == "tiny"
    assert suite_is_valid(root, "tiny")


def test_models_load_and_experts_change_only_decoder_layers(toy_suite_tiny):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(toy_suite_tiny / "base").state_dict()
    tok = AutoTokenizer.from_pretrained(toy_suite_tiny / "base")
    assert tok.padding_side == "left" and tok.decode(tok("rev:ab>")["input_ids"][1:]) == "rev:ab>"
    for task in EXPERT_TASKS:
        expert = AutoModelForCausalLM.from_pretrained(toy_suite_tiny / "experts" / task)
        sd = expert.state_dict()
        assert sd.keys() == base.keys()
        for name, tensor in sd.items():
            assert torch.equal(tensor, base[name]) == (".layers." not in name), (task, name)


def test_rebuild_is_a_cache_hit(toy_suite_tiny):  # noqa: F811
    stamp = (toy_suite_tiny / "base" / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert build_suite(toy_suite_tiny, size="tiny") == toy_suite_tiny
    assert time.perf_counter() - start < 2.0
    assert (toy_suite_tiny / "base" / "model.safetensors").stat().st_mtime_ns == stamp


def test_other_settings_or_foreign_folders_are_refused(toy_suite_tiny, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="other settings.*force=True"):
        build_suite(toy_suite_tiny, size="small")
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="no toy-suite manifest"):
        build_suite(tmp_path, size="tiny")
    with pytest.raises(ValueError, match="unknown"):
        build_suite(tmp_path / "new", size="huge")  # type: ignore[arg-type]


def test_a_changed_file_invalidates_the_suite(toy_suite_tiny, tmp_path):  # noqa: F811
    copy = tmp_path / "copy"
    shutil.copytree(toy_suite_tiny, copy)
    assert suite_is_valid(copy, "tiny") and not suite_is_valid(copy, "small")
    with (copy / "data" / "copy" / "test.jsonl").open("a") as f:
        f.write('{"prompt": "cpy:a>", "answer": "a"}\n')
    assert not suite_is_valid(copy, "tiny")


def test_data_files_are_reproducible(toy_suite_tiny):  # noqa: F811
    """The same seed gives the same data; with seeded training (above) the same weights."""
    settings = json.loads((toy_suite_tiny / "manifest.json").read_text())["settings"]
    for task in TASKS:
        splits = make_splits(task, settings["splits"], seed=settings["seed"])
        for split, rows in splits.items():
            text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
            assert (toy_suite_tiny / "data" / task / f"{split}.jsonl").read_text() == text


def test_a_second_build_gives_the_same_weights(toy_suite_tiny, tmp_path):  # noqa: F811
    again = build_suite(tmp_path / "again", size="tiny")
    first = json.loads((toy_suite_tiny / "manifest.json").read_text())["files"]
    second = json.loads((again / "manifest.json").read_text())["files"]
    weights = [name for name in first if name.endswith(".safetensors")]
    assert len(weights) == 1 + len(EXPERT_TASKS)
    assert {k: first[k] for k in weights} == {k: second[k] for k in weights}
    assert {k: v for k, v in first.items() if k != "targets.json" and "tasks/" not in k} == {
        k: v for k, v in second.items() if k != "targets.json" and "tasks/" not in k}
