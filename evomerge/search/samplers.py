"""Optuna samplers by name, built from the sampler config (see :mod:`evomerge.config`)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import optuna
from optuna.distributions import FloatDistribution

from evomerge.config import (
    CmaesConfig,
    GpConfig,
    GridConfig,
    Nsga2Config,
    RandomConfig,
    TpeConfig,
)


def make_cmaes(
    cfg: CmaesConfig,
    space: dict[str, FloatDistribution],
    start: dict[str, float] | None = None,
) -> optuna.samplers.BaseSampler:
    """CMA-ES; its first mean is the middle of the bounds, or with ``cfg.start`` ``uniform`` or
    ``adamerging`` the point ``start`` (the driver passes the uniform-merge baseline, or the
    AdaMerging point once it is known). ``cfg.coarse``: coarse to fine
    (:mod:`evomerge.search.coarse`)."""
    x0 = dict(start) if start is not None and cfg.start != "center" else None
    if x0 is not None and set(x0) != set(space):
        raise ValueError(
            f"cmaes start has parameters {sorted(x0)}, the space has {sorted(space)}"
        )
    if cfg.coarse is not None:
        from evomerge.search.coarse import CoarseToFineSampler

        fine = {"sigma0": cfg.sigma0 or cfg.coarse.sigma0 / 2, "popsize": cfg.popsize,
                "separable": cfg.separable, "restarts": cfg.restarts,
                "inc_popsize": cfg.inc_popsize, "patience": cfg.restart_patience}
        return CoarseToFineSampler(space, trials=cfg.coarse.trials, sigma0=cfg.coarse.sigma0,
                                   popsize=cfg.coarse.popsize, seed=cfg.seed, x0=x0, fine=fine)
    if cfg.restarts:
        from evomerge.search.cma_restarts import IpopCmaSampler

        return IpopCmaSampler(
            space, sigma0=cfg.sigma0, popsize=cfg.popsize, separable=cfg.separable,
            seed=cfg.seed, restarts=cfg.restarts, inc_popsize=cfg.inc_popsize,
            patience=cfg.restart_patience, x0=x0,
        )
    with warnings.catch_warnings():  # separable CMA is flagged experimental, and is what we want
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)  # sigma0: deprecated, still honoured
        return _FixedSpaceCmaEs(
            space,
            x0=x0,
            sigma0=cfg.sigma0,
            popsize=cfg.popsize,
            use_separable_cma=cfg.separable,
            seed=cfg.seed,
            n_startup_trials=0,
            warn_independent_sampling=False,
        )


class _FixedSpaceCmaEs(optuna.samplers.CmaEsSampler):
    """Optuna's CMA-ES on the search space it is given.

    ``CmaEsSampler`` infers its space on every ask by comparing the distributions of every trial
    since the oldest running one (22 % of the driver's time at 128 workers); the driver's space
    is fixed, so it is passed in. ``cmaes`` is imported here, not inside the first ask.
    """

    def __init__(self, space: dict[str, FloatDistribution], **kwargs: Any) -> None:
        import cmaes  # noqa: F401

        super().__init__(**kwargs)
        self._fixed = {name: d for name, d in space.items() if not d.single()}

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return dict(self._fixed)


def make_nsga2(
    cfg: Nsga2Config, space: dict[str, FloatDistribution]
) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(population_size=cfg.population_size, seed=cfg.seed)


def make_tpe(cfg: TpeConfig, space: dict[str, FloatDistribution]) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            n_startup_trials=cfg.n_startup_trials, seed=cfg.seed, multivariate=True
        )


def make_gp(cfg: GpConfig, space: dict[str, FloatDistribution]) -> optuna.samplers.BaseSampler:
    """Optuna's GP sampler (needs scipy and torch). Its asks cost more as trials grow (see the
    README's sampler reference); running trials enter its batch acquisition (qLogEI)."""
    try:
        import scipy  # noqa: F401  (GPSampler imports it inside its first ask)
    except ImportError:
        raise ValueError("search.sampler.name: gp needs scipy, which is not installed; "
                         "pip install scipy, or use another sampler") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.GPSampler(
            n_startup_trials=cfg.n_startup_trials, seed=cfg.seed,
            deterministic_objective=cfg.deterministic_objective,
            independent_sampler=optuna.samplers.RandomSampler(seed=cfg.seed),
            warn_independent_sampling=False,
        )


def make_random(
    cfg: RandomConfig, space: dict[str, FloatDistribution]
) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=cfg.seed)


def make_grid(cfg: GridConfig, space: dict[str, FloatDistribution]) -> optuna.samplers.BaseSampler:
    grid: dict[str, Any] = {}
    for name, d in space.items():
        pts = (
            np.geomspace(d.low, d.high, cfg.points)
            if d.log
            else np.linspace(d.low, d.high, cfg.points)
        )
        grid[name] = [float(x) for x in pts]
    size = math.prod(len(v) for v in grid.values())
    if size > 100_000:
        raise ValueError(
            f"grid sampler: {cfg.points} points over {len(space)} parameters is {size} "
            "candidates; "
            "lower search.sampler.points or search a smaller space (per_model: false, "
            "layer_groups: 1)"
        )
    return _AskTellGridSampler(grid, seed=cfg.seed)


class _AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler for an ask/tell driver.

    Optuna's ``after_trial`` calls ``study.stop()`` once the grid is used up, which raises
    outside ``study.optimize``. The driver stops at ``search.trials`` instead (set it to the
    grid size; past it the grid is revisited).
    """

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None


def make_sampler(
    cfg: Any, space: dict[str, FloatDistribution], start: dict[str, float] | None = None
) -> optuna.samplers.BaseSampler:
    """The sampler named by ``cfg.name``; ``start`` (a point of the space) seeds the samplers
    that take a starting point (CMA-ES)."""
    from evomerge.registries import SAMPLERS

    maker = SAMPLERS.get(cfg.name)
    if hasattr(cfg, "start"):
        return maker(cfg, space, start)  # type: ignore[no-any-return]
    return maker(cfg, space)  # type: ignore[no-any-return]
