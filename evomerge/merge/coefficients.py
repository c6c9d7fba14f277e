"""Resolve a recipe coefficient (a *Value*) to the number used for one tensor.

The rules follow mergekit 0.1.5 so an exported recipe reproduces the same weights:

- a float applies to every tensor;
- a per-group tuple ``(v0, ..., vG-1)``: decoder layer ``i`` of ``L`` takes ``v[i * G // L]``
  (with ``G == L`` this is one value per layer, which mergekit reads exactly);
- a mapping ``{"self_attn": v, "mlp": v, "default": v}``: the first kind whose name is a
  substring of the tensor name wins (mergekit's ``filter``), ``default`` otherwise;
- tensors outside the decoder layers (embeddings, final norm, ``lm_head``) read group 0, as
  mergekit gives them the first element of a list; the recipe's ``non_layer: base`` rule, which
  keeps the base model's tensor instead, is applied by the merge, not here.

>>> resolve((0.1, 0.2), "model.layers.3.mlp.up_proj.weight", num_layers=4)
0.2
>>> resolve({"mlp": 0.5, "default": (1.0, 2.0)}, "model.layers.1.self_attn.q_proj.weight",
...         num_layers=4)
1.0
>>> resolve((0.1, 0.2), "lm_head.weight", num_layers=4)
0.1
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

# Decoder-layer containers across common architectures: model.layers.N (Llama, Mistral, Qwen),
# transformer.h.N (GPT-2), gpt_neox.layers.N, blocks.N.
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


@lru_cache(maxsize=65536)
def layer_index(name: str) -> int | None:
    """The decoder-layer index in a tensor name, or None for tensors outside the layers."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def layer_group(layer: int, groups: int, num_layers: int) -> int:
    """The group (0..groups-1) of ``layer`` when ``num_layers`` layers form ``groups`` blocks."""
    return layer * groups // num_layers


def resolve(value: Any, name: str, *, num_layers: int) -> Any:
    """The scalar ``value`` gives tensor ``name``; None if a kind mapping has no match.

    Booleans, ints and strings are returned as they are.
    """
    if isinstance(value, Mapping):
        return resolve_kind(value, name, num_layers=num_layers)
    if isinstance(value, (tuple, list)):
        return _per_group(value, name, num_layers)
    return value


def resolve_kind(value: Mapping[str, Any], name: str, *, num_layers: int) -> Any:
    for kind, sub in value.items():
        if kind != "default" and kind in name:
            return resolve(sub, name, num_layers=num_layers)
    if "default" in value:
        return resolve(value["default"], name, num_layers=num_layers)
    return None


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
    """Expand per-group tuples (also inside a kind mapping) to exactly one value per layer.

    A mergekit list with ``num_hidden_layers`` entries reads each layer's entry exactly, so this is
    what an export writes.

    >>> per_layer((1.0, 2.0), 4)
    (1.0, 1.0, 2.0, 2.0)
    """
    if isinstance(value, Mapping):
        return {kind: per_layer(sub, num_layers) for kind, sub in value.items()}
    if isinstance(value, (tuple, list)):
        return tuple(
            _per_group(value, f"model.layers.{i}.x", num_layers) for i in range(num_layers)
        )
    return value
