"""A DFS path written as a plain model of the same architecture (no custom code).

RMSNorm and LayerNorm ignore the scale of their input (up to ``eps``): ``norm(c x) = sign(c)
norm(x)``. With ``P_t = scales[0] * ... * scales[t]``, the engine's stream leaving slot ``t`` is
``h_t``; a stock model whose slot ``t`` is layer ``layers[t]`` with its residual-writing
projections (``o_proj``, ``down_proj``, weight and bias) divided by ``P_t`` carries ``h_t / P_t``
instead: slot ``t`` receives ``h_{t-1} / P_{t-1} = (scales[t] h_{t-1}) / P_t``, i.e. the engine's
input to slot ``t`` over ``P_t``; its norms see the same direction, and what it adds is the
engine's update over ``P_t``. Every norm therefore sees its engine input times ``1 / P_t`` and
its output is unchanged (a negative ``P_t`` flips the sign, undone by negating that slot's norm
weights, and the final norm's for ``P_{T-1}``). The embeddings are untouched (so tied heads stay
tied). What remains is ``eps``: ``norm(x / P) = x / sqrt(mean(x^2) + eps P^2)``, a relative change
of about ``eps (P^2 - 1) / (2 mean(x^2))`` per norm.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evomerge.config import LoadConfig
from evomerge.dfs.engine import DFSEngine
from evomerge.dfs.path_model import layer_type, path_config
from evomerge.recipe import DFSRecipe

RESIDUAL_WRITERS = ("self_attn.o_proj.", "mlp.down_proj.")
"""Per-layer modules whose output is added to the residual stream (Llama, Qwen2)."""
LAYER_NORMS = ("input_layernorm.", "post_attention_layernorm.")
FINAL_NORM = "model.norm."
LAYERS = "model.layers."


def cumulative_scales(scales: Sequence[float]) -> list[float]:
    """``P_t = scales[0] * ... * scales[t]`` for every slot (in float64)."""
    out, p = [], 1.0
    for s in scales:
        p *= float(s)
        out.append(p)
    bad = [t for t, p in enumerate(out) if p == 0.0 or not math.isfinite(p)]
    if bad:
        raise ValueError(
            f"the product of scales[0..{bad[0]}] is {out[bad[0]]}; a DFS path can be exported "
            "only with non-zero scales whose product stays finite")
    return out


def slot_factor(suffix: str, p: float) -> float:
    """The factor on tensor ``model.layers.N.<suffix>`` of a slot with running product ``p``."""
    if suffix.startswith(RESIDUAL_WRITERS):
        return 1.0 / p
    if suffix.startswith(LAYER_NORMS):
        return 1.0 if p > 0 else -1.0
    return 1.0


def path_state_dict(recipe: DFSRecipe, states: Mapping[str, Mapping[str, Tensor]]
                    ) -> dict[str, Tensor]:
    """The state dict of the plain model equal to ``recipe``'s path, from the sources' state
    dicts (``states[name]``); every tensor is a fresh copy. The embeddings (and a tied head)
    are ``embed_from``'s as they are."""
    p = cumulative_scales(recipe.scales)
    embed = states[recipe.embed_from]
    out = {k: v.clone() for k, v in embed.items() if not k.startswith(LAYERS)}
    if p[-1] < 0:
        for k in out:
            if k.startswith(FINAL_NORM) and k.endswith(".weight"):
                out[k] = -out[k]
    for t, (name, index) in enumerate(recipe.layers):
        prefix = f"{LAYERS}{index}."
        for key, tensor in states[name].items():
            if key.startswith(prefix):
                suffix = key[len(prefix):]
                out[f"{LAYERS}{t}.{suffix}"] = _scaled(tensor, slot_factor(suffix, p[t]))
    return out


def _scaled(tensor: Tensor, factor: float) -> Tensor:
    if factor == 1.0:
        return tensor.clone()
    return (tensor.double() * factor).to(tensor.dtype)


def export_model(engine: DFSEngine, recipe: DFSRecipe) -> Any:
    """The plain ``*ForCausalLM`` (stock class, new weights) equal to ``recipe``'s path."""
    engine.check(recipe)
    embed = engine.loaded[recipe.embed_from].model
    types = [layer_type(engine.loaded[n].model.config, i) for n, i in recipe.layers]
    cfg = path_config(embed.config, types)
    states = {n: engine.loaded[n].model.state_dict()
              for n in {recipe.embed_from, *(n for n, _ in recipe.layers)}}
    with torch.device("meta"):
        model = type(embed)(cfg)
    model.load_state_dict(path_state_dict(recipe, states), strict=True, assign=True)
    model.model.rotary_emb = copy.deepcopy(embed.model.rotary_emb)  # buffers not in state dicts
    model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"exported tensors left unset: {left[:3]}"
    model.generation_config = copy.deepcopy(embed.generation_config)
    return model.eval()


def write_hf_folder(recipe: DFSRecipe, out: str | Path, *,
                    load: LoadConfig | None = None) -> Path:
    """Write ``recipe``'s path as a Hugging Face folder (safetensors, config, tokenizer) that
    stock ``AutoModelForCausalLM.from_pretrained`` loads; returns ``out``. Callers writing a
    user's path go through :mod:`evomerge.runs.guard` (``evomerge export``/``merge`` do)."""
    out = Path(out)
    engine = DFSEngine.from_recipe(recipe, load=load)
    model = export_model(engine, recipe)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    engine.loaded[recipe.embed_from].tokenizer.save_pretrained(out)
    return out
