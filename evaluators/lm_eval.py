"""Any lm-evaluation-harness task, run on the in-memory model.

Built for a search loop: the task manager and the task dict are built once per evaluator (local
tasks from ``include_path`` are indexed alone, in well under a second; lm-eval's ~14k built-in
tasks are indexed, ~14 s, only when a name is not found locally), and one ``HFLM`` wraps the
model for as long as the same model object is passed in. Loading new weights into that model is
enough: every call runs the harness again on its current weights.

The config's ``split`` (``validation`` by default) becomes each task's evaluation split; the
held-out pass (``split="test"``) runs ``held_out_tasks`` on their own default split if given,
else the same tasks on the test split. Metrics: ``lm_eval/<task>/<metric>`` for every numeric
metric (filters other than ``none`` add ``/<filter>``); standard errors are not computed.

lm-eval compiles each Jinja prompt template again for every document (``utils.apply_template``
-> ``Environment.from_string``), which was 22% of an evaluation of a toy task. The evaluator
installs :func:`cached_apply_template` in its process instead: the same environment and the
same rendering, with the compiled template of each template string kept (an LRU of 4096).

Evaluation cost: per task, ``scored/examples/lm_eval/<task>`` is the number of documents
scored (lm-eval's ``n-samples``, so the limited number under a ``limit``) and
``scored/tokens/lm_eval/<task>`` the tokens of the generated answers (re-tokenized, the stop
string excluded) plus the tokens of every scored log-likelihood continuation, counted by a
subclass of ``HFLM`` around its three request methods.

Set ``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1`` for local tasks, so nothing reaches the network.

>>> from evomerge.config import LmEvalConfig
>>> cfg = LmEvalConfig(name="lm_eval", tasks=("toy_reverse",), include_path="toy_suite/tasks")
>>> LmEvalEvaluator(cfg).evaluate(model, tokenizer)  # doctest: +SKIP
{'lm_eval/toy_reverse/exact_match': 0.93, 'scored/examples/lm_eval/toy_reverse': 100.0, ...}
"""

from __future__ import annotations

import difflib
import functools
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evomerge.evaluators.base import (
    Subset,
    effective_limit,
    per_example_record,
    scored,
    subset_of,
    weighted_mean,
)
from evomerge.evaluators.generation import Drafts
from evomerge.evaluators.lm_eval_model import counting_lm_class

FEWSHOT_SEED = 1234  # lm_eval.simple_evaluate's default, so few-shot prompts match the CLI


@functools.lru_cache(maxsize=4096)
def _compiled(template: str) -> Any:
    from lm_eval.utils import env

    return env.from_string(template)


def cached_apply_template(template: str, doc: dict[str, Any]) -> str:
    """``lm_eval.utils.apply_template`` with each template compiled once."""
    return _compiled(template).render(**doc)  # type: ignore[no-any-return]


def install_template_cache() -> None:
    """Make lm-eval render prompts with :func:`cached_apply_template` (idempotent)."""
    import lm_eval.utils

    lm_eval.utils.apply_template = cached_apply_template  # type: ignore[assignment]


def task_manager(names: Sequence[str], include_path: str | None) -> Any:
    """A ``TaskManager`` that knows every name; an unknown name lists close matches."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).exists():
            raise FileNotFoundError(f"lm_eval include_path {include_path!r} does not exist")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    tm = TaskManager(include_path=include_path)
    for name in names:
        if name not in tm.all_tasks:
            close = difflib.get_close_matches(name, tm.all_tasks, n=5, cutoff=0.6)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            where = f" in {include_path!r} or" if include_path else ""
            raise ValueError(
                f"unknown lm_eval task {name!r}: not found{where} among lm-eval's built-in tasks."
                f"{hint} List them with `lm-eval ls tasks`"
            )
    return tm


def load_task_dict(
    names: Sequence[str], include_path: str | None, *, split: str | None, num_fewshot: int | None
) -> Any:
    """Load the tasks once, with their evaluation split and few-shot count set."""
    loaded = task_manager(names, include_path).load(list(names))
    for task_name, task in loaded["tasks"].items():
        if split is not None:
            available = list(getattr(task, "dataset", None) or [])
            if split not in available:
                raise ValueError(
                    f"lm_eval task {task_name!r} has no split {split!r} (it has {available}); "
                    "set the evaluator's 'split' to one of them"
                )
            task.set_config(key="test_split", value=split)
        default = task.get_config("num_fewshot")
        if num_fewshot is not None and default != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif default is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    return loaded


def numeric_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``lm_eval/<task>/<metric>[/<filter>]`` for each finite numeric result; stderr dropped."""
    out: dict[str, float] = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")
            if not comma or metric.endswith("_stderr") or isinstance(value, bool):
                continue  # "alias", "sample_len" and standard errors are not metrics
            if isinstance(value, (int, float)) and math.isfinite(value):
                suffix = "" if filt in ("", "none") else f"/{filt}"
                out[f"lm_eval/{task}/{metric}{suffix}"] = float(value)
    return out


def scored_counts(results: dict[str, Any], tokens: Counter[str]) -> dict[str, float]:
    """``scored/examples/lm_eval/<task>`` and ``scored/tokens/lm_eval/<task>`` per task."""
    out: dict[str, float] = {}
    for task, n in results.get("n-samples", {}).items():
        out.update(scored(f"lm_eval/{task}", examples=int(n["effective"]), tokens=tokens[task]))
    return out


class LmEvalEvaluator:
    """``evaluate(model, tokenizer) -> {"lm_eval/<task>/<metric>": value}`` and the
    ``scored/`` counts of each task."""

    name = "lm_eval"

    def __init__(self, cfg: Any, *, split: str | None = None) -> None:
        install_template_cache()
        self.cfg = cfg
        held_out = split is not None and split != cfg.split and bool(cfg.held_out_tasks)
        self.tasks = tuple(cfg.held_out_tasks if held_out else cfg.tasks)
        self.split = None if held_out else (split or cfg.split)
        self.task_dict = load_task_dict(
            self.tasks, cfg.include_path, split=self.split, num_fewshot=cfg.num_fewshot
        )
        docs = max(len(t.eval_docs) for t in self.task_dict["tasks"].values())
        self.num_examples = effective_limit(docs, cfg.limit)  # what a full evaluation scores
        self._lm: Any = None
        self._tokenizer: Any = None
        # each prompt's last answer, kept across models (a search's candidates answer alike)
        self.drafts = Drafts() if cfg.speculative else None

    def _wrap(self, model: Any, tokenizer: Any) -> Any:
        lm = self._lm
        if lm is None or lm.model is not model or self._tokenizer is not tokenizer:
            lm = counting_lm_class()(pretrained=model, tokenizer=tokenizer,
                                     batch_size=self.cfg.batch_size)
            lm.drafts = self.drafts
            self._lm, self._tokenizer = lm, tokenizer
        return lm

    def evaluate(
        self, model: Any, tokenizer: Any, *, limit: int | None = None,
        subset: Subset | None = None, per_example: dict[str, Any] | None = None,
    ) -> dict[str, float]:
        """Run the tasks on the model's current weights (first ``limit`` docs of each task), or
        on the docs ``subset["lm_eval/<task>"]`` names (lm-eval's ``samples``; each metric the
        weighted mean of its per-doc values); ``per_example`` gets each task's per-doc values
        of its first metric (lm-eval's logged samples)."""
        from lm_eval.evaluator import evaluate

        chosen = {
            task: c for task in self.task_dict["tasks"]
            if (c := subset_of(subset, f"lm_eval/{task}", self._docs(task), limit)) is not None
        }
        lm = self._wrap(model, tokenizer)
        lm.tokens.clear()
        results = evaluate(
            lm=lm,
            task_dict=self.task_dict,
            limit=None if chosen else effective_limit(self.num_examples, limit, self.cfg.limit),
            samples={t: sorted(c[0]) for t, c in chosen.items()} or None,
            bootstrap_iters=0,
            log_samples=bool(chosen) or per_example is not None,
        )
        if results is None:
            raise RuntimeError("lm_eval returned no results (not rank 0 of a distributed run)")
        out = {**numeric_metrics(results), **scored_counts(results, lm.tokens)}
        for task, logged in (results.get("samples") or {}).items():
            by_doc = dict(zip(*chosen[task], strict=True)) if task in chosen else None
            out.update(self._from_samples(task, logged, by_doc, per_example))
        return out

    def _docs(self, task: str) -> int:
        return effective_limit(len(self.task_dict["tasks"][task].eval_docs), self.cfg.limit)

    def _from_samples(
        self, task: str, logged: list[dict[str, Any]], weights: dict[int, float] | None,
        per_example: dict[str, Any] | None,
    ) -> dict[str, float]:
        """The task's metrics as weighted means over its logged samples (``weights``: doc id
        -> weight, None for no subset: nothing to recompute), and its per-doc values."""
        from lm_eval.api.metrics import mean

        aggregation = self.task_dict["tasks"][task].aggregation()
        out: dict[str, float] = {}
        first = logged[0]
        if per_example is not None:
            rows = sorted((r for r in logged if r["filter"] == first["filter"]),
                          key=lambda r: r["doc_id"])
            per_example[f"lm_eval/{task}"] = per_example_record(
                [float(r[first["metrics"][0]]) for r in rows])
        if weights is None:
            return out
        for r in logged:
            for metric in r["metrics"]:
                if aggregation.get(metric) is not mean:
                    raise ValueError(
                        f"lm_eval/{task}: metric {metric!r} is not a mean over documents, so "
                        "it cannot be scored on a weighted subset; remove search.fidelity."
                        "subset or the task"
                    )
        for filt in {r["filter"] for r in logged}:
            rows = [r for r in logged if r["filter"] == filt]
            for metric in rows[0]["metrics"]:
                suffix = "" if filt in ("", "none") else f"/{filt}"
                out[f"lm_eval/{task}/{metric}{suffix}"] = weighted_mean(
                    [float(r[metric]) for r in rows], [weights[r["doc_id"]] for r in rows])
        return out
