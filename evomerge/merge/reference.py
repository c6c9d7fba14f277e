"""The pure reference merge: a recipe applied to whole state dicts, one tensor at a time.

:func:`plan_merge` validates a recipe against the models at hand and :func:`tensor_params` resolves
every method parameter for one tensor; the in-place :class:`evomerge.merge.workspace.Workspace`
uses both, so the two paths agree by construction on everything but the arithmetic they share.
>>> import torch
>>> from evomerge.recipe import Recipe
>>> sds = {"base": {"w": torch.zeros(2)}, "x": {"w": torch.ones(2)}}
>>> r = Recipe(method="task_arithmetic", sources={"base": "b", "x": "x"}, base_model="base",
...            models={"x": {"weight": 0.5}})
>>> merge_state_dicts(r, sds, num_layers=1)["w"].tolist()
[0.5, 0.5]
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evomerge.merge.coefficients import layer_index, resolve
from evomerge.merge.methods_spec import KERNEL_ARG, METHODS, MethodSpec
from evomerge.recipe import Recipe, ps_recipe

if TYPE_CHECKING:  # torch is imported where tensors are merged: plan_merge needs none
    from torch import Tensor


class _Seeded:
    """The registered methods that draw seeded random masks (DARE), as they stand when asked."""

    def __contains__(self, method: object) -> bool:
        return isinstance(method, str) and method in METHODS and METHODS[method].seeded

    def __iter__(self) -> Iterator[str]:
        return (name for name in METHODS if METHODS[name].seeded)


DARE = _Seeded()
DTYPE_NAMES = ("float32", "float16", "bfloat16")


def __getattr__(name: str) -> Any:
    """``DTYPES`` (dtype name -> torch dtype), built on first use so that importing this
    module does not import torch."""
    if name == "DTYPES":
        import torch

        globals()["DTYPES"] = {n: getattr(torch, n) for n in DTYPE_NAMES}
        return globals()["DTYPES"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class MergePlan:
    """A validated recipe: the method, the base (if any; ``linear`` only uses it for the
    ``non_layer: base`` rule) and the models merged, in order."""

    method: str
    spec: MethodSpec
    base: str | None
    models: tuple[str, ...]


def plan_merge(recipe: Recipe, *, available: Collection[str]) -> MergePlan:
    """Check ``recipe`` against the model names in ``available``; raise ValueError naming the fix.

    For methods with a base, a base model listed in ``models`` is the base (as in mergekit);
    ``linear`` merges exactly the listed models.
    """
    recipe = ps_recipe(recipe, user="the reference merge", fix="merge the inner recipe first")
    spec = METHODS[recipe.method]  # unknown: UnknownNameError, with the closest name
    base = recipe.base_model
    if spec.needs_base and base is None:
        raise ValueError(f"method {recipe.method!r} needs base_model; name one of the sources")
    if recipe.non_layer == "base" and base is None:
        raise ValueError("non_layer: base needs base_model; set it or use non_layer: first")
    models = tuple(m for m in recipe.models if not (spec.needs_base and m == base))
    if not models:
        raise ValueError("recipe.models names no model to merge; add at least one")
    if spec.max_models is not None and len(models) != spec.max_models:
        raise ValueError(
            f"{recipe.method} merges exactly {spec.max_models} model(s) into the base, "
            f"got {len(models)}: {', '.join(models)}"
        )
    _check_keys(recipe, spec)
    missing = [m for m in (base, *models) if m is not None and m not in available]
    if missing:
        raise ValueError(
            f"model(s) {', '.join(map(repr, missing))} are not loaded; available: "
            f"{', '.join(available)}"
        )
    return MergePlan(recipe.method, spec, base, models)


def _check_keys(recipe: Recipe, spec: MethodSpec) -> None:
    per_model = set(spec.model_params)
    for model, params in recipe.models.items():
        _known(f"models.{model}", params, per_model, spec.name)
    shared = per_model | set(spec.global_params) | set(spec.flags)
    _known("parameters", recipe.parameters, shared, spec.name)


def _known(where: str, keys: Collection[str], allowed: set[str], method: str) -> None:
    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"{where}.{key} is not a parameter of {method}.{hint} "
                f"Allowed there: {', '.join(sorted(allowed)) or 'none'}"
            )


def lookup(recipe: Recipe, model: str | None, key: str, name: str, *, num_layers: int) -> Any:
    """A parameter's value for one tensor: the model's setting, then the global one, then the
    method default (mergekit's precedence)."""
    scopes: list[Mapping[str, Any]] = [recipe.parameters]
    if model is not None:
        scopes.insert(0, recipe.models.get(model, {}))
    for scope in scopes:
        if key in scope:
            value = resolve(scope[key], name, num_layers=num_layers)
            if value is not None:
                return value
    return METHODS[recipe.method].param_default(key)


def tensor_params(recipe: Recipe, plan: MergePlan, name: str, *, num_layers: int) -> dict:
    """Kernel keyword arguments for tensor ``name``: per-model lists, shared scalars and flags."""
    spec = plan.spec
    kwargs: dict[str, Any] = {}
    for key in spec.model_params:
        kwargs[key] = [
            float(lookup(recipe, m, key, name, num_layers=num_layers)) for m in plan.models
        ]
    for key in spec.global_params:
        kwargs[KERNEL_ARG.get(key, key)] = float(lookup(recipe, None, key, name,
                                                        num_layers=num_layers))
    for key in spec.flags:
        kwargs[key] = bool(lookup(recipe, None, key, name, num_layers=num_layers))
    return kwargs


def keeps_base(recipe: Recipe, name: str) -> bool:
    """True if tensor ``name`` is copied from the base by the ``non_layer: base`` rule."""
    return recipe.non_layer == "base" and layer_index(name) is None


def merge_state_dicts(
    recipe: Recipe, state_dicts: Mapping[str, Mapping[str, Tensor]], *, num_layers: int
) -> dict[str, Tensor]:
    """Apply ``recipe`` to the named state dicts and return the merged state dict.

    Tensor names follow the base (or the first merged model); non-floating tensors are copied.
    The output dtype is ``recipe.dtype`` if set, else the inputs' dtype.
    """
    import torch

    from evomerge.merge.levels import level_key

    plan = plan_merge(recipe, available=list(state_dicts))
    ref = state_dicts[plan.base or plan.models[0]]
    out: dict[str, Tensor] = {}
    for name, ref_tensor in ref.items():
        base = state_dicts[plan.base][name] if plan.base else None
        if not ref_tensor.is_floating_point() or keeps_base(recipe, name):
            out[name] = (base if base is not None else ref_tensor).clone()
            continue
        tensors = torch.stack([_tensor(state_dicts, m, name) for m in plan.models])
        kwargs = tensor_params(recipe, plan, name, num_layers=num_layers)
        if plan.spec.seeded:
            kwargs["level_keys"] = [level_key(recipe.seed, name, m) for m in plan.models]
        out[name] = plan.spec(base, tensors, **kwargs)
    if recipe.dtype is not None:
        dtype = getattr(torch, recipe.dtype)
        out = {k: v.to(dtype) if v.is_floating_point() else v
               for k, v in out.items()}
    return out


def _tensor(state_dicts: Mapping[str, Mapping[str, Tensor]], model: str, name: str) -> Tensor:
    if name not in state_dicts[model]:
        raise ValueError(f"model {model!r} has no tensor {name!r}; the models are not compatible")
    return state_dicts[model][name]
