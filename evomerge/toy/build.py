"""Build the toy suite: a tiny Llama base, one expert per task, data splits and a target table.

Layout of ``DIR`` (other parts of evomerge rely on it)::

    base/                     HF folder (safetensors + tokenizer)
    experts/<task>/           the same, fine-tuned from base on one task
    data/<task>/{train,validation,test}.jsonl   {"prompt", "answer"} rows, every task
    tasks/toy_<task>.yaml     lm-eval task configs (evomerge.evaluators.lm_tasks)
    targets.json              test accuracy of base, experts and the uniform task-arithmetic merge
    manifest.json             settings, their hash and a sha256 per file (written last)

The expert tasks map each letter of the input (``shift``: to the next letter, ``rot13``: 13 on,
``mirror``: ``a`` <-> ``z``). The base is pretrained on ``copy`` plus a little of each expert
task, but only on inputs made of the first ``pretrain_letters`` letters: it knows every task and
most of each mapping, and fails on strings holding the letters it never saw mapped (a base that
lacks a skill entirely makes every merge collapse; one that knows too much leaves nothing to
merge). Each expert then fine-tunes the decoder layers (embeddings, final norm and head stay the
base's) on its own task over the whole alphabet: it masters its task and forgets much of the
others, so the uniform task-arithmetic merge beats every expert on the average of the expert
tasks. Everything is seeded and runs on one CPU thread.

>>> build_suite("toy_suite", size="tiny")  # doctest: +SKIP
PosixPath('toy_suite')
"""

from __future__ import annotations

import copy
import hashlib
import json
import string
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from evomerge.toy.tasks import make_splits, task_input
from evomerge.toy.tokenizer import make_tokenizer
from evomerge.toy.train import encode_rows, make_model, train

SUITE_VERSION = 2
EXPERT_TASKS = ("shift", "rot13", "mirror")
PRETRAIN_MIX = {"copy": 1.0, "shift": 0.05, "rot13": 0.05, "mirror": 0.05}
PRETRAIN_LETTERS = 22  # the base sees expert-task inputs made of a..v only
TASKS = ("copy", *EXPERT_TASKS)
MERGE_NAME = "task_arithmetic_uniform"

SIZES: dict[str, dict[str, Any]] = {
    "small": {
        "arch": {"hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 4,
                 "num_attention_heads": 4, "num_key_value_heads": 2},
        "splits": {"test": 200, "validation": 200, "train": 3000},
        "pretrain": {"steps": 500, "batch_size": 64, "lr": 3e-3, "warmup": 20},
        "expert": {"steps": 100, "batch_size": 64, "lr": 1e-3, "warmup": 10},
    },
    "tiny": {
        "arch": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 2, "num_key_value_heads": 1},
        "splits": {"test": 20, "validation": 20, "train": 200},
        "pretrain": {"steps": 30, "batch_size": 16, "lr": 3e-3, "warmup": 5},
        "expert": {"steps": 10, "batch_size": 16, "lr": 1e-3, "warmup": 2},
    },
}
_OWNED = ("base", "experts", "data", "tasks", "targets.json", "manifest.json")


def suite_settings(size: str) -> dict[str, Any]:
    """Everything that determines the suite's content (hashed into the manifest)."""
    if size.startswith("smollm2"):  # the real-model suite (evomerge.toy.smollm2)
        from evomerge.toy.smollm2 import suite_settings as smollm2_settings

        return smollm2_settings(size)
    if size not in SIZES:
        raise ValueError(f"toy suite size {size!r} is unknown; use one of {sorted(SIZES)}")
    return {
        "version": SUITE_VERSION, "size": size, "seed": 0, "tasks": list(TASKS),
        "expert_tasks": list(EXPERT_TASKS), "pretrain_mix": PRETRAIN_MIX,
        "pretrain_letters": PRETRAIN_LETTERS,
        "merge": {"method": "task_arithmetic", "weight": round(1 / len(EXPERT_TASKS), 6)},
        **SIZES[size],
    }


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _file_hashes(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json")
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest's content; ``{}`` if it is unreadable; None if there is none."""
    path = root / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def suite_is_valid(root: str | Path, size: str) -> bool:
    """True if ``root`` holds a complete suite built with ``size``'s current settings."""
    manifest = _read_manifest(Path(root))
    return bool(
        manifest
        and manifest.get("hash") == _hash(suite_settings(size))
        and manifest.get("files") == _file_hashes(Path(root))
    )


def build_suite(
    dir: str | Path, *, size: Literal["tiny", "small", "smollm2", "smollm2-quick"] = "small",
    force: bool = False,
) -> Path:
    """Build the toy suite into ``dir`` (cached: a valid suite there is returned at once).

    ``force=True`` rebuilds. A non-empty ``dir`` without a manifest, or one built with other
    settings, is refused unless ``force`` is set (nothing is overwritten by surprise).
    """
    if size.startswith("smollm2"):
        from evomerge.toy.smollm2 import build_smollm2

        return build_smollm2(dir, profile=size, force=force)
    root = Path(dir)
    settings = suite_settings(size)
    if not force and suite_is_valid(root, size):
        return root
    _make_room(root, settings, force)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and kind to a shared machine
    try:
        _build(root, settings)
    finally:
        torch.set_num_threads(threads)
    return root


def _make_room(root: Path, settings: dict[str, Any], force: bool) -> None:
    import shutil

    manifest = _read_manifest(root)
    if root.is_dir() and any(root.iterdir()) and not force:
        if manifest is None:
            raise ValueError(
                f"{root} is not empty and holds no toy-suite manifest; choose an empty or new "
                "folder, or pass force=True (toy build --force) to build there"
            )
        old = manifest.get("settings")
        if isinstance(old, dict) and _hash(old) != _hash(settings):
            raise ValueError(
                f"{root} holds a toy suite built with other settings (size {old.get('size')!r}, "
                f"version {old.get('version')!r}); use another folder or force=True to rebuild"
            )
    for name in _OWNED:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    root.mkdir(parents=True, exist_ok=True)


def _write_data(root: Path, settings: dict[str, Any]) -> dict[str, dict[str, list[dict]]]:
    data = {}
    for task in settings["tasks"]:
        data[task] = make_splits(task, settings["splits"], seed=settings["seed"])
        folder = root / "data" / task
        folder.mkdir(parents=True, exist_ok=True)
        for split, rows in data[task].items():
            text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
            (folder / f"{split}.jsonl").write_text(text, encoding="utf-8")
    return data


def _pretrain_data(data: dict[str, Any], tok: Any, s: dict[str, Any]) -> dict[str, Any]:
    """Train rows of the mix; for expert tasks only inputs made of the first letters."""
    seen = set(string.ascii_lowercase[: s["pretrain_letters"]])
    out = {}
    for task in s["pretrain_mix"]:
        rows = data[task]["train"]
        if task in s["expert_tasks"]:
            rows = [r for r in rows if set(task_input(r["prompt"])) <= seen]
        out[task] = encode_rows(rows, tok)
    return out


def _save(model: Any, tok: Any, path: Path) -> None:
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()  # its "Writing model shards" bar would draw
    hf_logging.disable_progress_bar()  # over the toy-suite bar (and \r redraws in a log)
    try:
        model.save_pretrained(path)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    tok.save_pretrained(path)


class _Steps:
    """The build's progress: a tqdm bar on a terminal, else one stderr line per step (a log
    file or CI gets no bar redraws). stdout keeps only the target table."""

    def __init__(self, names: list[str]) -> None:
        from tqdm.auto import tqdm

        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=len(names), desc="toy suite", unit="step", file=sys.stderr,
                        disable=not self.tty)
        self.names, self.done, self.start = names, 0, time.perf_counter()
        self.drawn = 0.0  # when the postfix was last redrawn

    def training(self, total: int) -> Callable[[int, float], None]:
        """An ``on_step`` for :func:`train`: the step count and loss in the bar's postfix,
        redrawn at most once a second (a terminal only; a log keeps one line per step)."""
        name = self.names[self.done - 1]

        def on_step(step: int, loss: float) -> None:
            now = time.perf_counter()
            if self.tty and (now - self.drawn >= 1.0 or step == total):
                self.drawn = now
                self.bar.set_postfix_str(f"{name} {step}/{total} loss {loss:.3f}")

        return on_step

    def next(self) -> None:
        """Start the next step (the previous one is done)."""
        if self.done:
            self.bar.update(1)
        name = self.names[self.done]
        self.done += 1
        if self.tty:
            self.bar.set_postfix_str(name)
        else:
            took = time.perf_counter() - self.start
            print(f"toy suite: step {self.done}/{len(self.names)}: {name} ({took:.0f}s so far)",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.update(len(self.names) - self.bar.n)
        self.bar.close()


def _build(root: Path, s: dict[str, Any]) -> None:
    start = time.perf_counter()
    steps = _Steps(["pretraining the base", *(f"training expert {t}" for t in
                                               s["expert_tasks"]), "scoring every model"])
    steps.next()
    tok = make_tokenizer()
    data = _write_data(root, s)
    enc = {t: encode_rows(splits["train"], tok) for t, splits in data.items()}
    base = make_model(tok, seed=s["seed"], **s["arch"])
    train(base, _pretrain_data(data, tok, s), s["pretrain_mix"], seed=s["seed"], **s["pretrain"],
          on_step=steps.training(s["pretrain"]["steps"]))
    _save(base, tok, root / "base")
    models = {"base": base}
    for i, task in enumerate(s["expert_tasks"], start=1):
        steps.next()
        expert = copy.deepcopy(base)
        train(expert, {task: enc[task]}, {task: 1.0}, seed=s["seed"] + i,
              trainable=lambda name: ".layers." in name, **s["expert"],
              on_step=steps.training(s["expert"]["steps"]))
        _save(expert, tok, root / "experts" / task)
        models[f"expert/{task}"] = expert
    steps.next()
    models[MERGE_NAME] = _uniform_merge(models, s)
    table = {name: _scores(m, tok, root, s) for name, m in models.items()}
    steps.close()
    targets = {
        "split": "test", "expert_tasks": s["expert_tasks"], "merge": s["merge"],
        "accuracy": table, "build_seconds": round(time.perf_counter() - start, 1),
        "settings": s,
    }
    (root / "targets.json").write_text(json.dumps(targets, indent=2) + "\n")
    _write_task_yamls(root, s["tasks"])
    manifest = {"settings": s, "hash": _hash(s), "files": _file_hashes(root)}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(format_table(targets))


def _uniform_merge(models: dict[str, Any], s: dict[str, Any]) -> Any:
    """θ0 + Σ τk / K through the merge engine (the search's uniform baseline)."""
    from evomerge.merge.reference import merge_state_dicts
    from evomerge.recipe import Recipe

    tasks = s["expert_tasks"]
    recipe = Recipe(
        method="task_arithmetic",
        sources={"base": "base", **{t: f"experts/{t}" for t in tasks}},
        base_model="base",
        models={t: {"weight": s["merge"]["weight"]} for t in tasks},
    )
    sds = {"base": models["base"].state_dict()}
    sds.update({t: models[f"expert/{t}"].state_dict() for t in tasks})
    merged = copy.deepcopy(models["base"])
    num_layers = s["arch"]["num_hidden_layers"]
    merged.load_state_dict(merge_state_dicts(recipe, sds, num_layers=num_layers))
    return merged.eval()


def _scores(model: Any, tok: Any, root: Path, s: dict[str, Any]) -> dict[str, float]:
    from evomerge.config import AccuracyEvalConfig
    from evomerge.evaluators.accuracy import AccuracyEvaluator

    out = {}
    for task in s["tasks"]:
        cfg = AccuracyEvalConfig(
            name="accuracy", data=str(root / "data" / task), split="test",
            batch_size=100, max_new_tokens=16,
        )
        out[task] = next(iter(AccuracyEvaluator(cfg).evaluate(model, tok).values()))
    out["expert_avg"] = sum(out[t] for t in s["expert_tasks"]) / len(s["expert_tasks"])
    return {k: round(v, 4) for k, v in out.items()}


def _write_task_yamls(root: Path, tasks: list[str]) -> None:
    try:
        from evomerge.evaluators.lm_tasks import write_toy_tasks
    except ModuleNotFoundError as err:
        if err.name != "evomerge.evaluators.lm_tasks":
            raise
        return
    write_toy_tasks(root, tasks)


def format_table(targets: dict[str, Any]) -> str:
    """The target table as aligned text (rows: models; columns: tasks and the expert average)."""
    table = targets["accuracy"]
    cols = list(next(iter(table.values())))
    width = max(len(name) for name in table) + 2
    lines = [f"toy suite accuracy on {targets['split']} "
             f"(built in {targets['build_seconds']} s)",
             "model".ljust(width) + "".join(c.rjust(11) for c in cols)]
    for name, row in table.items():
        lines.append(name.ljust(width) + "".join(f"{row[c]:11.3f}" for c in cols))
    return "\n".join(lines)
