"""A Recipe as a mergekit 0.1.5 configuration that reproduces evomerge's merged weights.

mergekit reads a list value as a gradient over the layers (``t = i / (n - 1)``), so a per-group
tuple is written as exactly ``num_hidden_layers`` values, one per layer; embeddings, the final
norm and ``lm_head`` read the first element, as evomerge's ``non_layer: first`` does. A schedule
is written as that per-layer list. A module-kind mapping becomes ``{filter, value}`` entries, one
per filter of each kind (:data:`~evomerge.merge.coefficients.KIND_FILTERS`; with the tensor names
known, only those that select a tensor), in the mapping's order (first match wins, ``default``
last, without a filter): the same substring rule evomerge merges with, so the same tensors.
``non_layer: base`` prepends one filter per tensor outside the decoder layers (its full name)
that sets the models' ``weight`` to 0 (task-arithmetic family), slerp's ``t`` to 0, or, for
``linear``, the base's weight to 1 and the others' to 0, so those tensors equal the base exactly.

Every key written is one mergekit uses for the method: ``weight`` and ``t`` (required there) are
always written, and so are the method's flags (``normalize``, ``rescale``), so the file does not
depend on mergekit's defaults.

>>> from evomerge.recipe import Recipe
>>> r = Recipe(method="task_arithmetic", sources={"base": "b", "x": "x"}, base_model="base",
...            models={"x": {"weight": (0.2, 0.4)}})
>>> mergekit_config(r, num_layers=4)["models"]
[{'model': 'x', 'parameters': {'weight': [0.2, 0.2, 0.4, 0.4]}}]
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from evomerge.merge.coefficients import kind_filters, layer_index, per_layer
from evomerge.merge.methods_spec import METHODS, MethodSpec
from evomerge.merge.reference import plan_merge
from evomerge.recipe import AnyRecipe, Recipe, Schedule, ps_recipe

DARE_NOTE = (
    "DARE/DELLA drop task-vector entries at random. evomerge seeds each mask from (recipe seed, "
    "tensor, model); mergekit draws its own masks and cannot take that seed, so this config "
    "reproduces the method and every parameter but not the same dropped entries: the weights "
    "differ entry by entry (each task vector keeps the same L1 norm when rescale is on)."
)
TIE_NOTE = (
    "evomerge merged this recipe with load.tie_order: index: where a trim bound cuts a group of "
    "task-vector entries of equal magnitude, it keeps the lowest-index ones, mergekit the ones "
    "its argsort puts first. mergekit's merge of this config keeps the same number of entries "
    "with the same magnitudes and differs from evomerge's (--format hf) in those tied entries "
    "only."
)
BASE_OPTIONAL = ("nuslerp", "multislerp")
"""mergekit methods whose optional base_model changes the merge (it is written when set)."""


def mergekit_config(
    recipe: AnyRecipe, *, num_layers: int, tensor_names: Iterable[str] | None = None
) -> dict[str, Any]:
    """The mergekit config dict for ``recipe`` on models with ``num_layers`` decoder layers.

    ``tensor_names`` (the base model's) are needed for ``non_layer: base`` only.
    """
    recipe = _exportable(recipe)
    plan = plan_merge(recipe, available=list(recipe.sources))
    if plan.spec.mergekit is None:
        raise ValueError(
            f"merge method {recipe.method!r} has no mergekit equivalent, so it cannot be "
            "exported as a mergekit config. Export it with --format hf or --format recipe"
        )
    names = None if tensor_names is None else list(tensor_names)
    base_filters = _base_filters(recipe, names)
    if base_filters and plan.spec.family is None and "t" not in plan.spec.global_params:
        raise ValueError(
            f"cannot export non_layer: base for merge method {recipe.method!r} to mergekit: no "
            "setting of it keeps the base's tensors. Use non_layer: first, or --format hf"
        )
    ctx = _Ctx(recipe, plan.spec, num_layers, names)
    config: dict[str, Any] = {"merge_method": plan.spec.mergekit}
    if plan.spec.needs_base or (plan.base is not None and plan.spec.mergekit in BASE_OPTIONAL):
        config["base_model"] = _ref(recipe, plan.base)
    config["models"] = _models(ctx, plan.models, plan.base, base_filters)
    config["parameters"] = _globals(ctx, base_filters)
    config["dtype"] = recipe.dtype or "float32"
    return config


def mergekit_yaml(recipe: AnyRecipe, *, num_layers: int, tensor_names: Iterable[str] | None = None,
                  header: Sequence[str] = (), tie_order: str = "mergekit") -> str:
    """:func:`mergekit_config` as YAML text, with ``header`` lines (and the DARE caveat, or
    the tie caveat for a trim merged with ``tie_order`` ``index``) as comments on top."""
    config = mergekit_config(recipe, num_layers=num_layers, tensor_names=tensor_names)
    lines = list(header)
    spec = METHODS[_exportable(recipe).method]
    if spec.seeded:
        lines += ["", "NOTE: " + DARE_NOTE]
    elif tie_order == "index" and spec.sparsifier in ("magnitude", "outliers"):
        lines += ["", "NOTE: " + TIE_NOTE]
    comment = "".join(f"# {line}\n".replace("# \n", "#\n") for line in _wrap(lines))
    return comment + yaml.dump(config, Dumper=_Dumper, sort_keys=False, width=99)


def _exportable(recipe: AnyRecipe) -> Recipe:
    """``recipe`` if mergekit can express it: a ps recipe over model folders or hub ids."""
    if not isinstance(recipe, Recipe):
        from evomerge.engines import engine_factory

        engine_factory(recipe.kind)  # a kind with no engine: that error first
    return ps_recipe(recipe, user="a mergekit export", fix=(
        "write that recipe out with `evomerge merge INNER.yaml DIR`, name DIR as the source "
        "and export again"))


class _Dumper(yaml.SafeDumper):
    """Lists of numbers in flow style (``[0.1, 0.2]``), as mergekit writes them."""

    def represent_list(self, data: Any) -> yaml.SequenceNode:
        flow = all(isinstance(v, (int, float)) for v in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _Dumper.represent_list)


class _Ctx:
    def __init__(self, recipe: Recipe, spec: MethodSpec, num_layers: int,
                 names: list[str] | None = None) -> None:
        self.recipe, self.spec, self.num_layers, self.names = recipe, spec, num_layers, names

    def required(self, key: str) -> bool:
        """True if mergekit has no default for ``key``, so the export always writes it."""
        params = {**self.spec.model_params, **self.spec.global_params}
        return key in params and params[key].mergekit_required

    def conds(self, key: str, value: Any) -> list[dict[str, Any]]:
        """``value`` as mergekit ``{filter, value}`` entries (no filter = catch-all)."""
        if not isinstance(value, Mapping):
            return [{"value": self.plain(key, value)}]
        conds = [{"filter": f, "value": self.plain(key, v)}
                 for k, v in value.items() if k != "default" for f in kind_filters(k, self.names)]
        if "default" in value:
            conds.append({"value": self.plain(key, value["default"])})
        return conds

    def plain(self, key: str, value: Any) -> Any:
        if isinstance(value, Schedule):
            value = per_layer(value, self.num_layers)
        if not isinstance(value, (tuple, list)):
            return value
        values = list(per_layer(tuple(value), self.num_layers))
        if all(v == values[0] for v in values):
            return _flag(key, values[0]) if key in self.spec.flags else values[0]
        if key in self.spec.flags:
            # mergekit picks list entries of non-numbers by int(t * (n - 1)), which float
            # rounding can put one layer off; a per-layer flag cannot be written exactly.
            raise ValueError(f"flag {key!r} varies over layers ({value}); mergekit cannot read "
                             "a per-layer flag exactly. Use one value for it")
        return values


def _models(ctx: _Ctx, models: Sequence[str], base: str | None,
            base_filters: list[str]) -> list[dict[str, Any]]:
    recipe = ctx.recipe
    linear = ctx.spec.family == "linear"
    out = []
    for name in models:
        params = recipe.models.get(name, {})
        keys = dict.fromkeys([*params, *(k for k in ctx.spec.model_params if ctx.required(k))])
        entry: dict[str, Any] = {}
        for key in keys:
            conds = ctx.conds(key, params[key]) if key in params else []
            if key == "weight" and base_filters:
                keep = 1.0 if (linear and name == base) else 0.0
                conds = [{"filter": f, "value": keep} for f in base_filters] + conds
            if ctx.required(key) and not _catch_all(conds) and not _global_catch_all(ctx, key):
                conds.append({"value": ctx.spec.param_default(key)})
            entry[key] = _setting(conds)
        out.append({"model": _ref(recipe, name), "parameters": entry})
    if linear and base_filters and base not in models:
        assert base is not None  # plan_merge refuses non_layer: base without a base
        weight = [{"filter": f, "value": 1.0} for f in base_filters] + [{"value": 0.0}]
        out.append({"model": _ref(recipe, base), "parameters": {"weight": weight}})
    return out


def _globals(ctx: _Ctx, base_filters: list[str]) -> dict[str, Any]:
    """Global parameters: the recipe's, every flag (explicit), and slerp's ``t``."""
    recipe, spec = ctx.recipe, ctx.spec
    required = [k for k in spec.global_params if ctx.required(k)]
    out: dict[str, Any] = {}
    for key in dict.fromkeys([*recipe.parameters, *spec.flags, *required]):
        conds = ctx.conds(key, recipe.parameters[key]) if key in recipe.parameters else []
        if key == "t" and base_filters:
            conds = [{"filter": f, "value": 0.0} for f in base_filters] + conds
        if not _catch_all(conds) and (key in spec.flags or ctx.required(key)):
            conds.append({"value": spec.param_default(key)})
        if key in spec.flags:
            conds = [{**c, "value": _flag(key, c["value"])} for c in conds]
        out[key] = _setting(conds)
    return out


def _global_catch_all(ctx: _Ctx, key: str) -> bool:
    value = ctx.recipe.parameters.get(key)
    return value is not None and (not isinstance(value, Mapping) or "default" in value)


def _catch_all(conds: list[dict[str, Any]]) -> bool:
    return any("filter" not in c for c in conds)


def _setting(conds: list[dict[str, Any]]) -> Any:
    """A single catch-all is written as its plain value; anything else as a filter list."""
    if len(conds) == 1 and "filter" not in conds[0]:
        return conds[0]["value"]
    return conds


def _flag(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise ValueError(f"flag {key!r} must be true or false, got {value!r}")


def _base_filters(recipe: Recipe, tensor_names: Iterable[str] | None) -> list[str]:
    """Full names of the tensors outside the decoder layers (``non_layer: base`` only)."""
    if recipe.non_layer != "base":
        return []
    if tensor_names is None:
        raise ValueError("non_layer: base needs the base model's tensor names to write filters")
    names = list(tensor_names)
    outside = [n for n in names if layer_index(n) is None]
    for n in outside:
        clash = [m for m in names if m != n and n in m]
        if clash:
            raise ValueError(
                f"cannot export non_layer: base to mergekit: tensor name {n!r} is part of "
                f"{clash[0]!r}, so a mergekit filter cannot select it alone. Use non_layer: "
                "first, or export with --format hf"
            )
    return outside


def _ref(recipe: Recipe, name: str | None) -> str:
    """A source as mergekit reads it: an existing local folder as an absolute path."""
    assert name is not None
    source = recipe.model_sources()[name]
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def _wrap(lines: Sequence[str], width: int = 96) -> list[str]:
    import textwrap

    out: list[str] = []
    for line in lines:
        out.extend(textwrap.wrap(line, width) or [""])
    return out


# -- reading the base model's shape ------------------------------------------------------------
def source_folder(recipe: AnyRecipe) -> str:
    """The folder (or hub id) whose config and tensor names describe the merged model."""
    recipe = _exportable(recipe)
    plan = plan_merge(recipe, available=list(recipe.sources))
    return recipe.model_sources()[plan.base or plan.models[0]]


LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def num_hidden_layers(source: str) -> int:
    """``num_hidden_layers`` (or ``n_layer``/``num_layers``) from a model's config: a local
    folder's ``config.json`` read as JSON (no transformers import, which costs seconds), a hub
    id's through transformers."""
    from evomerge.merge.loading import locate

    location, revision, local = locate("base", source)
    if local and (Path(location) / "config.json").is_file():
        data = json.loads((Path(location) / "config.json").read_text())
        text = data.get("text_config") or data  # a multimodal model's decoder
        for key in LAYER_KEYS:
            if text.get(key) is not None:
                return int(text[key])
    else:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(location, revision=revision)
        except OSError as err:
            raise FileNotFoundError(f"cannot read the config of {source!r}: {err}") from err
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        for key in LAYER_KEYS:
            if getattr(text, key, None) is not None:
                return int(getattr(text, key))
    raise ValueError(f"{source!r}: its config has no num_hidden_layers; cannot expand per-layer "
                     "values for mergekit")


def tensor_names(source: str) -> list[str]:
    """Tensor names in a local model folder's safetensors files (headers only)."""
    from evomerge.merge.loading import locate

    location, _, local = locate("base", source)
    if not local:
        raise ValueError(
            f"non_layer: base export needs the tensor names of {source!r}; download the model "
            "and point the recipe's source at the local folder"
        )
    folder = Path(location)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    names: list[str] = []
    for file in sorted(folder.glob("*.safetensors")):
        names.extend(_safetensors_keys(file))
    if not names:
        raise FileNotFoundError(f"no *.safetensors weights in {str(folder)!r}")
    return names


def _safetensors_keys(file: Path) -> list[str]:
    """The tensor names in a safetensors file's header (8-byte length, then JSON), read
    without safetensors' torch binding."""
    with file.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return [k for k in header if k != "__metadata__"]


def export_mergekit_yaml(recipe: AnyRecipe, *, header: Sequence[str] = (),
                         tie_order: str = "mergekit") -> str:
    """:func:`mergekit_yaml` with the layer count and tensor names read from the base model
    (``tie_order``: the ``load.tie_order`` evomerge merges with);
    warns (and says so on top of the file) when stock mergekit is known not to run it. A dfs
    recipe: :func:`evomerge.dfs.passthrough.passthrough_yaml`."""
    import warnings

    if recipe.kind == "dfs":
        from evomerge.dfs.passthrough import passthrough_yaml

        return passthrough_yaml(recipe, header=header)
    source = source_folder(recipe)
    names = tensor_names(source) if _exportable(recipe).non_layer == "base" else _names(source)
    caveat = mergekit_caveat(recipe)
    if caveat:
        warnings.warn(caveat, stacklevel=2)
        header = [*header, "", "WARNING: " + caveat]
    return mergekit_yaml(recipe, num_layers=num_hidden_layers(source), tensor_names=names,
                         header=header, tie_order=tie_order)


def _names(source: str) -> list[str] | None:
    try:
        return tensor_names(source)
    except (ValueError, FileNotFoundError):  # a hub id: every filter is written
        return None


MERGEKIT_NEEDS = {
    "gpt_neox": ("gpt_neox.layers.0.attention.bias", "gpt_neox.layers.0.attention.masked_bias",
                 "gpt_neox.layers.0.attention.rotary_emb.inv_freq"),
}
"""model_type -> tensors mergekit 0.1.5's architecture definition requires (buffers that older
transformers saved and transformers 5 no longer does)."""


def mergekit_caveat(recipe: AnyRecipe) -> str | None:
    """Why stock mergekit 0.1.5 will not run ``recipe``'s models, or None (also when that
    cannot be told: the model's config or tensor names unreadable)."""
    try:
        source = source_folder(recipe)
        from evomerge.merge.loading import locate

        location, _, local = locate("base", source)
        if not local:  # a hub model: its tensors are not known here
            return None
        model_type = json.loads((Path(location) / "config.json").read_text()).get("model_type")
        names = set(tensor_names(source))
    except (OSError, ValueError):
        return None
    needed = MERGEKIT_NEEDS.get(model_type, ())
    missing = [n for n in needed if n not in names]
    if not missing:
        return None
    return (f"stock mergekit 0.1.5 does not run these {model_type} models: its architecture "
            f"definition requires tensors they lack ({', '.join(missing)}; transformers 5 no "
            "longer saves these buffers), and mergekit-yaml stops with 'Tensor ... required "
            "but not present'. This config states the merge evomerge made; use the evomerge "
            "export (--format hf) to get the weights")
