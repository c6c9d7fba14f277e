"""Evaluation cost of a run: examples (and tokens) scored, read from the stored study.

On a real model the evaluation is the whole cost of a search, so what a search needs is counted
in examples scored, not in trials. Evaluators report their cost per evaluation as metrics
``scored/examples/<label>`` and ``scored/tokens/<label>`` (the examples actually scored, after
``limit`` and the fidelity fraction). A trial's cost is the sum over its evaluations: every rung
it was scored at (``user_attrs["rungs"]``), or its one evaluation (``user_attrs["metrics"]``).
The held-out and reference passes after the search (study attributes ``held_out:<n>`` and
``reference:<name>``) are counted apart: they are not what the search spent to find its best.

Runs stored before evaluators reported ``scored/`` metrics get an estimate from the fidelity
fractions and the data sizes (``Cost.estimated``; no tokens), where the data files are still
there; an evaluator whose size cannot be known (lm_eval tasks) makes the estimate ``None``.
A failed evaluation that returned nothing counts 0.

>>> metrics_cost({"scored/examples/a": 150, "scored/examples/b": 150, "scored/tokens/a": 9})
Cost(examples=300, tokens=9, estimated=False)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXAMPLES = "scored/examples/"
TOKENS = "scored/tokens/"
FULL = 1.0  # held-out and reference passes score every example (no fidelity)

Estimate = Callable[[float], "int | None"]  # fraction -> examples scored (None: unknown)


@dataclass(frozen=True)
class Cost:
    """Examples and tokens scored; ``None``: not known; ``estimated``: from the fractions and
    data sizes, not from ``scored/`` metrics."""

    examples: int | None = 0
    tokens: int | None = 0
    estimated: bool = False

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            _add(self.examples, other.examples),
            _add(self.tokens, other.tokens),
            self.estimated or other.estimated,
        )


def _add(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


def total(costs: Iterable[Cost]) -> Cost:
    out = Cost()
    for c in costs:
        out = out + c
    return out


def metrics_cost(metrics: Mapping[str, Any] | None) -> Cost | None:
    """The ``scored/`` metrics of one evaluation summed over evaluators; ``None`` when the
    evaluation reported none (an older run). Tokens are ``None`` if no evaluator counts them."""
    if not metrics:
        return None
    ex = [v for k, v in metrics.items() if k.startswith(EXAMPLES) and v is not None]
    if not ex:
        return None
    tok = [v for k, v in metrics.items() if k.startswith(TOKENS) and v is not None]
    return Cost(int(sum(ex)), int(sum(tok)) if tok else None)


def evaluations(attrs: Mapping[str, Any], first_fraction: float) -> list[tuple[float, Any]]:
    """``(fraction, metrics)`` of each evaluation a trial stored: its rungs, or its one set of
    metrics (scored at the first rung's fraction); none for a trial that returned nothing."""
    rungs = attrs.get("rungs")
    if rungs:  # a rung read off a longer evaluation's prefix (``"prefix": true``) cost nothing
        return [(float(r["fraction"]), r.get("metrics")) for r in rungs if not r.get("prefix")]
    metrics = attrs.get("metrics")
    return [(first_fraction, metrics)] if metrics else []


def evaluation_cost(
    fraction: float, metrics: Mapping[str, Any] | None, estimate: Estimate | None
) -> Cost:
    """One evaluation: its ``scored/`` metrics, else the estimate at ``fraction``."""
    cost = metrics_cost(metrics)
    if cost is not None:
        return cost
    if estimate is None:
        return Cost(None, None, estimated=True)
    return Cost(estimate(fraction), None, estimated=True)


def trial_cost(
    attrs: Mapping[str, Any], *, first_fraction: float = 1.0, estimate: Estimate | None = None
) -> Cost:
    """What one trial's search evaluations scored, summed over its rungs."""
    return total(evaluation_cost(f, m, estimate) for f, m in evaluations(attrs, first_fraction))


@dataclass(frozen=True)
class TrialCost:
    number: int
    cost: Cost
    cumulative: Cost  # this trial and every earlier one (by trial number)
    evaluations: int  # calls that returned metrics (0: running, or failed with nothing)


def search_costs(
    trials: Iterable[Any], job: Any, *, estimate: Estimate | None = None
) -> list[TrialCost]:
    """Each trial's cost and the running total, in trial order (FrozenTrials)."""
    first = job.search.fidelity.fractions[0] if job.search.fidelity else 1.0
    out, running = [], Cost()
    for t in sorted(trials, key=lambda t: t.number):
        calls = evaluations(t.user_attrs, first)
        cost = total(evaluation_cost(f, m, estimate) for f, m in calls)
        running = running + cost
        out.append(TrialCost(t.number, cost, running, len(calls)))
    return out


def held_out_costs(
    study_attrs: Mapping[str, Any], *, estimate: Estimate | None = None
) -> dict[int, Cost]:
    """Trial number -> its held-out pass (``held_out:<n>`` entries that hold metrics)."""
    from evomerge.search.heldout import PREFIX

    return {
        int(k.removeprefix(PREFIX)): evaluation_cost(FULL, v.get("metrics"), estimate)
        for k, v in study_attrs.items()
        if k.startswith(PREFIX) and isinstance(v, dict) and v.get("metrics")
    }


def reference_costs(
    study_attrs: Mapping[str, Any],
    *,
    fitness: Estimate | None = None,
    held_out: Estimate | None = None,
) -> dict[str, tuple[Cost, Cost]]:
    """Reference name -> (its fitness pass, its held-out pass); a part not scored costs 0."""
    from evomerge.search.references import PREFIX

    out = {}
    for k, v in study_attrs.items():
        if not k.startswith(PREFIX) or not isinstance(v, dict):
            continue
        parts = []
        for part, est in (("metrics", fitness), ("held_out", held_out)):
            m = v.get(part)
            parts.append(evaluation_cost(FULL, m, est) if m and "error" not in m else Cost())
        out[k.removeprefix(PREFIX)] = (parts[0], parts[1])
    return out


@dataclass(frozen=True)
class RunCost:
    """The search's evaluations, the held-out pass, the reference passes (both splits)."""

    search: Cost
    held_out: Cost
    reference: Cost

    @property
    def estimated(self) -> bool:
        return self.search.estimated or self.held_out.estimated or self.reference.estimated


def run_cost(study: Any, job: Any) -> RunCost:
    """The whole run's cost from its storage (estimates only where ``scored/`` is missing)."""
    fit, held = estimators(job)
    trials = study.get_trials(deepcopy=False)
    costs = search_costs(trials, job, estimate=fit)
    attrs = study.user_attrs
    refs = reference_costs(attrs, fitness=fit, held_out=held).values()
    return RunCost(
        costs[-1].cumulative if costs else Cost(),
        total(held_out_costs(attrs, estimate=held).values()),
        total(a + b for a, b in refs),
    )


# -- the estimate for runs without scored/ metrics: the fractions and the data sizes ----------
def limited(n: int, fraction: float, limit: int | None) -> int:
    """Examples an evaluator of ``n`` rows scored at ``fraction`` under ``limit`` in a run that
    stored no ``scored/`` metrics: the worker of those versions took the fraction of the rows,
    then the config's limit (so ``limit: 32`` of 600 rows scored 32 at 0.25 as at 1.0)."""
    k = n if fraction >= 1.0 else max(1, math.ceil(fraction * n))
    return min(n, k, limit if limit is not None else n)


def estimators(job: Any) -> tuple[Estimate | None, Estimate | None]:
    """``(fitness, held_out)`` estimates for ``job``'s evaluators from their data files, read on
    the first call (they may be gone or changed since the run); an estimate returns ``None``
    where a size is not known."""
    from evomerge.search.worker import has_held_out, held_out_config

    def fitness() -> list[tuple[int | None, int | None]]:
        return [
            (
                _rows(cfg, getattr(cfg, "split", None)) if _reads(cfg) else 0,
                getattr(cfg, "limit", None),
            )
            for cfg in job.evaluators
        ]

    def held_out() -> list[tuple[int | None, int | None]]:
        return [
            (_rows(cfg, getattr(cfg, "held_out_split", None)), held_out_config(cfg).limit)
            for cfg in job.evaluators
            if has_held_out(cfg)
        ]

    return _lazy(fitness), _lazy(held_out)


def _lazy(sizes: Callable[[], list[tuple[int | None, int | None]]]) -> Estimate:
    cache: list[list[tuple[int | None, int | None]]] = []

    def estimate(fraction: float) -> int | None:
        if not cache:
            cache.append(sizes())
        if any(n is None for n, _ in cache[0]):
            return None
        return sum(limited(n, fraction, lim) for n, lim in cache[0] if n)

    return estimate


def _reads(cfg: Any) -> bool:
    """The evaluator scores examples (``cost`` measures the model, it reads none)."""
    return getattr(cfg, "name", None) != "cost"


def _rows(cfg: Any, split: str | None) -> int | None:
    """Non-blank lines of the evaluator's data at ``split``; ``None``: not a local file (an
    lm_eval task) or not there any more."""
    data = getattr(cfg, "data", None)
    if data is None or split is None:
        return None
    p = Path(data)
    path = p / f"{split}.jsonl" if p.is_dir() else p
    try:
        with open(path, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return None
