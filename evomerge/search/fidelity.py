"""Multi-fidelity: successive halving on the fraction of evaluation examples, and the
confirmation of subset estimates on the whole fitness split.

Single-objective studies use Optuna's ``SuccessiveHalvingPruner`` through ``trial.report`` /
``trial.should_prune``; rung ``r`` is reported at step ``reduction_factor ** r`` so every rung
is one of the pruner's promotion points. Multi-objective studies cannot use pruners, so
:func:`promote_multi` keeps a candidate when it is among the best ``1/reduction_factor`` of its
rung by Pareto dominance count.

``search.fidelity.subset.confirm: K``: the best of many noisy subset estimates is biased
upward, so after the last trial :func:`confirm_phase` re-scores the top K trials by estimate
(distinct recipes) on the whole fitness split. Each re-score is a plain trial added to the
study (``user_attrs["confirm_of"]``: the trial it re-scored), so its examples are search cost
and every reader sees it. It is added once scored, never left RUNNING, so a killed driver
loses only the re-scores in flight and a resumed run scores those still missing
(:func:`to_confirm`). Once a study has a completed confirmation, only trials scored on the
whole fitness split compete for best (:func:`contenders`: the rule every reader of "the best
trial" applies).
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from evomerge.search.anchors import ON_SUBSET_ATTR
from evomerge.search.study import CONFIRM_ATTR


def rung_step(rung: int, reduction_factor: int) -> int:
    return int(reduction_factor**rung)


def dominates(a: Sequence[float], b: Sequence[float], signs: Sequence[int]) -> bool:
    """``a`` dominates ``b``; ``signs`` is +1 to maximise, -1 to minimise, per objective."""
    ge = all(s * x >= s * y for x, y, s in zip(a, b, signs, strict=True))
    gt = any(s * x > s * y for x, y, s in zip(a, b, signs, strict=True))
    return ge and gt


def promote_multi(
    values: Sequence[float],
    seen: Sequence[Sequence[float]],
    signs: Sequence[int],
    reduction_factor: int,
) -> bool:
    """Promote when fewer than ``len(seen) / reduction_factor`` earlier results dominate it."""
    if len(seen) < reduction_factor:
        return True
    beaten_by = sum(dominates(other, values, signs) for other in seen)
    return beaten_by < math.ceil(len(seen) / reduction_factor)


# -- which trials compete for best ---------------------------------------------------------
def competes(attrs: Mapping[str, Any], confirmed: bool) -> bool:
    """Whether a COMPLETE trial with user attrs ``attrs`` competes for best: every one does
    until the study has a completed confirmation (``confirmed``); from then on a trial scored
    on the subset competes through its confirmation only (its estimate is not comparable with
    a full score)."""
    return not confirmed or ON_SUBSET_ATTR not in attrs


def contenders(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """The COMPLETE trials that compete for best (:func:`competes`), in the order given.

    >>> from optuna.trial import create_trial
    >>> est = create_trial(value=0.9, user_attrs={"fitness_subset": "random"})
    >>> full = create_trial(value=0.7, user_attrs={"confirm_of": 0})
    >>> [t.value for t in contenders([est])], [t.value for t in contenders([est, full])]
    ([0.9], [0.7])
    """
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    confirmed = any(CONFIRM_ATTR in t.user_attrs for t in done)
    return [t for t in done if competes(t.user_attrs, confirmed)]


def best_contender(trials: Iterable[FrozenTrial], maximize: bool) -> FrozenTrial | None:
    """The best of :func:`contenders` by the first objective (ties: the lower trial number)."""
    found = contenders(trials)
    if not found:
        return None
    sign = 1.0 if maximize else -1.0
    return max(found, key=lambda t: (sign * t.values[0], -t.number))


def confirm_k(job: Any) -> int:
    """``search.fidelity.subset.confirm`` of a (phase) job; 0 without a subset."""
    fid = job.search.fidelity
    return 0 if fid is None or fid.subset is None else fid.subset.confirm


def _recipe_key(t: FrozenTrial) -> str:
    return json.dumps(t.user_attrs.get("recipe", t.params), sort_keys=True)


def to_confirm(trials: Iterable[FrozenTrial], k: int, *, maximize: bool) -> list[FrozenTrial]:
    """The top ``k`` COMPLETE trials scored on the subset, by estimate (ties: the lower trial
    number), one per distinct recipe, less those whose recipe has a COMPLETE confirmation."""
    trials = list(trials)
    done = {_recipe_key(t) for t in trials
            if t.state == TrialState.COMPLETE and CONFIRM_ATTR in t.user_attrs}
    sign = -1.0 if maximize else 1.0
    ranked = sorted((t for t in trials if t.state == TrialState.COMPLETE
                     and ON_SUBSET_ATTR in t.user_attrs), key=lambda t: (sign * t.values[0],
                                                                         t.number))
    top: dict[str, FrozenTrial] = {}
    for t in ranked:
        if len(top) == k:
            break
        top.setdefault(_recipe_key(t), t)
    return [t for key, t in top.items() if key not in done]


# -- the phase ------------------------------------------------------------------------------
def confirm_phase(job: Any, study: Any, pool: Any, on_progress: Any = None) -> list[int]:
    """Re-score :func:`to_confirm`'s trials on the whole fitness split (one worker call each,
    no subset) and add each as a trial (COMPLETE with the full score, or FAIL with the error,
    which a resumed run retries); return the numbers of the trials re-scored. The step's last
    progress line names the best contender."""
    from evomerge.recipe import Recipe
    from evomerge.search.progress import Step

    maximize = study.directions[0].name == "MAXIMIZE"
    todo = to_confirm(study.get_trials(deepcopy=False), confirm_k(job), maximize=maximize)
    if not todo:
        return []
    calls = [(t, "evaluate", (Recipe.from_dict(t.user_attrs["recipe"]).to_json(), 1.0))
             for t in todo]
    step = Step("confirm", len(calls), on_progress)
    for i, (t, result, error) in enumerate(pool.as_completed(calls), 1):
        study.add_trial(confirmation(job, t, result, error))
        step.advance(note=best_line(study, maximize) if i == len(calls) else "")
    return [t.number for t in todo]


def confirmation(job: Any, of: FrozenTrial, result: Mapping[str, Any] | None,
                 error: str | None) -> FrozenTrial:
    """The trial that records ``of``'s re-score: its parameters and recipe, the full-split
    metrics and objective values (FAIL with ``error`` when there are none)."""
    from evomerge.search.objectives import objective_values
    from evomerge.search.study import json_metrics

    now = datetime.datetime.now()
    attrs: dict[str, Any] = {CONFIRM_ATTR: of.number, "fidelity": "full",
                             "recipe": of.user_attrs["recipe"]}
    values = None
    start = now
    if result is not None:
        metrics, nonfinite = json_metrics(result["metrics"])
        attrs["metrics"] = metrics
        if nonfinite:
            attrs["nonfinite_metrics"] = nonfinite
        start = datetime.datetime.fromtimestamp(result.get("started", now.timestamp()))
        attrs["timing"] = {"merge_s": result["merge_s"], "eval_s": result["eval_s"],
                           "wall_s": (now - start).total_seconds(), "pid": result.get("pid"),
                           "rss_mb": result.get("rss_mb"),
                           "peak_rss_mb": result.get("peak_rss_mb")}
        try:
            values = objective_values(job.objectives, result["metrics"])
        except (KeyError, ValueError) as err:
            error = f"{type(err).__name__}: {err}"
    if error is not None:
        attrs["error"] = error
    return FrozenTrial(
        number=-1, trial_id=-1, state=TrialState.FAIL if error else TrialState.COMPLETE,
        value=None, values=None if error else values, datetime_start=start,
        datetime_complete=now, params=dict(of.params), distributions=dict(of.distributions),
        user_attrs=attrs, system_attrs={}, intermediate_values={},
    )


def best_line(study: Any, maximize: bool) -> str:
    """``best trial 70 (confirms 12): 0.7712 on the whole fitness split (estimate 0.8125)``."""
    best = best_contender(study.get_trials(deepcopy=False), maximize)
    if best is None:
        return ""
    of = best.user_attrs.get(CONFIRM_ATTR)
    if of is None:
        return f"best trial {best.number}: {best.values[0]:.4g} on the whole fitness split"
    est = {t.number: t for t in study.get_trials(deepcopy=False)}.get(of)
    tail = f" (estimate {est.values[0]:.4g})" if est is not None and est.values else ""
    return (f"best trial {best.number} (confirms {of}): {best.values[0]:.4g} on the whole "
            f"fitness split{tail}")
