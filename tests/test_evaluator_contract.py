"""One contract, run over every evaluator registered in ``evomerge.registries.EVALUATORS``.

Each registered name needs a case below: a config on a small local dataset. A new evaluator
without a case fails here until one is added.
"""

from __future__ import annotations

import fnmatch
import json
import math

import pytest
import torch

from evomerge.config import (
    AccuracyEvalConfig,
    CostEvalConfig,
    EntropyEvalConfig,
    LmEvalConfig,
    PerplexityEvalConfig,
)
from evomerge.evaluators.base import (
    SCORED_EXAMPLES,
    SCORED_TOKENS,
    Evaluator,
    build_evaluator,
    is_scored,
)
from evomerge.evaluators.lm_tasks import write_toy_tasks
from evomerge.registries import EVALUATORS
from evomerge.search.objectives import scored_patterns

ROWS = [{"prompt": f"rev:{w}>", "answer": w[::-1]} for w in
        ("abc", "hello", "xy", "mnop", "qrstu", "z")]
LIMIT = 3


def write_suite(root, rows):
    """``root/data/ctr/{validation,test}.jsonl`` and the lm-eval task ``toy_ctr``."""
    folder = root / "data" / "ctr"
    folder.mkdir(parents=True)
    for split, part in (("validation", rows), ("test", rows[::-1])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return folder, write_toy_tasks(root, ["ctr"])


def configs(folder, tasks):
    """name -> config on the data in ``folder`` (tasks: the matching lm-eval task folder)."""
    data = str(folder)
    return {
        "entropy": EntropyEvalConfig(name="entropy", data=data, batch_size=4),
        "accuracy": AccuracyEvalConfig(name="accuracy", data=data, max_new_tokens=6),
        "perplexity": PerplexityEvalConfig(name="perplexity", data=data, batch_size=4),
        "lm_eval": LmEvalConfig(name="lm_eval", tasks=("toy_ctr",), include_path=str(tasks),
                                batch_size=4),
        "cost": CostEvalConfig(name="cost"),
    }


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    full = write_suite(tmp_path_factory.mktemp("contract_full"), ROWS)
    short = write_suite(tmp_path_factory.mktemp("contract_short"), ROWS[:LIMIT])
    return configs(*full), configs(*short)


@pytest.fixture(scope="module")
def lm(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["c"], dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_models["c"])


@pytest.fixture(scope="module")
def built():
    return {}


@pytest.mark.parametrize("name", EVALUATORS.names())
class TestEvaluatorContract:
    def evaluator(self, name, cases, built):
        full, _ = cases
        assert name in full, f"add a contract case for evaluator {name!r} in this file"
        if name not in built:
            built[name] = build_evaluator(full[name])
        return built[name]

    def test_protocol(self, name, cases, built):
        ev = self.evaluator(name, cases, built)
        assert isinstance(ev, Evaluator) and ev.name == name

    def test_namespaced_finite_floats(self, name, cases, built, lm):
        out = self.evaluator(name, cases, built).evaluate(*lm)
        assert isinstance(out, dict) and any(not is_scored(k) for k in out)
        for key, value in out.items():
            prefix = "scored/" if is_scored(key) else f"{name}/"
            assert key.startswith(prefix) and len(key) > len(prefix), key
            assert type(value) is float and math.isfinite(value), (key, value)

    @pytest.mark.parametrize("limit", [None, LIMIT])
    def test_scored_counts(self, name, cases, built, lm, limit):
        """Each result counts what it scored: ``scored/examples/<label>`` is the examples
        (the limited number under a limit; 0 for cost), ``scored/tokens/<label>`` > 0 where
        examples were scored; every label prefixes the evaluator's metrics."""
        out = self.evaluator(name, cases, built).evaluate(*lm, limit=limit)
        examples = {k.removeprefix(SCORED_EXAMPLES): v for k, v in out.items()
                    if k.startswith(SCORED_EXAMPLES)}
        tokens = {k.removeprefix(SCORED_TOKENS): v for k, v in out.items()
                  if k.startswith(SCORED_TOKENS)}
        assert examples and set(examples) == set(tokens)
        assert len(examples) + len(tokens) == sum(is_scored(k) for k in out)
        quality = [k for k in out if not is_scored(k)]
        for label, n in examples.items():
            assert label == name or any(k.startswith(f"{label}/") or k == label
                                        for k in quality), (label, quality)
            assert n == (0 if name == "cost" else (limit or len(ROWS)))
            assert tokens[label] == int(tokens[label]) and (tokens[label] > 0) == (n > 0)
        patterns = scored_patterns(cases[0][name])
        assert all(any(fnmatch.fnmatchcase(k, p) for p in patterns)
                   for k in out if is_scored(k))

    def test_deterministic(self, name, cases, built, lm):
        ev = self.evaluator(name, cases, built)
        assert ev.evaluate(*lm) == ev.evaluate(*lm)

    def test_limit_means_the_first_rows(self, name, cases, built, lm):
        _, short = cases
        limited = self.evaluator(name, cases, built).evaluate(*lm, limit=LIMIT)
        assert limited == build_evaluator(short[name]).evaluate(*lm)

    def test_num_examples_for_fidelity(self, name, cases, built):
        """The worker's multi-fidelity reads ``num_examples`` (None: nothing to subsample)."""
        ev = self.evaluator(name, cases, built)
        expected = None if name == "cost" else len(ROWS)
        assert getattr(ev, "num_examples", None) == expected

    def test_missing_split_is_an_error(self, name, cases):
        full, _ = cases
        if name == "cost":
            build_evaluator(full[name], split="nosuch")  # reads no data: any split is fine
            return
        with pytest.raises((FileNotFoundError, ValueError), match="nosuch"):
            build_evaluator(full[name], split="nosuch")
