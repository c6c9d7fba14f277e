"""Evaluation cost through a real worker: every evaluator's ``scored/examples/<label>`` is the
number of examples it scored at each fidelity fraction (of what a full evaluation scores, its
``limit`` included) and on the held-out split; the counts never pass for quality metrics."""

from __future__ import annotations

import fnmatch
import json
import math

import pytest

from evomerge.config import AccuracyEvalConfig, LmEvalConfig, Objective, parse_job
from evomerge.evaluators.base import SCORED_EXAMPLES, is_scored
from evomerge.recipe import Recipe
from evomerge.search.objectives import check_objectives, metric_patterns
from evomerge.search.worker import MergeWorker

N_VALIDATION, N_TEST = 10, 7


@pytest.fixture(scope="module")
def worker(tiny_models, tmp_path_factory):
    """A MergeWorker in this process (no Ray): accuracy capped at 8 rows, entropy on all 10,
    perplexity capped at 6, and cost."""
    root = tmp_path_factory.mktemp("scored")
    data = root / "rev"
    data.mkdir()
    for split, n in (("validation", N_VALIDATION), ("test", N_TEST)):
        rows = [{"prompt": f"rev:{'abcdefghij'[: i + 1]}>", "answer": "x"} for i in range(n)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = parse_job({
        "name": "scored", "run_dir": str(root / "run"),
        "models": {"base": {"path": str(tiny_models["base"])},
                   "experts": {n: {"path": str(tiny_models[n])} for n in ("a", "b")}},
        "evaluators": [
            {"name": "accuracy", "data": str(data), "limit": 8, "max_new_tokens": 4},
            {"name": "entropy", "data": str(data), "label": "ent"},
            {"name": "perplexity", "data": str(data), "label": "ppl", "limit": 6},
            {"name": "cost"},
        ],
        "objectives": [{"metric": "accuracy/rev"}],
    })
    return MergeWorker(job.model_dump_json())


def recipe(paths) -> str:
    return Recipe(method="task_arithmetic", sources={n: str(paths[n]) for n in ("base", "a", "b")},
                  base_model="base", models={"a": {"weight": 0.5}, "b": {"weight": 0.5}}).to_json()


def examples(metrics) -> dict[str, float]:
    return {k.removeprefix(SCORED_EXAMPLES): v for k, v in metrics.items()
            if k.startswith(SCORED_EXAMPLES)}


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25])
def test_examples_scored_at_each_fraction(worker, tiny_models, fraction):
    metrics = worker.evaluate(recipe(tiny_models), fraction)["metrics"]
    full = {"accuracy/rev": 8, "entropy/ent": N_VALIDATION, "perplexity/ppl": 6, "cost": 0}
    want = {k: float(n if fraction == 1.0 or n == 0 else math.ceil(fraction * n))
            for k, n in full.items()}
    assert examples(metrics) == want  # 0.5: 4, 5, 3 (the fraction of the limited number)
    assert all(metrics[f"scored/tokens/{k}"] > 0 for k, n in want.items() if n)
    total = sum(v for k, v in metrics.items() if k.startswith(SCORED_EXAMPLES))
    assert total == sum(want.values())


def test_held_out_counts_the_whole_test_split(worker, tiny_models):
    metrics = worker.evaluate_held_out(recipe(tiny_models))["metrics"]
    assert examples(metrics) == {"accuracy/rev": N_TEST, "entropy/ent": N_TEST,
                                 "perplexity/ppl": N_TEST}


def test_counts_never_match_a_quality_pattern():
    evs = [AccuracyEvalConfig(name="accuracy", data="toy/data/add"),
           LmEvalConfig(name="lm_eval", tasks=("toy_rot13",))]
    patterns = [p for cfg in evs for p in metric_patterns(cfg)] + ["accuracy/*", "lm_eval/*"]
    counts = ["scored/examples/accuracy/add", "scored/tokens/lm_eval/toy_rot13"]
    assert all(is_scored(c) for c in counts)
    assert not any(fnmatch.fnmatchcase(c, p) for c in counts for p in patterns)
    check_objectives([Objective(metric="accuracy/add")], evs)  # validation as before
    check_objectives([Objective(metric=c, direction="minimize") for c in counts], evs)
    with pytest.raises(ValueError, match="'scored/examples/accuracy/sub' is produced by no"):
        check_objectives([Objective(metric="scored/examples/accuracy/sub")], evs)
