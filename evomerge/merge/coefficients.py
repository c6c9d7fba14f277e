"""Resolve a recipe coefficient (a *Value*) to the number used for one tensor.

The rules follow mergekit 0.1.5 so an exported recipe reproduces the same weights:

- a float applies to every tensor;
- a per-group tuple ``(v0, ..., vG-1)``: decoder layer ``i`` of ``L`` takes ``v[i * G // L]``
  (with ``G == L`` this is one value per layer, which mergekit reads exactly);
- a :class:`~evomerge.recipe.Schedule` (``linear`` ``a + b * l / (L - 1)``, or ``piecewise``
  between K evenly spaced knots), clamped into its ``clamp`` if it has one; an export writes it
  as the full per-layer list (:func:`per_layer`);
- a mapping ``{"attention": v, "mlp": v, "default": v}``: the first kind one of whose
  :data:`KIND_FILTERS` is a substring of the tensor name wins (mergekit's ``filter`` rule, so the
  same filters exported select the same tensors), ``default`` otherwise;
- tensors outside the decoder layers (embeddings, final norm, ``lm_head``) read group 0 (layer 0
  of a schedule), as mergekit gives them the first element of a list; the recipe's
  ``non_layer: base`` rule, which keeps the base model's tensor instead, is applied by the
  merge, not here.

>>> resolve((0.1, 0.2), "model.layers.3.mlp.up_proj.weight", num_layers=4)
0.2
>>> resolve({"mlp": 0.5, "default": (1.0, 2.0)}, "model.layers.1.self_attn.q_proj.weight",
...         num_layers=4)
1.0
>>> resolve({"attention": 0.3, "default": 0.0}, "gpt_neox.layers.0.attention.dense.weight",
...         num_layers=4)
0.3
>>> resolve((0.1, 0.2), "lm_head.weight", num_layers=4)
0.1
>>> from evomerge.recipe import Schedule
>>> per_layer(Schedule(schedule="linear", values=(0.5, 1.0)), 5)
(0.5, 0.75, 1.0, 1.25, 1.5)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from evomerge.recipe import Schedule

# Decoder-layer containers across common architectures: model.layers.N (Llama, Mistral, Qwen),
# transformer.h.N (GPT-2), gpt_neox.layers.N, blocks.N.
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")

KIND_FILTERS: dict[str, tuple[str, ...]] = {
    # self_attn: Llama, Mistral, Qwen2, Gemma, Phi; .attention.: GPT-NeoX (the dots keep out
    # post_attention_layernorm); .attn.: GPT-2, GPT-J; .self_attention.: Falcon, Bloom.
    "attention": ("self_attn", ".attention.", ".attn.", ".self_attention."),
    "mlp": ("mlp",),
    "self_attn": ("self_attn",),  # the legacy kind name, read with its old meaning
}
"""Tensor-name substrings (mergekit ``filter`` strings) of each module kind; ``default`` takes
the tensors no other kind of the mapping matches."""

SEARCH_KINDS = ("attention", "mlp", "default")
"""The kinds a ``module_kinds: true`` search gives separate coefficients."""

ARCHITECTURES: dict[str, dict[str, str]] = {
    **{t: {"attention": "self_attn", "mlp": "mlp"} for t in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3")},
    "gpt_neox": {"attention": ".attention.", "mlp": "mlp"},
    **{t: {"attention": ".attn.", "mlp": "mlp"} for t in ("gpt2", "gptj", "gpt_bigcode")},
    **{t: {"attention": ".self_attention.", "mlp": "mlp"} for t in ("falcon", "bloom")},
}
"""model_type -> the filter each kind matches there (documentation and messages; matching uses
:data:`KIND_FILTERS`, which holds all of them)."""


@lru_cache(maxsize=65536)
def layer_index(name: str) -> int | None:
    """The decoder-layer index in a tensor name, or None for tensors outside the layers."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def layer_group(layer: int, groups: int, num_layers: int) -> int:
    """The group (0..groups-1) of ``layer`` when ``num_layers`` layers form ``groups`` blocks."""
    return layer * groups // num_layers


def kind_matches(kind: str, name: str) -> bool:
    """True if tensor ``name`` belongs to module ``kind`` (never for ``default``)."""
    return any(f in name for f in KIND_FILTERS.get(kind, ()))


def kind_of(kinds: Iterable[str], name: str) -> str | None:
    """The kind of ``kinds`` (in order, first match wins) that tensor ``name`` takes its value
    from: ``default`` if no other kind matches and ``default`` is among them, else None."""
    kinds = list(kinds)
    for kind in kinds:
        if kind != "default" and kind_matches(kind, name):
            return kind
    return "default" if "default" in kinds else None


def assign_kinds(kinds: Iterable[str], names: Iterable[str]) -> dict[str, list[str]]:
    """kind -> the tensor names that take its value (first match wins, as in a merge)."""
    kinds = list(kinds)
    out: dict[str, list[str]] = {k: [] for k in kinds}
    for name in names:
        kind = kind_of(kinds, name)
        if kind is not None:
            out[kind].append(name)
    return out


def kind_filters(kind: str, names: Iterable[str] | None = None) -> list[str]:
    """The mergekit filters for ``kind``: all of :data:`KIND_FILTERS`, or with ``names`` only
    those that select one of them (the others select nothing, so dropping them changes
    nothing)."""
    filters = list(KIND_FILTERS[kind])
    if names is None:
        return filters
    names = list(names)
    return [f for f in filters if any(f in n for n in names)]


def resolve(value: Any, name: str, *, num_layers: int) -> Any:
    """The scalar ``value`` gives tensor ``name``; None if a kind mapping has no match.

    Booleans, ints and strings are returned as they are.
    """
    if isinstance(value, Schedule):
        return schedule_at(value, layer_index(name) or 0, num_layers)
    if isinstance(value, Mapping):
        return resolve_kind(value, name, num_layers=num_layers)
    if isinstance(value, (tuple, list)):
        return _per_group(value, name, num_layers)
    return value


def resolve_kind(value: Mapping[str, Any], name: str, *, num_layers: int) -> Any:
    kind = kind_of(value, name)
    return None if kind is None else resolve(value[kind], name, num_layers=num_layers)


def schedule_at(schedule: Schedule, layer: int, num_layers: int) -> float:
    """The value of ``schedule`` at decoder layer ``layer`` of ``num_layers``, clamped.

    Knot positions are computed in integers, so a layer on a knot takes the knot's value
    exactly. A one-layer model takes the first value (``a``, or the first knot).

    >>> s = Schedule(schedule="piecewise", values=(0.0, 1.0, 0.0), clamp=(0.0, 0.8))
    >>> [schedule_at(s, i, 5) for i in range(5)]
    [0.0, 0.5, 0.8, 0.5, 0.0]
    """
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} is outside the model's {num_layers} layers")
    span = max(num_layers - 1, 1)
    v = schedule.values
    if schedule.schedule == "linear":
        value = v[0] + v[1] * layer / span
    else:
        i, rest = divmod(layer * (len(v) - 1), span)
        frac = rest / span
        value = v[i] if frac == 0 else v[i] + (v[i + 1] - v[i]) * frac
    if schedule.clamp is not None:
        value = min(max(value, schedule.clamp[0]), schedule.clamp[1])
    return float(value)


def _per_group(values: tuple[Any, ...] | list[Any], name: str, num_layers: int) -> Any:
    if not values:
        raise ValueError(f"an empty list of per-layer values was given for tensor {name!r}")
    if len(values) > num_layers:
        raise ValueError(
            f"{len(values)} per-layer-group values given but the model has {num_layers} layers; "
            f"give at most {num_layers} values"
        )
    layer = layer_index(name)
    if layer is None:
        return values[0]
    if layer >= num_layers:
        raise ValueError(f"tensor {name!r} is in layer {layer} but num_layers is {num_layers}")
    return values[layer_group(layer, len(values), num_layers)]


def per_layer(value: Any, num_layers: int) -> Any:
    """Expand per-group tuples and schedules (also inside a kind mapping) to exactly one value
    per layer.

    A mergekit list with ``num_hidden_layers`` entries reads each layer's entry exactly, so this is
    what an export writes.

    >>> per_layer((1.0, 2.0), 4)
    (1.0, 1.0, 2.0, 2.0)
    """
    if isinstance(value, Schedule):
        return tuple(schedule_at(value, i, num_layers) for i in range(num_layers))
    if isinstance(value, Mapping):
        return {kind: per_layer(sub, num_layers) for kind, sub in value.items()}
    if isinstance(value, (tuple, list)):
        return tuple(
            _per_group(value, f"model.layers.{i}.x", num_layers) for i in range(num_layers)
        )
    return value
