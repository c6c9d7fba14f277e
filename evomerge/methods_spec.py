"""What each merge method takes: pure data, no torch, so configs validate without heavy imports.

Names and parameter meanings follow mergekit 0.1.5 so that an exported recipe reproduces the same
weights there. The kernels live in :mod:`evomerge.merge_methods`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ParamSpec:
    """One searchable parameter: its default and the default search bounds."""

    default: float
    low: float
    high: float


@dataclass(frozen=True)
class MethodSpec:
    name: str
    needs_base: bool
    model_params: dict[str, ParamSpec] = field(default_factory=dict)
    global_params: dict[str, ParamSpec] = field(default_factory=dict)
    flags: dict[str, bool] = field(default_factory=dict)
    max_models: int | None = None  # models merged into the base (slerp: exactly one)


WEIGHT = ParamSpec(default=1.0, low=0.0, high=1.0)
DENSITY = ParamSpec(default=0.5, low=0.1, high=1.0)
LAMBDA = ParamSpec(default=1.0, low=0.0, high=2.0)

METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec("linear", False, {"weight": WEIGHT}, flags={"normalize": True}),
    "task_arithmetic": MethodSpec(
        "task_arithmetic", True, {"weight": WEIGHT}, {"lambda": LAMBDA}, {"normalize": False}
    ),
    "ties": MethodSpec(
        "ties", True, {"weight": WEIGHT, "density": DENSITY}, {"lambda": LAMBDA},
        {"normalize": True},
    ),
    "dare_linear": MethodSpec(
        "dare_linear", True, {"weight": WEIGHT, "density": DENSITY}, {"lambda": LAMBDA},
        {"normalize": False, "rescale": True},
    ),
    "dare_ties": MethodSpec(
        "dare_ties", True, {"weight": WEIGHT, "density": DENSITY}, {"lambda": LAMBDA},
        {"normalize": True, "rescale": True},
    ),
    "breadcrumbs": MethodSpec(
        "breadcrumbs", True,
        {"weight": WEIGHT, "density": ParamSpec(0.9, 0.5, 1.0), "gamma": ParamSpec(0.01, 0.0, 0.1)},
        {"lambda": LAMBDA}, {"normalize": False},
    ),
    "slerp": MethodSpec(
        "slerp", True, global_params={"t": ParamSpec(0.5, 0.0, 1.0)}, max_models=1
    ),
}


def method_names() -> list[str]:
    return sorted(METHODS)
