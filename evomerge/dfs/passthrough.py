"""A DFS path as a mergekit ``passthrough`` config (slices with per-slice ``scale``).

mergekit 0.1.5's passthrough takes a per-input ``scale`` (``merge_methods/passthrough.py``:
``tensor * scale``) resolved per tensor through ``{filter, value}`` entries (a substring of the
tensor name, first match wins, no match: unscaled). So the plain model of
:mod:`evomerge.dfs.export` is one slice per run of slots: ``o_proj``/``down_proj`` scaled by
``1 / P_t``, the layer norms by ``-1`` where ``P_t < 0``. mergekit takes the embeddings from the
first slice's model and the final norm and head from the last slice's, so an empty slice
(``layer_range: [0, 0]``) of ``embed_from`` opens and closes the list when needed (the closing
one carries the final norm's sign); ``base_model: embed_from`` makes its config and tokenizer the
output's. Consecutive slots of consecutive layers of one model share a slice when the running
product does not change between them (their scales are 1).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from evomerge.dfs.export import cumulative_scales
from evomerge.recipe import DFSRecipe


def passthrough_config(recipe: DFSRecipe) -> dict[str, Any]:
    """The mergekit config dict that writes ``recipe``'s path as a plain model."""
    inline = [n for n, s in recipe.sources.items() if not isinstance(s, str)]
    if inline:
        raise ValueError(
            f"source {inline[0]!r} is an inline recipe, which a mergekit config cannot name; "
            "write it out with `evomerge merge INNER.yaml DIR`, name DIR as the source and "
            "export again (or export with --format hf)")
    p = cumulative_scales(recipe.scales)
    runs = _runs(recipe.layers, p)
    slices: list[dict[str, Any]] = []
    if recipe.layers[0][0] != recipe.embed_from:
        slices.append(_slice(recipe, recipe.embed_from, 0, 0, []))
    for name, start, stop, scale in runs:
        slices.append(_slice(recipe, name, start, stop, _layer_scale(scale)))
    if recipe.layers[-1][0] != recipe.embed_from or p[-1] < 0:
        final = [{"filter": "model.norm.", "value": -1.0}] if p[-1] < 0 else []
        slices.append(_slice(recipe, recipe.embed_from, 0, 0, final))
    return {"merge_method": "passthrough", "base_model": recipe.sources[recipe.embed_from],
            "slices": slices, "dtype": recipe.dtype or "float32"}


def passthrough_yaml(recipe: DFSRecipe, *, header: Sequence[str] = ()) -> str:
    """:func:`passthrough_config` as YAML text with ``header`` lines as comments on top; warns
    (and says so on top) when stock mergekit is known not to run it (:func:`depth_caveat`)."""
    config = passthrough_config(recipe)
    caveat = depth_caveat(recipe)
    if caveat:
        warnings.warn(caveat, stacklevel=2)
        header = [*header, "", "WARNING: " + caveat]
    comment = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header)
    return comment + yaml.safe_dump(config, sort_keys=False, width=99)


def depth_caveat(recipe: DFSRecipe) -> str | None:
    """Why mergekit 0.1.5 cannot write this path, or None: it keeps the donor config's
    ``layer_types`` (one per original layer) while setting ``num_hidden_layers`` to the path
    length, which transformers 5 refuses to save (Qwen2 configs carry ``layer_types``)."""
    folder = Path(str(recipe.sources[recipe.embed_from]))
    try:
        types = json.loads((folder / "config.json").read_text()).get("layer_types")
    except (OSError, ValueError):
        return None
    if types is None or len(types) == len(recipe.layers):
        return None
    return (f"mergekit 0.1.5 cannot write this {len(recipe.layers)}-layer path: it keeps the "
            f"{len(types)} layer_types of the config of {recipe.embed_from!r}, and transformers 5 "
            f"stops mergekit-yaml with '`num_hidden_layers` ({len(recipe.layers)}) must be "
            f"equal to the number of `layer_types` ({len(types)})'. This config states the "
            "path; use the evomerge export (--format hf) to get the weights")


def _runs(layers: Sequence[tuple[str, int]], p: Sequence[float]
          ) -> list[tuple[str, int, int, float]]:
    """``(model, first layer, end layer, P)`` per run of slots one slice can hold."""
    runs: list[tuple[str, int, int, float]] = []
    for (name, index), scale in zip(layers, p, strict=True):
        if runs and runs[-1][0] == name and runs[-1][2] == index and runs[-1][3] == scale:
            runs[-1] = (name, runs[-1][1], index + 1, scale)
        else:
            runs.append((name, index, index + 1, scale))
    return runs


def _layer_scale(p: float) -> list[dict[str, Any]]:
    if p == 1.0:
        return []
    conds: list[dict[str, Any]] = [{"filter": "o_proj", "value": 1.0 / p},
                                   {"filter": "down_proj", "value": 1.0 / p}]
    if p < 0:
        conds += [{"filter": "input_layernorm", "value": -1.0},
                  {"filter": "post_attention_layernorm", "value": -1.0}]
    return conds


def _slice(recipe: DFSRecipe, name: str, start: int, stop: int,
           scale: list[dict[str, Any]]) -> dict[str, Any]:
    source: dict[str, Any] = {"model": recipe.sources[name], "layer_range": [start, stop]}
    if scale:
        source["parameters"] = {"scale": scale}
    return {"sources": [source]}
