"""lm-evaluation-harness task YAMLs for local ``{prompt, answer}`` JSONL data (the toy suite).

Each task greedily generates after the prompt, stops at a newline, and scores ``exact_match``
(leading and trailing whitespace ignored, as the ``accuracy`` evaluator's default ``strip``).
The YAML's ``test_split`` is ``test``, so the stock ``lm_eval`` CLI scores the held-out split;
:class:`~evomerge.evaluators.lm_eval.LmEvalEvaluator` selects the split its config names.

>>> write_toy_tasks("toy_suite", ["reverse", "sort"])  # doctest: +SKIP
PosixPath('/abs/toy_suite/tasks')
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

SPLITS = ("train", "validation", "test")
MAX_GEN_TOKS = 32


def toy_task_config(
    name: str, data_files: dict[str, str], *, until: Sequence[str] = ("\n",)
) -> dict[str, Any]:
    """The lm-eval config of one local generate task named ``toy_<name>``, generating until
    one of ``until`` (its stop strings; EOS always stops too)."""
    return {
        "task": f"toy_{name}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": data_files},
        "output_type": "generate_until",
        **({"training_split": "train"} if "train" in data_files else {}),
        "validation_split": "validation",
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        # lm-eval puts a space between prompt and target unless told otherwise
        "target_delimiter": "",
        "generation_kwargs": {"until": list(until), "do_sample": False,
                              "max_gen_toks": MAX_GEN_TOKS},
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "regexes_to_ignore": [r"^\s+", r"\s+$"],
            }
        ],
        "metadata": {"version": 1.0},
    }


def write_toy_tasks(suite_dir: str | Path, task_names: Sequence[str]) -> Path:
    """Write ``<suite_dir>/tasks/toy_<task>.yaml`` for each task and return the tasks folder.

    Data come from ``<suite_dir>/data/<task>/{train,validation,test}.jsonl`` (absolute paths in
    the YAML; ``validation`` and ``test`` are required, ``train`` is used when present).
    """
    suite = Path(suite_dir).resolve()
    if not task_names:
        raise ValueError("task_names is empty; give at least one toy task")
    out = suite / "tasks"
    out.mkdir(parents=True, exist_ok=True)
    for name in task_names:
        folder = suite / "data" / name
        files = {s: folder / f"{s}.jsonl" for s in SPLITS if (folder / f"{s}.jsonl").is_file()}
        missing = [s for s in ("validation", "test") if s not in files]
        if missing:
            raise FileNotFoundError(
                f"toy task {name!r}: {', '.join(f'{folder}/{s}.jsonl' for s in missing)} "
                "missing; build the suite's data first"
            )
        config = toy_task_config(name, {s: str(p) for s, p in files.items()})
        (out / f"toy_{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out
