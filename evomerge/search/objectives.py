"""Objectives: which metrics a job produces, and metric dicts -> objective values."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import Any

from evomerge.config import Objective


def metric_patterns(evaluator_cfg: Any) -> list[str]:
    """Metric names (fnmatch patterns) an evaluator config will produce."""
    from evomerge.evaluators.base import default_label

    name = evaluator_cfg.name
    if name == "cost":
        return ["cost/params", "cost/layers"] + (
            ["cost/ms_per_token"] if evaluator_cfg.latency else []
        )
    if name == "lm_eval":
        return [f"lm_eval/{task}/*" for task in evaluator_cfg.tasks]
    label = evaluator_cfg.label or default_label(evaluator_cfg.data)
    return [f"{name}/{label}"]


def scored_patterns(evaluator_cfg: Any) -> list[str]:
    """The cost counts an evaluator config reports beside its metrics
    (``scored/examples/<label>``, ``scored/tokens/<label>``; see ``evaluators.base``).

    >>> from evomerge.config import CostEvalConfig
    >>> scored_patterns(CostEvalConfig(name="cost"))
    ['scored/examples/cost', 'scored/tokens/cost']
    """
    from evomerge.evaluators.base import SCORED_EXAMPLES, SCORED_TOKENS, default_label

    name = evaluator_cfg.name
    if name == "cost":
        labels = ["cost"]
    elif name == "lm_eval":
        labels = [f"lm_eval/{task}" for task in evaluator_cfg.tasks]
    else:
        labels = [f"{name}/{evaluator_cfg.label or default_label(evaluator_cfg.data)}"]
    return [f"{prefix}{label}" for prefix in (SCORED_EXAMPLES, SCORED_TOKENS) for label in labels]


def check_objectives(objectives: Sequence[Objective], evaluators: Sequence[Any]) -> None:
    """Refuse an objective metric that no evaluator produces (before any worker starts).

    The ``scored/`` cost counts are accepted too (e.g. minimize ``scored/tokens/accuracy/x``)
    but left out of the error's list of what the evaluators produce.
    """
    patterns = [p for cfg in evaluators for p in metric_patterns(cfg)]
    counts = {p for cfg in evaluators for p in scored_patterns(cfg)}
    for i, obj in enumerate(objectives):
        for metric in obj.metrics:
            if metric in counts:
                continue
            if not any(fnmatch.fnmatchcase(metric, p) for p in patterns):
                raise ValueError(
                    f"objectives.{i}: metric {metric!r} is produced by no evaluator; "
                    f"the evaluators produce: {', '.join(patterns)} (and a "
                    "scored/examples/<metric prefix> and scored/tokens/<metric prefix> count each)"
                )


def objective_values(objectives: Sequence[Objective], metrics: Mapping[str, float]) -> list[float]:
    """One value per objective; a weighted objective is the weighted mean of its metrics."""
    values = []
    for obj in objectives:
        if obj.metric is not None:
            value = _get(metrics, obj.metric)
        else:
            weights = obj.weights or {}
            total = sum(weights.values())
            value = sum(w * _get(metrics, m) for m, w in weights.items()) / total
        if not math.isfinite(value):
            raise ValueError(f"objective {obj.label!r} is {value} (metrics: {dict(metrics)})")
        values.append(float(value))
    return values


def _get(metrics: Mapping[str, float], name: str) -> float:
    if name not in metrics:
        raise KeyError(f"metric {name!r} missing from the evaluation; got {sorted(metrics)}")
    value = metrics[name]
    return math.nan if value is None else float(value)  # stored non-finite metrics are null


def objective_label(obj: Objective) -> str:
    """What the objective is, in words a reader does not misread as a sum: the metric, or
    ``mean(a, b)`` (equal weights), or ``weighted_mean(a=2, b=1)``.

    >>> objective_label(Objective(weights={"accuracy/a": 1, "accuracy/b": 1}))
    'mean(accuracy/a, accuracy/b)'
    """
    return obj.label
