"""Coarse to fine in one study: CMA-ES per model first, then per layer from the coarse winner.

``search.sampler: {name: cmaes, coarse: {trials: N, sigma0: 0.25}}``. The first ``N`` trials
the sampler asks search one value per model and parameter: every layer group, schedule knot and
module kind of ``w/{model}`` shares it (:func:`coarse_groups` derives that per-model space from
the fine space's parameter names). Each coarse trial is written to the study as a full
fine-space point, so every trial has the same distributions and results, export and resume need
nothing new. Then CMA-ES runs over the whole space, its first mean at the coarse winner: the
best completed trial that lies in the coarse space (coarse trials, and the baselines, which are
per-model points too), with the fine ``sigma0`` (smaller than the coarse one).

Both phases run the ``cmaes`` library through :class:`~evomerge.search.cma_restarts.
IpopCmaSampler` (the fine phase honours ``restarts``), each with its own JSON state in trial
system attributes. Every sampled trial carries its phase (:data:`PHASE_KEY`); the fine start
and the trial it came from are a study user attribute (:data:`START_ATTR`). A resumed driver
counts the coarse trials asked so far, restores the coarse CMA-ES from its stored state and, once
the start is stored, the fine one: nothing is asked twice and nothing is pickled. Enqueued
trials (baselines, re-runs of interrupted trials) never reach a sampler (Optuna asks the sampler
only for parameters not fixed), so they do not count toward ``N``; trials asked ahead do.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from evomerge.search.cma_restarts import IpopCmaSampler, RelativeSampler, from_unit, to_unit

PHASE_KEY = "evomerge:coarse:phase"  # trial system attribute: "coarse" or "fine"
START_ATTR = "evomerge:coarse:fine_start"  # study user attribute: {trial, params}
COARSE_STATE = "evomerge:coarse:cma"  # the coarse CMA-ES's attribute prefix
KIND_NAMES = ("attention", "mlp", "default")
_POINT = re.compile(r"\d+|k\d+")  # a layer group or a schedule knot


def parse_name(name: str) -> tuple[str, str, str]:
    """``(coarse key, point, kind)`` of a parameter-space name: ``w/shift/3/mlp`` ->
    ``("w/shift", "3", "mlp")``, ``lambda/k1`` -> ``("lambda", "k1", "")``."""
    parts = name.split("/")
    kind = parts.pop() if len(parts) > 2 and parts[-1] in KIND_NAMES else ""
    if len(parts) < 2 or not _POINT.fullmatch(parts[-1]):
        raise ValueError(f"parameter {name!r} has no layer-group or knot part")
    return "/".join(parts[:-1]), parts[-1], kind


def coarse_groups(space: dict[str, FloatDistribution]) -> dict[str, list[str]]:
    """Coarse parameter -> the fine parameters that share its value (all of a model's layer
    groups, knots and kinds for one method parameter). Refuses a space with nothing to refine."""
    where = "search.sampler.coarse"
    if any(name.startswith("dfs/") for name in space):
        raise ValueError(f"{where}: coarse to fine refines per-model coefficients over layers; "
                         "search.space.name is dfs: drop coarse")
    groups: dict[str, list[str]] = {}
    for name in sorted(space):
        try:
            key = parse_name(name)[0]
        except ValueError as err:
            raise ValueError(f"{where}: {err}; coarse to fine needs a parameter space") from None
        groups.setdefault(key, []).append(name)
    for key, names in groups.items():
        if len({(space[n].low, space[n].high, space[n].log) for n in names}) > 1:
            raise ValueError(f"{where}: the parameters of {key!r} have different bounds")
    if len(groups) == len(space):
        raise ValueError(
            f"{where}: the space has no per-layer structure to refine (one value per model and "
            "parameter already: layer_groups 1, no schedule, no module_kinds); set "
            "search.space.layer_groups > 1 or a schedule, or drop coarse"
        )
    return groups


def to_coarse(point: dict[str, float], space: dict[str, FloatDistribution],
              groups: dict[str, list[str]]) -> dict[str, float]:
    """A fine point projected on the coarse space: each group's mean in unit coordinates."""
    out = {}
    for key, names in groups.items():
        d = space[names[0]]
        out[key] = from_unit(float(np.mean([to_unit(point[n], d) for n in names])), d)
    return out


def is_coarse(params: dict[str, Any], groups: dict[str, list[str]]) -> bool:
    """Whether ``params`` give every fine parameter of a group the same value."""
    try:
        return all(len({params[n] for n in names}) == 1 for names in groups.values())
    except KeyError:
        return False


class _CoarseCma(IpopCmaSampler):
    """CMA-ES over the coarse parameters; reads a trial's point from its fine parameters."""

    def __init__(self, groups: dict[str, list[str]], space: dict[str, FloatDistribution],
                 **kw: Any) -> None:
        super().__init__({k: space[names[0]] for k, names in groups.items()}, **kw)
        self._groups = groups

    def point(self, trial: FrozenTrial) -> np.ndarray:
        return np.array([to_unit(trial.params[self._groups[k][0]], d)
                         for k, d in self._space.items()])


class CoarseToFineSampler(RelativeSampler):
    """``trials`` coarse (per-model) CMA-ES trials, then CMA-ES over ``space`` from the best
    coarse point; single-objective.

    ``x0`` (a point of ``space``, e.g. the uniform merge) is projected on the coarse space as its
    first mean; ``fine`` holds :class:`IpopCmaSampler`'s keywords for the fine phase.
    """

    def __init__(
        self,
        space: dict[str, FloatDistribution],
        *,
        trials: int,
        sigma0: float,
        popsize: int | None = None,
        seed: int = 0,
        x0: dict[str, float] | None = None,
        fine: dict[str, Any] | None = None,
    ) -> None:
        self._space = dict(sorted(space.items()))
        self._groups = coarse_groups(self._space)
        start = to_coarse(x0, self._space, self._groups) if x0 is not None else None
        self._coarse = _CoarseCma(self._groups, self._space, sigma0=sigma0, popsize=popsize,
                                  seed=seed, restarts=0, x0=start, key=COARSE_STATE)
        self._trials = trials
        self._seed = seed
        self._fine_kw = dict(fine or {})
        self._fine: IpopCmaSampler | None = None
        self._fallback = optuna.samplers.RandomSampler(seed=seed)

    @property
    def fine(self) -> IpopCmaSampler | None:
        """The fine phase's sampler (``None`` before the switch)."""
        return self._fine

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return dict(self._space)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if len(study.directions) != 1:
            raise ValueError("cmaes is single-objective; use nsga2 or tpe for several objectives")
        storage = study._storage  # samplers record their bookkeeping as system attributes
        if self._fine is None:
            self._fine = self._restore_fine(study)
        if self._fine is None and self._coarse_asked(study) < self._trials:
            storage.set_trial_system_attr(trial._trial_id, PHASE_KEY, "coarse")
            values = self._coarse.sample_relative(study, trial, dict(self._coarse._space))
            return {n: values[k] for k, names in self._groups.items() for n in names}
        if self._fine is None:
            self._fine = self._start_fine(study)
        storage.set_trial_system_attr(trial._trial_id, PHASE_KEY, "fine")
        return self._fine.sample_relative(study, trial, dict(self._space))

    # -- the switch --------------------------------------------------------------------------
    def _coarse_asked(self, study: optuna.Study) -> int:
        return sum(1 for t in study.get_trials(deepcopy=False)
                   if t.system_attrs.get(PHASE_KEY) == "coarse")

    def winner(self, study: optuna.Study) -> FrozenTrial | None:
        """The best completed trial in the coarse space (coarse trials and baselines)."""
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if is_coarse(t.params, self._groups)]
        if not done:
            return None
        sign = -1.0 if study.direction == StudyDirection.MINIMIZE else 1.0
        return max(done, key=lambda t: (sign * float(t.value), -t.number))  # type: ignore[arg-type]

    def _start_fine(self, study: optuna.Study) -> IpopCmaSampler:
        """The fine sampler from the coarse winner (or, if none has completed yet, the coarse
        CMA-ES's mean); the start is stored so a resumed driver starts from the same point."""
        best = self.winner(study)
        if best is not None:
            x0 = {n: float(best.params[n]) for n in self._space}
        else:
            state = self._coarse.state
            mean = state.optimizer.mean if state is not None else np.full(len(self._groups), 0.5)
            x0 = {n: from_unit(float(u), self._space[n])
                  for (k, names), u in zip(self._groups.items(), mean, strict=True)
                  for n in names}
        number = None if best is None else best.number
        study.set_user_attr(START_ATTR, {"trial": number, "params": x0,
                                         "coarse_trials": self._trials})
        return self._fine_sampler(x0)

    def _restore_fine(self, study: optuna.Study) -> IpopCmaSampler | None:
        record = study.user_attrs.get(START_ATTR)
        if record is None:
            return None
        x0 = record["params"]
        if set(x0) != set(self._space):
            raise ValueError(f"study attribute {START_ATTR!r} has parameters {sorted(x0)}, the "
                             f"space {sorted(self._space)}; resume with the same search space")
        return self._fine_sampler(x0)

    def _fine_sampler(self, x0: dict[str, float]) -> IpopCmaSampler:
        return IpopCmaSampler(self._space, seed=self._seed, x0=x0, **self._fine_kw)
