"""``search.sampler.start: adamerging``: CMA-ES's first mean learned by AdaMerging.

Before the search the driver runs AdaMerging (:func:`evomerge.search.adamerging.adamerge_job`:
the job's ``adamerging`` settings, or their defaults, on the fitness data's unlabeled prompts)
and maps its coefficients into the search space (:func:`space_point`): a model's weight at a
layer group is the mean of its learned per-layer lambdas over the group's layers, at a schedule
knot their value at the knot's depth; ``all`` (``per_model: false``) takes the mean over the
models; density is AdaMerging++'s ``density`` when ``ties: true``; every other parameter keeps
the method's default. Values outside the search bounds are clipped, with a warning, and listed.
AdaMerging's ``theta_0 + sum_k lambda_k tau_k`` is exactly task arithmetic with ``lambda: 1``
and TIES with ``normalize: false``; for other methods the point is the same weights read by that
method (e.g. TIES' default ``normalize: true`` divides by their sum).

The point is stored in the study attribute :data:`START_ATTR` with what produced it, so a
resumed driver reads it instead of running AdaMerging again, and it is enqueued as a trial
(``baseline: adamerging``) so its fitness is known.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import optuna
from optuna.distributions import FloatDistribution

from evomerge.search.coarse import parse_name

START_ATTR = "evomerge:start"
WHERE = "search.sampler.start"


def check_start(job: Any) -> None:
    """Refuse, before any start-up, a job whose start cannot be AdaMerging's."""
    from evomerge.merge.methods_spec import METHODS

    space = job.search.space
    if space.name != "parameter":
        raise ValueError(f"{WHERE}: adamerging learns task-arithmetic coefficients of a "
                         f"parameter space, search.space.name is {space.name}; use center")
    if job.models.base is None:
        raise ValueError(f"{WHERE}: adamerging merges task vectors into models.base; set it, "
                         "or use start: center or uniform")
    if "weight" not in METHODS[space.method].model_params:
        raise ValueError(f"{WHERE}: adamerging learns per-model weights and method "
                         f"{space.method!r} has none; use start: center or uniform")


def space_point(
    lambdas: dict[str, tuple[float, ...]],
    dists: dict[str, FloatDistribution],
    defaults: dict[str, float],
    *,
    num_layers: int,
    weight: str = "w",
    density: tuple[str, float] | None = None,
) -> dict[str, float]:
    """AdaMerging's ``lambdas`` (per model: one value, or one per layer) as a point of the space
    ``dists`` (not clipped); ``weight`` is the weight's name prefix, ``density`` a
    ``(prefix, value)`` for AdaMerging++."""
    layers = {m: np.broadcast_to(np.asarray(v, dtype=float), num_layers) for m, v in
              lambdas.items()}
    points = len({parse_name(n)[1] for n in dists})
    out = {}
    for name in dists:
        key, point, _ = parse_name(name)
        prefix, _, owner = key.partition("/")
        if prefix == weight and owner:
            lam = np.mean(list(layers.values()), axis=0) if owner == "all" else layers[owner]
            out[name] = _at(lam, point, points)
        elif density is not None and prefix == density[0] and owner:
            out[name] = density[1]
        else:
            out[name] = defaults[name]
    return out


def _at(per_layer: np.ndarray, point: str, points: int) -> float:
    """The value at a layer group (mean over its layers) or a schedule knot (at its depth)."""
    n = len(per_layer)
    if point.startswith("k"):
        depth = int(point[1:]) * (n - 1) / max(points - 1, 1)
        return float(np.interp(depth, np.arange(n), per_layer))
    group = int(point)
    return float(np.mean([per_layer[i] for i in range(n) if i * points // n == group]))


def clipped(point: dict[str, float], dists: dict[str, FloatDistribution]) -> dict[str, float]:
    """The values of ``point`` outside their bounds (name -> value before clipping)."""
    return {n: v for n, v in point.items() if not dists[n].low <= v <= dists[n].high}


def adamerging_start(job: Any, study: optuna.Study, space: Any) -> dict[str, float]:
    """The stored AdaMerging start of ``study``, or AdaMerging run now and stored."""
    dists = space.distributions()
    stored = study.user_attrs.get(START_ATTR)
    if stored is not None:
        if stored.get("source") != "adamerging" or set(stored["params"]) != set(dists):
            raise ValueError(f"study attribute {START_ATTR!r} is not an AdaMerging start of "
                             "this search space; resume with the same job, or start a new study")
        return dict(stored["params"])
    from evomerge.config import AdaMergingConfig
    from evomerge.search.adamerging import adamerge_job

    t0 = time.perf_counter()
    cfg = job.adamerging or AdaMergingConfig.model_validate({})
    result = adamerge_job(job, progress=False, labeled=False)
    spec = space.spec.model_params
    prefix = {p: spec[p].short or p for p in ("weight", "density") if p in spec}
    raw = space_point(
        result.lambdas, dists, space.encode(space.default()),
        num_layers=result.model.config.num_hidden_layers, weight=prefix["weight"],
        density=(prefix["density"], cfg.density) if cfg.ties and "density" in prefix else None,
    )
    out = clipped(raw, dists)
    point = space.clip(raw)
    if out:
        shown = ", ".join(f"{n} {v:.3g} -> {point[n]:.3g}" for n, v in list(out.items())[:4])
        warnings.warn(f"{WHERE}: adamerging: {len(out)} of {len(raw)} values clipped to the "
                      f"search bounds ({shown}{', ...' if len(out) > 4 else ''})", stacklevel=2)
    history = result.history
    study.set_user_attr(START_ATTR, {
        "source": "adamerging", "params": point, "clipped": out, "seconds": time.perf_counter()
        - t0, "lambdas": {m: list(v) for m, v in result.lambdas.items()},
        "config": cfg.model_dump(), "entropy": [history[0]["entropy"], history[-1]["entropy"]],
    })
    return point
