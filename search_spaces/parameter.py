"""Parameter space (PS): per-model / per-layer-group / per-module-kind coefficients of a method.

Stable parameter names: ``{p}/{model}/{group}`` (plus ``/{kind}`` with module kinds), where
``p`` is the per-model parameter's short name in its spec (``w`` weight, ``d`` density, ``g``
gamma; see :mod:`evomerge.merge.methods_spec`); ``model`` is ``all`` when coefficients are shared
across models; global method parameters searched as ``{name}/{group}``. Module kinds are
``attention``, ``mlp`` and ``default`` (matched per architecture, see
:data:`evomerge.merge.coefficients.KIND_FILTERS`).

With ``schedule`` a coefficient is a :class:`~evomerge.recipe.Schedule` over depth and
``{group}`` becomes ``k{i}``, the value at knot ``i``: a ``linear`` schedule has two knots, the
first and the last layer (the recipe stores ``a = k0``, ``b = k1 - k0``), a ``piecewise`` one
``knots``. Each knot is searched inside the parameter's bounds; every layer's value lies between
two knots, so it stays inside them too (the recipe's ``clamp`` holds the bounds and only removes
float rounding).

>>> from evomerge.config import ModelsConfig, ParameterSpaceConfig
>>> models = ModelsConfig(base={"path": "b"}, experts={"x": {"path": "x"}, "y": {"path": "y"}})
>>> space = ParameterSpace(ParameterSpaceConfig(name="parameter", method="ties"), models=models)
>>> sorted(space.distributions())
['d/x/0', 'd/y/0', 'w/x/0', 'w/y/0']
>>> space.encode(space.decode({"d/x/0": .5, "d/y/0": .5, "w/x/0": 1., "w/y/0": .2}))["w/y/0"]
0.2
"""

from __future__ import annotations

from typing import Any

from optuna.distributions import FloatDistribution

from evomerge.config import ModelsConfig, ParameterSpaceConfig
from evomerge.merge.coefficients import SEARCH_KINDS
from evomerge.merge.methods_spec import METHODS, ParamSpec
from evomerge.recipe import Recipe, Schedule

KINDS = SEARCH_KINDS


class ParameterSpace:
    """Maps Optuna parameters to a :class:`Recipe` and back."""

    def __init__(self, cfg: ParameterSpaceConfig, *, models: ModelsConfig) -> None:
        self.cfg = cfg
        self.spec = METHODS[cfg.method]
        self.experts = list(models.experts)
        self.sources = models.sources()
        self.base = "base" if models.base is not None and self.spec.needs_base else None
        if self.spec.max_models is not None and len(self.experts) > self.spec.max_models:
            raise ValueError(
                f"{cfg.method} merges at most {self.spec.max_models} model(s) into the base, "
                f"got experts {self.experts}"
            )
        self._model_params = dict(self.spec.model_params)
        self._global_params = {
            k: v
            for k, v in self.spec.global_params.items()
            if k not in cfg.fixed and (k in cfg.bounds or not self._model_params)
        }

    # -- layout ----------------------------------------------------------------------------
    def _owners(self) -> list[str]:
        return self.experts if self.cfg.per_model else ["all"]

    def _kinds(self) -> tuple[str, ...]:
        return KINDS if self.cfg.module_kinds else ("",)

    def _points(self) -> list[str]:
        """The searched positions over depth: layer groups, or a schedule's knots."""
        if self.cfg.schedule is None:
            return [str(g) for g in range(self.cfg.layer_groups)]
        return [f"k{i}" for i in range(self.cfg.schedule.size)]

    def _name(self, prefix: str, owner: str | None, group: int, kind: str) -> str:
        point = self._points()[group]
        parts = [prefix] + ([owner] if owner else []) + [point] + ([kind] if kind else [])
        return "/".join(parts)

    def _bounds(self, param: str, spec: ParamSpec) -> tuple[float, float, bool]:
        b = self.cfg.bounds.get(param)
        return (b.low, b.high, b.log) if b else (spec.low, spec.high, False)

    def _slots(self) -> list[tuple[str, str, str | None, int, str]]:
        """(param, name, owner, group, kind) for every searched scalar."""
        out: list[tuple[str, str, str | None, int, str]] = []
        for param in self._model_params:
            for owner in self._owners():
                for g in range(len(self._points())):
                    for kind in self._kinds():
                        prefix = self._model_params[param].short or param
                        out.append((param, self._name(prefix, owner, g, kind), owner, g, kind))
        for param in self._global_params:
            for g in range(len(self._points())):
                for kind in self._kinds():
                    out.append((param, self._name(param, None, g, kind), None, g, kind))
        return out

    def distributions(self) -> dict[str, FloatDistribution]:
        specs = {**self._model_params, **self._global_params}
        dists = {}
        for param, name, _, _, _ in self._slots():
            low, high, log = self._bounds(param, specs[param])
            dists[name] = FloatDistribution(low, high, log=log)
        return dists

    # -- params <-> recipe -----------------------------------------------------------------
    def decode(self, params: dict[str, float]) -> Recipe:
        values: dict[tuple[str, str | None], dict[str, list[float]]] = {}
        points = len(self._points())
        for param, name, owner, g, kind in self._slots():
            per_kind = values.setdefault((param, owner), {})
            per_kind.setdefault(kind, [0.0] * points)[g] = float(params[name])
        models: dict[str, dict[str, Any]] = {e: {} for e in self.experts}
        parameters: dict[str, Any] = {**self.spec.flags, **self.cfg.fixed}
        for (param, owner), per_kind in values.items():
            value = _compact(per_kind, self._shape(param))
            if owner is None:
                parameters[param] = value
            else:
                for e in self.experts if owner == "all" else [owner]:
                    models[e][param] = value
        return Recipe(
            method=self.cfg.method,
            sources=self.sources,
            base_model=self.base,
            models=models,
            parameters=parameters,
            non_layer=self.cfg.non_layer,
        )

    def encode(self, recipe: Recipe) -> dict[str, float]:
        """Inverse of :meth:`decode` for recipes of this space's shape."""
        out = {}
        for param, name, owner, g, kind in self._slots():
            src = (
                recipe.parameters
                if owner is None
                else recipe.models[self.experts[0] if owner == "all" else owner]
            )
            out[name] = _pick(src[param], g, kind)
        return out

    def _shape(self, param: str) -> Any:
        """How one kind's searched values become a recipe value: a float, a per-group tuple,
        or a schedule clamped to the parameter's search bounds."""
        schedule = self.cfg.schedule
        if schedule is None:
            return lambda vals: vals[0] if len(vals) == 1 else tuple(vals)
        low, high, _ = self._bounds(param, self._param(param))

        def make(knots: list[float]) -> Schedule:
            if schedule.kind == "linear":
                knots = [knots[0], knots[1] - knots[0]]
            return Schedule(schedule=schedule.kind, values=tuple(knots), clamp=(low, high))

        return make

    def default(self) -> Recipe:
        """The method's default coefficients (see :mod:`evomerge.merge.methods_spec`)."""
        return self.decode(self.clip({n: self._default_of(n) for n in self.distributions()}))

    def _default_of(self, name: str) -> float:
        param = next(p for p, n, *_ in self._slots() if n == name)
        return self._param(param).start

    def _param(self, param: str) -> ParamSpec:
        return {**self._model_params, **self._global_params}[param]

    def clip(self, params: dict[str, float]) -> dict[str, float]:
        dists = self.distributions()
        return {k: min(max(v, dists[k].low), dists[k].high) for k, v in params.items()}

    def baselines(self) -> dict[str, dict[str, float]]:
        """Named parameter sets to evaluate first: uniform merge, defaults, each expert alone
        (weight 1 on it, 0 on the others, other parameters at their defaults: no trimming)."""
        k = len(self.experts)
        uniform = 1.0 / k if self.spec.uniform_mean else 1.0
        out: dict[str, dict[str, float]] = {"uniform": {}, "defaults": {}}
        experts_alone: dict[str, dict[str, float]] = (
            {f"expert:{e}": {} for e in self.experts} if self.cfg.per_model else {}
        )
        for param, name, owner, _, _ in self._slots():
            default = self._default_of(name)
            out["defaults"][name] = default
            out["uniform"][name] = uniform if param == "weight" else default
            for key, alone_params in experts_alone.items():
                if owner is None:  # a searched global parameter (lambda/0): its default
                    alone_params[name] = default
                elif owner != "all":
                    alone = self._param(param).default
                    if param == "weight":
                        alone = 1.0 if owner == key.removeprefix("expert:") else 0.0
                    alone_params[name] = alone
        if "weight" not in self._model_params:
            experts_alone = {}
        out.update(experts_alone)
        unique: dict[str, dict[str, float]] = {}
        for name, params in out.items():  # e.g. "defaults" may equal "uniform"
            clipped = self.clip(params)
            if clipped not in unique.values():
                unique[name] = clipped
        return unique


def _compact(per_kind: dict[str, list[float]], one: Any) -> Any:
    if list(per_kind) == [""]:
        return one(per_kind[""])
    return {kind: one(v) for kind, v in per_kind.items()}


def _pick(value: Any, group: int, kind: str) -> float:
    if isinstance(value, dict):
        value = value[kind or "default"]
    if isinstance(value, Schedule):
        knots = value.values
        if value.schedule == "linear":
            knots = (knots[0], knots[0] + knots[1])
        return float(knots[group])
    if isinstance(value, tuple):
        return float(value[group])
    return float(value)
