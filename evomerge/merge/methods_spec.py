"""Every merge method, declared once: a frozen :class:`MethodSpec` per method, pure data.

A spec says what the method takes (per-model and global parameters with defaults, search bounds
and valid ranges; flags), whether it needs a base and how many models it merges, which fused
Workspace path runs it (``family``; for the task-arithmetic family also its ``sparsifier`` and
``consensus``, as mergekit's ``GeneralizedTaskArithmeticMerge`` does) and its reference kernel, a
lazy ``"module:attr"``. The reference merge, the Workspace, the parameter search space, config
validation and the mergekit export all read it; nothing imports torch here, so configs validate
without heavy imports.

Names, parameter meanings and defaults follow mergekit 0.1.5, so an exported recipe reproduces the
same weights there. The kernels live in :mod:`evomerge.merge.merge_methods`. Adding a method is one
:func:`register_method` call plus its kernel.

>>> METHODS["ties"].flags
{'normalize': True, 'rescale': False}
>>> METHODS["ties"].model_params["density"].default
1.0
>>> spec = register_method(MethodSpec(
...     "half_linear", kernel="evomerge.merge.merge_methods:linear", needs_base=False,
...     model_params={"weight": ParamSpec(0.5, 0.0, 1.0, short="w")}, flags={"normalize": True}))
>>> unregister_method("half_linear") is spec
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from evomerge.registry import Registry

Range = tuple[float, float, bool, bool]
"""Where a parameter is meaningful: (low, high, low included, high included)."""
ANY: Range = (-math.inf, math.inf, False, False)
KERNEL_ARG = {"lambda": "lambda_"}  # `lambda` is a Python keyword
FAMILIES = (None, "linear", "task_arithmetic")
SPARSIFIERS = (None, "magnitude", "random", "outliers", "della")


@dataclass(frozen=True)
class ParamSpec:
    """One searchable parameter.

    ``default`` is what a recipe that omits the parameter gets: mergekit 0.1.5's default where it
    has one (mergekit has none for ``weight`` and ``t``: ``mergekit_required`` makes an export
    always write those). ``baseline`` is a sensible value for baseline trials and search starts
    when it differs from ``default`` (a TIES density of 1.0 trims nothing). ``low``/``high``:
    default search bounds, inside ``valid``. ``short``: the name's prefix in Optuna parameter
    names (``w/x/0``); the full name when None.
    """

    default: float
    low: float
    high: float
    baseline: float | None = None
    valid: Range = ANY
    short: str | None = None
    mergekit_required: bool = False

    def __post_init__(self) -> None:
        if not self.low <= self.high:
            raise ValueError(f"ParamSpec low ({self.low}) > high ({self.high}); swap them")
        for what in ("default", "low", "high", "baseline"):
            value = getattr(self, what)
            if value is not None and not in_range(self.valid, value):
                raise ValueError(f"ParamSpec {what}={value} is outside its valid range "
                                 f"{self.valid}; move it inside or widen valid")

    @property
    def start(self) -> float:
        """The baseline value if set, else the default."""
        return self.default if self.baseline is None else self.baseline


def in_range(valid: Range, value: float) -> bool:
    """True if the finite ``value`` lies in ``valid``."""
    low, high, low_in, high_in = valid
    above = value >= low if low_in else value > low
    below = value <= high if high_in else value < high
    return above and below and math.isfinite(value)


@dataclass(frozen=True)
class MethodSpec:
    """One merge method. ``kernel(base, tensors, **params)`` is the reference per-tensor function
    (a lazy ``"module:attr"`` or a callable; see :mod:`evomerge.merge.merge_methods`).

    ``family`` picks the Workspace's fused path: ``"linear"`` (``sum_k w_k theta_k``),
    ``"task_arithmetic"`` (generalized task arithmetic: ``sparsifier`` is None, ``"magnitude"``
    (TIES), ``"random"`` (DARE, seeded masks), ``"outliers"`` (breadcrumbs) or ``"della"``
    (DELLA: magnitude-ranked seeded masks), ``consensus``
    elects signs; its kernel also receives these two), or None: the Workspace rebuilds the
    models' tensors and calls ``kernel`` (slerp). ``max_models``: exactly this many merged
    models (slerp: one). ``uniform_mean``: the "uniform" baseline gives each of K experts weight
    1/K (the weights are summed, not averaged); else 1. ``mergekit``: mergekit's name for the
    method; None refuses a mergekit export.

    Calling a spec runs its kernel on one tensor, omitted parameters taking their defaults.
    """

    name: str
    kernel: str | Callable[..., Any]
    needs_base: bool
    model_params: Mapping[str, ParamSpec] = field(default_factory=dict)
    global_params: Mapping[str, ParamSpec] = field(default_factory=dict)
    flags: Mapping[str, bool] = field(default_factory=dict)
    max_models: int | None = None
    family: Literal["linear", "task_arithmetic"] | None = None
    sparsifier: Literal["magnitude", "random", "outliers", "della"] | None = None
    consensus: bool = False
    uniform_mean: bool = False
    mergekit: str | None = None

    def __post_init__(self) -> None:
        for problem in _problems(self):
            raise ValueError(f"merge method {self.name!r}: {problem}")

    def param_default(self, key: str) -> float | bool:
        """The value used when a recipe does not set ``key``."""
        for table in (self.model_params, self.global_params):
            if key in table:
                return table[key].default
        return self.flags[key]

    @property
    def seeded(self) -> bool:
        """True if the merge draws random masks from the recipe's ``seed`` (DARE, DELLA)."""
        return self.sparsifier in ("random", "della")

    def __call__(self, base: Any, tensors: Any, **params: Any) -> Any:
        """The reference merge of one tensor: ``base`` and ``tensors`` stacked ``(K, ...)``."""
        k = tensors.shape[0]
        for key, spec in self.model_params.items():
            params.setdefault(key, [spec.default] * k)
        for key, spec in self.global_params.items():
            params.setdefault(KERNEL_ARG.get(key, key), spec.default)
        for key, flag in self.flags.items():
            params.setdefault(key, flag)
        if self.family == "task_arithmetic":
            params.update(sparsifier=self.sparsifier, consensus=self.consensus)
        return _load(self.kernel)(base, tensors, **params)


def _problems(spec: MethodSpec) -> Iterator[str]:
    """What is wrong with ``spec``, each as a sentence naming the fix."""
    keys = [*spec.model_params, *spec.global_params, *spec.flags]
    if len(set(keys)) != len(keys):
        yield f"a parameter name appears twice among {keys}; give each one place"
    if isinstance(spec.kernel, str) and ":" not in spec.kernel:
        yield f"kernel {spec.kernel!r} must look like 'package.module:attr' or be a callable"
    if spec.family not in FAMILIES or spec.sparsifier not in SPARSIFIERS:
        yield f"family must be one of {FAMILIES}, sparsifier one of {SPARSIFIERS}"
    if spec.family != "task_arithmetic" and (spec.sparsifier or spec.consensus):
        yield "sparsifier and consensus belong to family='task_arithmetic'"
    if spec.max_models is not None and spec.max_models < 1:
        yield f"max_models must be at least 1, got {spec.max_models}"
    needed = {"weight", "normalize"} if spec.family else set()
    if spec.family == "task_arithmetic":
        needed.add("base")
    if spec.sparsifier:
        needed |= {"density", "rescale"}
    have = {*spec.model_params, *spec.flags} | ({"base"} if spec.needs_base else set())
    if needed - have:
        yield (f"family {spec.family!r} needs {sorted(needed - have)} (per-model weight and "
               "density, flags normalize and rescale, needs_base=True)")


def _load(target: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(target):
        return target
    import importlib

    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


class MethodRegistry(Registry):
    """Name -> :class:`MethodSpec`. A parameter name means one thing in every method (as in
    mergekit): a spec whose same-named parameter has another valid range or short name is
    refused, as is a duplicate name."""

    def register(self, name: str, target: Any) -> None:
        if not isinstance(target, MethodSpec) or target.name != name:
            raise TypeError(f"register merge method {name!r} as a MethodSpec named {name!r}")
        for key, param in {**target.model_params, **target.global_params}.items():
            known = _param(self, key)
            if known is not None and (known.valid, known.short) != (param.valid, param.short):
                raise ValueError(
                    f"merge method {name!r}: parameter {key!r} has valid={param.valid}, "
                    f"short={param.short!r}, but registered methods use valid={known.valid}, "
                    f"short={known.short!r}; use the same, or another parameter name"
                )
        super().register(name, target)

    def get(self, name: str) -> MethodSpec:
        return super().get(name)  # type: ignore[no-any-return]

    def specs(self) -> list[MethodSpec]:
        return [self.get(name) for name in self.names()]


def _param(registry: MethodRegistry, key: str) -> ParamSpec | None:
    for spec in registry.specs():
        for table in (spec.model_params, spec.global_params):
            if key in table:
                return table[key]
    return None


class _ValidRanges(Mapping[str, Range]):
    """Parameter name -> valid range, over the methods registered when asked."""

    def __getitem__(self, key: str) -> Range:
        param = _param(METHODS, key)
        if param is None:
            raise KeyError(key)
        return param.valid

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(k for s in METHODS.specs()
                                  for k in (*s.model_params, *s.global_params)))

    def __len__(self) -> int:
        return len(list(iter(self)))


METHODS = MethodRegistry("merge method")
VALID_RANGE: Mapping[str, Range] = _ValidRanges()


def register_method(spec: MethodSpec) -> MethodSpec:
    """Register ``spec`` under its name (a duplicate name is an error) and return it."""
    METHODS.register(spec.name, spec)
    return spec


def unregister_method(name: str) -> MethodSpec:
    """Remove and return the method ``name`` (for tests and plugins that come and go)."""
    spec = METHODS.get(name)
    METHODS.unregister(name)
    return spec


# -- the built-in methods (mergekit 0.1.5 names, parameters and defaults) ----------------------
WEIGHT = ParamSpec(default=1.0, low=0.0, high=1.0, short="w", mergekit_required=True)
DENSITY = ParamSpec(default=1.0, low=0.1, high=1.0, baseline=0.5, valid=(0.0, 1.0, False, True),
                    short="d")
LAMBDA = ParamSpec(default=1.0, low=0.0, high=2.0)
GAMMA = ParamSpec(0.01, 0.0, 0.1, valid=(0.0, 1.0, True, False), short="g")
T = ParamSpec(0.5, 0.0, 1.0, valid=(0.0, 1.0, True, True), mergekit_required=True)
# DELLA: mergekit refuses density +/- epsilon outside (0, 1); these bounds never reach it.
DELLA_DENSITY = ParamSpec(1.0, 0.2, 0.8, baseline=0.5, valid=DENSITY.valid, short="d")
EPSILON = ParamSpec(0.15, 0.0, 0.15, valid=(0.0, 1.0, True, False), short="e")
SELECT_TOPK = ParamSpec(1.0, 0.1, 1.0, baseline=0.5, valid=(0.0, 1.0, True, True))
KERNELS = "evomerge.merge.merge_methods"


def _task_arithmetic(name: str, *, sparsifier: Any = None, consensus: bool = False,
                     normalize: bool = False, rescale: bool | None = None,
                     model_params: Mapping[str, ParamSpec] | None = None,
                     uniform_mean: bool = False) -> MethodSpec:
    """A member of mergekit's generalized task arithmetic family."""
    if model_params is None:
        model_params = {"weight": WEIGHT, "density": DENSITY} if sparsifier else {"weight": WEIGHT}
    flags = {"normalize": normalize} | ({} if rescale is None else {"rescale": rescale})
    return MethodSpec(
        name, kernel=f"{KERNELS}:gta", needs_base=True, model_params=model_params,
        global_params={"lambda": LAMBDA}, flags=flags, family="task_arithmetic",
        sparsifier=sparsifier, consensus=consensus, uniform_mean=uniform_mean, mergekit=name,
    )


for _spec in (
    MethodSpec("linear", kernel=f"{KERNELS}:linear", needs_base=False,
               model_params={"weight": WEIGHT}, flags={"normalize": True}, family="linear",
               mergekit="linear"),
    _task_arithmetic("task_arithmetic", uniform_mean=True),
    _task_arithmetic("ties", sparsifier="magnitude", consensus=True, normalize=True,
                     rescale=False),
    _task_arithmetic("dare_linear", sparsifier="random", rescale=True, uniform_mean=True),
    _task_arithmetic("dare_ties", sparsifier="random", consensus=True, rescale=True),
    _task_arithmetic(
        "breadcrumbs", sparsifier="outliers", rescale=False, uniform_mean=True,
        model_params={"weight": WEIGHT, "density": ParamSpec(1.0, 0.5, 1.0, baseline=0.9,
                                                             valid=DENSITY.valid, short="d"),
                      "gamma": GAMMA},
    ),
    MethodSpec("slerp", kernel=f"{KERNELS}:slerp", needs_base=True, global_params={"t": T},
               max_models=1, mergekit="slerp"),
    _task_arithmetic(
        "breadcrumbs_ties", sparsifier="outliers", consensus=True, rescale=False,
        model_params={"weight": WEIGHT, "density": ParamSpec(1.0, 0.5, 1.0, baseline=0.9,
                                                             valid=DENSITY.valid, short="d"),
                      "gamma": GAMMA},
    ),
    _task_arithmetic("della", sparsifier="della", consensus=True, normalize=True, rescale=True,
                     model_params={"weight": WEIGHT, "density": DELLA_DENSITY,
                                   "epsilon": EPSILON}),
    _task_arithmetic("della_linear", sparsifier="della", rescale=True, uniform_mean=True,
                     model_params={"weight": WEIGHT, "density": DELLA_DENSITY,
                                   "epsilon": EPSILON}),
    MethodSpec("sce", kernel=f"{KERNELS}:sce", needs_base=True,
               global_params={"select_topk": SELECT_TOPK}, mergekit="sce"),
):
    register_method(_spec)
import evomerge.merge.methods_more  # noqa: E402,F401  (registers more methods)
