"""What each merge method takes: pure data, no torch, so configs validate without heavy imports.

Names, parameter meanings and defaults follow mergekit 0.1.5, so an exported recipe reproduces the
same weights there. The kernels live in :mod:`evomerge.merge_methods`.

>>> METHODS["ties"].flags
{'normalize': True, 'rescale': False}
>>> METHODS["ties"].model_params["density"].default
1.0
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ParamSpec:
    """One searchable parameter.

    ``default`` is what a recipe that omits the parameter gets: mergekit 0.1.5's default where it
    has one (mergekit has none for ``weight`` and ``t``: an export must always write those).
    ``baseline`` is a sensible value for baseline trials and search starts when it differs from
    ``default`` (a TIES density of 1.0 trims nothing). ``low``/``high``: default search bounds.
    """

    default: float
    low: float
    high: float
    baseline: float | None = None

    @property
    def start(self) -> float:
        """The baseline value if set, else the default."""
        return self.default if self.baseline is None else self.baseline


@dataclass(frozen=True)
class MethodSpec:
    name: str
    needs_base: bool
    model_params: dict[str, ParamSpec] = field(default_factory=dict)
    global_params: dict[str, ParamSpec] = field(default_factory=dict)
    flags: dict[str, bool] = field(default_factory=dict)
    max_models: int | None = None  # models merged into the base (slerp: exactly one)

    def param_default(self, key: str) -> float | bool:
        """The value used when a recipe does not set ``key``."""
        for table in (self.model_params, self.global_params):
            if key in table:
                return table[key].default
        return self.flags[key]


WEIGHT = ParamSpec(default=1.0, low=0.0, high=1.0)
DENSITY = ParamSpec(default=1.0, low=0.1, high=1.0, baseline=0.5)
LAMBDA = ParamSpec(default=1.0, low=0.0, high=2.0)

METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec("linear", False, {"weight": WEIGHT}, flags={"normalize": True}),
    "task_arithmetic": MethodSpec(
        "task_arithmetic", True, {"weight": WEIGHT}, {"lambda": LAMBDA}, {"normalize": False}
    ),
    "ties": MethodSpec(
        "ties", True, {"weight": WEIGHT, "density": DENSITY}, {"lambda": LAMBDA},
        {"normalize": True, "rescale": False},
    ),
    "dare_linear": MethodSpec(
        "dare_linear", True, {"weight": WEIGHT, "density": DENSITY}, {"lambda": LAMBDA},
        {"normalize": False, "rescale": True},
    ),
    "dare_ties": MethodSpec(
        "dare_ties", True, {"weight": WEIGHT, "density": DENSITY}, {"lambda": LAMBDA},
        {"normalize": False, "rescale": True},
    ),
    "breadcrumbs": MethodSpec(
        "breadcrumbs", True,
        {
            "weight": WEIGHT,
            "density": ParamSpec(1.0, 0.5, 1.0, baseline=0.9),
            "gamma": ParamSpec(0.01, 0.0, 0.1),
        },
        {"lambda": LAMBDA}, {"normalize": False, "rescale": False},
    ),
    "slerp": MethodSpec(
        "slerp", True, global_params={"t": ParamSpec(0.5, 0.0, 1.0)}, max_models=1
    ),
}


def method_names() -> list[str]:
    return sorted(METHODS)
