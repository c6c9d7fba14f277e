"""The IPOP-CMA-ES sampler's state in the study: plain JSON, never an unasked-for pickle.

A :class:`RunState` (one CMA-ES run: its optimizer, best value, stall count, restart history) is
stored after every generation as a JSON record split into chunks of trial system attributes
(:func:`save_state`); :func:`optimizer_state` / :func:`set_optimizer_state` carry a ``cmaes``
optimizer through it exactly. A state pickled by an older evomerge is read only with
``EVOMERGE_TRUST_PICKLED_STATE=1`` (:func:`unpickle_state`).
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
from optuna.trial import FrozenTrial

STATE_KEY = "evomerge:cma:json"
PICKLED_KEY = "evomerge:cma:state"  # what evomerge stored before: a pickled RunState, in hex
TRUST_PICKLED_ENV = "EVOMERGE_TRUST_PICKLED_STATE"
FORMAT = 1
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
KINDS = {"CMA": cmaes.CMA, "SepCMA": cmaes.SepCMA}


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

def save_state(
    study: optuna.Study, trial: FrozenTrial, state: RunState, *, key: str = STATE_KEY
) -> None:
    """Store ``state`` on ``trial`` as a JSON record in chunks under ``key``; the chunk count
    goes last, so a half-written record is never read."""
    record = {
        "format": FORMAT, "run": state.run, "best": _plain(state.best), "stall": state.stall,
        "history": [list(h) for h in state.history],
        "optimizer": optimizer_state(state.optimizer),
    }
    text = json.dumps(record, allow_nan=False, separators=(",", ":"))
    chunks = [text[i : i + _CHUNK] for i in range(0, len(text), _CHUNK)]
    storage = study._storage
    for i, chunk in enumerate(chunks):
        storage.set_trial_system_attr(trial._trial_id, f"{key}:{i}", chunk)
    storage.set_trial_system_attr(trial._trial_id, key, len(chunks))


def joined(attrs: dict[str, Any], key: str) -> str:
    return "".join(attrs[f"{key}:{i}"] for i in range(int(attrs[key])))


def unpickle_state(blob: str, study: optuna.Study, number: int) -> RunState:
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
    """Reads states pickled while ``RunState`` lived in ``evomerge.cma_restarts`` (the flat
    package before issue 11)."""

    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(__name__ if module == "evomerge.cma_restarts" else module, name)
