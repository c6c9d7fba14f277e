"""CMA-ES with IPOP restarts (Auger and Hansen, 2005) as an Optuna sampler.

Optuna 5 ignores ``CmaEsSampler(restart_strategy=...)``, so ``sampler: {name: cmaes, restarts: N}``
is served by this sampler, which drives the ``cmaes`` library directly. A run of CMA-ES ends when
``cmaes`` reports convergence (``should_stop``) or when the run's best value has not improved for
``patience`` generations (accuracy-like metrics go flat long before CMA-ES's own tolerances);
the first run starts at ``x0`` (or the middle of the bounds), each next one from a uniformly
random mean with the first ``sigma0`` and a population ``inc_popsize`` times larger, up to
``restarts`` times.

Parameters are searched in the unit cube (each distribution's ``[low, high]`` mapped to
``[0, 1]``, on a log scale where the distribution is log). The state after every generation is
stored as plain JSON in the asking trial's system attributes, so a resumed driver continues the
same run, generation and population size and asks exactly what an uninterrupted one would have.
It is JSON, not a pickle, because anyone who can write to a shared study could otherwise run code
in every driver that resumes it; a pickled state from an older evomerge is loaded only with
``EVOMERGE_TRUST_PICKLED_STATE=1``. A trial belongs to the generation named by its
``evomerge:cma:gen`` attribute (``[run, generation]``); completed trials of the current generation
are told once there are ``popsize`` of them (later ones of the same generation are ignored, as in
Optuna's CMA-ES).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from evomerge.search.cma_state import (
    FORMAT,
    KINDS,
    PICKLED_KEY,
    STATE_KEY,
    RunState,
    joined,
    save_state,
    set_optimizer_state,
    unpickle_state,
)

GEN_KEY = "evomerge:cma:gen"


def to_unit(value: float, dist: FloatDistribution) -> float:
    """``value`` of ``dist`` mapped to ``[0, 1]`` (log-scaled where ``dist.log``); a bound with
    ``low == high`` (a pinned parameter) maps to the middle."""
    if dist.single():
        return 0.5
    if dist.log:
        return (math.log(value) - math.log(dist.low)) / (math.log(dist.high) - math.log(dist.low))
    return (value - dist.low) / (dist.high - dist.low)


def from_unit(u: float, dist: FloatDistribution) -> float:
    """Inverse of :func:`to_unit`, clipped to the distribution's bounds."""
    u = float(u)
    if u <= 0.0 or u >= 1.0:
        return dist.low if u <= 0.0 else dist.high
    if dist.log:
        value = math.exp(math.log(dist.low) + u * (math.log(dist.high) - math.log(dist.low)))
    else:
        value = dist.low + u * (dist.high - dist.low)
    return min(max(value, dist.low), dist.high)


class RelativeSampler(optuna.samplers.BaseSampler):
    """A sampler of the whole fixed space at once: a parameter outside it (none in a search;
    Optuna asks only if a trial adds one) is drawn by ``self._fallback``, a seeded random
    sampler."""

    _fallback: optuna.samplers.RandomSampler

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    def reseed_rng(self) -> None:
        self._fallback.reseed_rng()


class IpopCmaSampler(RelativeSampler):
    """CMA-ES (full or separable) restarted with growing populations; single-objective."""

    def __init__(
        self,
        space: dict[str, FloatDistribution],
        *,
        sigma0: float | None = None,
        popsize: int | None = None,
        separable: bool = False,
        seed: int = 0,
        restarts: int = 1,
        inc_popsize: int = 2,
        patience: int = 10,
        x0: dict[str, float] | None = None,
        key: str = "evomerge:cma",
    ) -> None:
        if not space:
            raise ValueError("IpopCmaSampler needs a non-empty search space")
        self._space = dict(sorted(space.items()))
        self._sigma0 = sigma0 if sigma0 is not None else 1 / 6
        self._popsize = popsize
        self._separable = separable
        self._seed = seed
        self._restarts = restarts
        self._inc = inc_popsize
        self._patience = patience
        self._x0 = x0
        # where the generation and the state live in trial system attributes: two samplers of
        # one study (coarse to fine) keep theirs apart
        self._gen_key, self._state_key = f"{key}:gen", f"{key}:json"
        self._state: RunState | None = None
        self._fallback = optuna.samplers.RandomSampler(seed=seed)

    # -- optuna sampler API ------------------------------------------------------------------
    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return dict(self._space)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if len(study.directions) != 1:
            raise ValueError("cmaes is single-objective; use nsga2 or tpe for several objectives")
        state = self._state or self._restore(study) or self._new_run(0, self._popsize)
        opt = state.optimizer
        key = [state.run, opt.generation]
        done = [
            t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.system_attrs.get(self._gen_key) == key
        ]
        if len(done) >= opt.population_size:
            state = self._tell(state, done[: opt.population_size], study.direction)
            self._save(study, trial, state)
        self._state = state
        opt = state.optimizer
        storage = study._storage  # samplers record their bookkeeping as system attributes
        storage.set_trial_system_attr(trial._trial_id, self._gen_key, [state.run, opt.generation])
        opt.reseed_rng((self._seed * 100_003 + trial.number) % 2**31)  # resumes never repeat asks
        x = opt.ask()
        return {n: from_unit(u, d) for (n, d), u in zip(self._space.items(), x, strict=True)}

    # -- runs ----------------------------------------------------------------------------------
    @property
    def state(self) -> RunState | None:
        """The current run (``None`` before the first sample)."""
        return self._state

    def _new_run(self, run: int, popsize: int | None) -> RunState:
        dim = len(self._space)
        rng = np.random.RandomState(self._seed + 7919 * run)
        if run > 0:
            mean = rng.uniform(0.0, 1.0, dim)
        elif self._x0 is not None:
            mean = np.array([to_unit(self._x0[n], d) for n, d in self._space.items()])
        else:
            mean = np.full(dim, 0.5)
        kind = "SepCMA" if self._separable and dim > 1 else "CMA"
        opt = self._optimizer(kind, mean, run, popsize)
        return RunState(run=run, optimizer=opt, history=[(run, opt.population_size)])

    def _optimizer(self, kind: str, mean: np.ndarray, run: int, popsize: int | None) -> Any:
        bounds = np.tile([0.0, 1.0], (len(mean), 1))
        return KINDS[kind](mean=mean, sigma=self._sigma0, bounds=bounds, seed=self._seed + run,
                            population_size=popsize)

    def _tell(self, state: RunState, trials: list[FrozenTrial], direction: Any) -> RunState:
        sign = 1.0 if direction == StudyDirection.MINIMIZE else -1.0
        solutions = []
        for t in trials:
            value = sign * float(t.value)  # type: ignore[arg-type]
            solutions.append((np.clip(self.point(t), 0.0, 1.0), value))
        state.optimizer.tell(solutions)
        gen_best = min(v for _, v in solutions)
        if gen_best < state.best - 1e-12:
            state.best, state.stall = gen_best, 0
        else:
            state.stall += 1
        ended = state.optimizer.should_stop() or state.stall >= self._patience
        if not ended or state.run >= self._restarts:
            return state
        popsize = state.optimizer.population_size * self._inc
        new = self._new_run(state.run + 1, popsize)
        new.history = [*state.history, (new.run, popsize)]
        return new

    def point(self, trial: FrozenTrial) -> np.ndarray:
        """``trial``'s parameters in the unit cube, in this sampler's order."""
        return np.array([to_unit(trial.params[n], d) for n, d in self._space.items()])

    # -- persistence ---------------------------------------------------------------------------
    def _save(self, study: optuna.Study, trial: FrozenTrial, state: RunState) -> None:
        save_state(study, trial, state, key=self._state_key)

    def _restore(self, study: optuna.Study) -> RunState | None:
        """The latest saved run state in ``study`` (a resumed driver continues it)."""
        key = self._state_key
        for t in reversed(study.get_trials(deepcopy=False)):
            if key in t.system_attrs:
                return self._load(json.loads(joined(t.system_attrs, key)), t.number)
            if key == STATE_KEY and PICKLED_KEY in t.system_attrs:
                return unpickle_state(joined(t.system_attrs, PICKLED_KEY), study, t.number)
        return None

    def _load(self, record: dict[str, Any], number: int) -> RunState:
        saved = record.get("optimizer", {})
        where = f"CMA-ES state {self._state_key!r} of trial {number}"
        if record.get("format") != FORMAT or saved.get("kind") not in KINDS:
            raise ValueError(f"{where} is not CMA/SepCMA in format {FORMAT}; start a new study")
        if len(saved.get("mean", [])) != len(self._space):
            raise ValueError(f"{where} has {len(saved.get('mean', []))} parameters, the search "
                             f"space {len(self._space)}; resume with the same search space")
        run = int(record["run"])
        opt = self._optimizer(saved["kind"], np.full(len(self._space), 0.5), run, saved["popsize"])
        set_optimizer_state(opt, saved)
        return RunState(run=run, optimizer=opt, best=float(record["best"]),
                        stall=int(record["stall"]), history=[tuple(h) for h in record["history"]])
