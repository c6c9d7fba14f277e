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

import io
import json
import math
import os
import pickle
from dataclasses import dataclass, field
from typing import Any

import cmaes
import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

GEN_KEY = "evomerge:cma:gen"
STATE_KEY = "evomerge:cma:json"
PICKLED_KEY = "evomerge:cma:state"  # what evomerge stored before: a pickled RunState, in hex
TRUST_PICKLED_ENV = "EVOMERGE_TRUST_PICKLED_STATE"
_FORMAT = 1
_CHUNK = 2000  # system attribute values are stored as strings; keep each record small

# What a cmaes (0.13) optimizer changes after it is built, by stored name -> attribute. The rest
# (weights, learning rates, E||N(0, I)||, the length of the value history) follows from the kind,
# dimension and population size given to the constructor; ``_tolx`` is 1e-12 times the run's
# first sigma. CMA's ``should_stop`` caches the eigenbasis ``_B``/``_D`` and asks sample from that
# cache, so it is stored too: an eigendecomposition of the stored ``_C`` would differ in the last
# bits. The RNG state is not stored: every ask reseeds it (``reseed_rng``).
_OPTIMIZER_ATTRS = {
    "mean": "_mean", "sigma": "_sigma", "C": "_C", "B": "_B", "D": "_D", "p_sigma": "_p_sigma",
    "p_c": "_pc", "generation": "_g", "tolx": "_tolx", "funhist": "_funhist_values",
}
_KINDS = {"CMA": cmaes.CMA, "SepCMA": cmaes.SepCMA}


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


def _plain(value: Any) -> Any:
    """``value`` (a number, array or ``None``) as JSON; non-finite floats become ``"inf"``,
    ``"-inf"`` or ``"nan"``, which ``float`` and ``np.asarray(..., dtype=float)`` read back."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else repr(float(value))
    return value


def optimizer_state(opt: Any) -> dict[str, Any]:
    """What ``opt`` (a ``cmaes.CMA`` or ``cmaes.SepCMA``) has changed since it was built, as JSON
    values; :func:`set_optimizer_state` gives it back to a new one."""
    state: dict[str, Any] = {"kind": type(opt).__name__, "popsize": opt.population_size}
    for key, attr in _OPTIMIZER_ATTRS.items():
        if hasattr(opt, attr):
            state[key] = _plain(getattr(opt, attr))
    return state


def set_optimizer_state(opt: Any, state: dict[str, Any]) -> None:
    """Give ``opt``, just built with ``state``'s kind, dimension and population size, the rest of
    ``state``. ``cmaes`` has no public setter for a running optimizer's state, so this sets the
    attributes in which a running one differs from a new one (``_OPTIMIZER_ATTRS``); a test
    checks that every attribute of the restored optimizer then equals the original's."""
    missing = [k for k, attr in _OPTIMIZER_ATTRS.items() if hasattr(opt, attr) and k not in state]
    if missing:
        raise ValueError(f"CMA-ES state lacks {missing}")
    for key, attr in _OPTIMIZER_ATTRS.items():
        if not hasattr(opt, attr):
            continue  # SepCMA has no eigenbasis _B
        value = state[key]
        if key == "generation":
            value = int(value)
        elif key in ("sigma", "tolx"):
            value = float(value)
        elif value is not None:
            value = np.asarray(value, dtype=float)
        setattr(opt, attr, value)


@dataclass
class RunState:
    """One CMA-ES run: the optimizer and what decides when it ends."""

    run: int
    optimizer: Any
    best: float = math.inf  # minimisation inside; maximised values are negated
    stall: int = 0  # generations since ``best`` improved
    history: list[tuple[int, int]] = field(default_factory=list)  # (run, popsize) so far


class IpopCmaSampler(optuna.samplers.BaseSampler):
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
            if t.system_attrs.get(GEN_KEY) == key
        ]
        if len(done) >= opt.population_size:
            state = self._tell(state, done[: opt.population_size], study.direction)
            self._save(study, trial, state)
        self._state = state
        opt = state.optimizer
        storage = study._storage  # samplers record their bookkeeping as system attributes
        storage.set_trial_system_attr(trial._trial_id, GEN_KEY, [state.run, opt.generation])
        opt.reseed_rng((self._seed * 100_003 + trial.number) % 2**31)  # resumes never repeat asks
        x = opt.ask()
        return {n: from_unit(u, d) for (n, d), u in zip(self._space.items(), x, strict=True)}

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
        return _KINDS[kind](mean=mean, sigma=self._sigma0, bounds=bounds, seed=self._seed + run,
                            population_size=popsize)

    def _tell(self, state: RunState, trials: list[FrozenTrial], direction: Any) -> RunState:
        sign = 1.0 if direction == StudyDirection.MINIMIZE else -1.0
        solutions = []
        for t in trials:
            x = np.array([to_unit(t.params[n], d) for n, d in self._space.items()])
            solutions.append((np.clip(x, 0.0, 1.0), sign * float(t.value)))  # type: ignore[arg-type]
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

    # -- persistence ---------------------------------------------------------------------------
    def _save(self, study: optuna.Study, trial: FrozenTrial, state: RunState) -> None:
        record = {
            "format": _FORMAT, "run": state.run, "best": _plain(state.best), "stall": state.stall,
            "history": [list(h) for h in state.history],
            "optimizer": optimizer_state(state.optimizer),
        }
        text = json.dumps(record, allow_nan=False, separators=(",", ":"))
        chunks = [text[i : i + _CHUNK] for i in range(0, len(text), _CHUNK)]
        storage = study._storage
        for i, chunk in enumerate(chunks):
            storage.set_trial_system_attr(trial._trial_id, f"{STATE_KEY}:{i}", chunk)
        storage.set_trial_system_attr(trial._trial_id, STATE_KEY, len(chunks))  # written last

    def _restore(self, study: optuna.Study) -> RunState | None:
        """The latest saved run state in ``study`` (a resumed driver continues it)."""
        for t in reversed(study.get_trials(deepcopy=False)):
            if STATE_KEY in t.system_attrs:
                return self._load(json.loads(_joined(t.system_attrs, STATE_KEY)), t.number)
            if PICKLED_KEY in t.system_attrs:
                return _unpickle(_joined(t.system_attrs, PICKLED_KEY), study, t.number)
        return None

    def _load(self, record: dict[str, Any], number: int) -> RunState:
        saved = record.get("optimizer", {})
        where = f"CMA-ES state {STATE_KEY!r} of trial {number}"
        if record.get("format") != _FORMAT or saved.get("kind") not in _KINDS:
            raise ValueError(f"{where} is not CMA/SepCMA in format {_FORMAT}; start a new study")
        if len(saved.get("mean", [])) != len(self._space):
            raise ValueError(f"{where} has {len(saved.get('mean', []))} parameters, the search "
                             f"space {len(self._space)}; resume with the same search space")
        run = int(record["run"])
        opt = self._optimizer(saved["kind"], np.full(len(self._space), 0.5), run, saved["popsize"])
        set_optimizer_state(opt, saved)
        return RunState(run=run, optimizer=opt, best=float(record["best"]),
                        stall=int(record["stall"]), history=[tuple(h) for h in record["history"]])


def _joined(attrs: dict[str, Any], key: str) -> str:
    return "".join(attrs[f"{key}:{i}"] for i in range(int(attrs[key])))


def _unpickle(blob: str, study: optuna.Study, number: int) -> RunState:
    """A state pickled by an older evomerge, only where the user trusts the storage's writers."""
    if os.environ.get(TRUST_PICKLED_ENV) != "1":
        raise RuntimeError(
            f"study {study.study_name!r}: trial {number}'s system attribute {PICKLED_KEY!r} holds "
            "a pickled CMA-ES state (older evomerge), and unpickling runs whatever code its "
            f"writer put there; set {TRUST_PICKLED_ENV}=1 to load it if you trust everyone who "
            "can write to this storage (the next generation is then stored as JSON)"
        )
    state = _OldPathUnpickler(io.BytesIO(bytes.fromhex(blob))).load()
    if not isinstance(state, RunState):
        raise TypeError(f"trial {number}'s {PICKLED_KEY!r} is a {type(state).__name__}, "
                        "not a CMA-ES RunState")
    return state


class _OldPathUnpickler(pickle.Unpickler):
    """Reads states pickled while this module was ``evomerge.cma_restarts`` (a flat package)."""

    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(__name__ if module == "evomerge.cma_restarts" else module, name)
