"""The model a DFS path describes, built from already-loaded layers (no weight copies).

The embed_from model's own ``*ForCausalLM`` class is instantiated as an empty shell (on the
meta device, so nothing is allocated) with ``num_hidden_layers`` = the path length, and gets the
embed_from model's embeddings, rotary embedding, final norm and head, and a ``ModuleList`` of
:class:`SlotLayer` wrappers around the loaded decoder layers. The stock forward then does the
rest: position ids, the causal/padding mask (``create_causal_mask`` with the shell's config),
one KV-cache entry per slot (``DynamicCache(config=...)`` sizes it from ``num_hidden_layers``
and ``layer_types``), ``generate()``. A wrapper scales the hidden state entering its slot
and sets the shared attention module's ``layer_idx`` to the slot for the call (restoring it
after), so a layer used twice writes two cache entries and the source model still runs as it
was. Shared layers mean one path model at a time may run (the engine's contract: a model is
valid until the next ``apply``). ``output_hidden_states`` and ``output_attentions`` are not
recorded on a path model (they come back empty); the exported plain model
(:mod:`evomerge.dfs.export`) records them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class SlotLayer(nn.Module):
    """Slot ``slot`` of a path: ``layer(scale * hidden_states)`` as KV-cache entry ``slot``."""

    def __init__(self, layer: nn.Module, slot: int, scale: float) -> None:
        super().__init__()
        self.layer = layer
        self.slot = slot
        self.scale = float(scale)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.scale != 1.0:  # x * 1.0 would only copy
            hidden_states = hidden_states * self.scale
        # The layer may serve several slots (and its own model): during this call its cache
        # entry is this slot's; its own index is put back after.
        attn: Any = self.layer.self_attn
        own, attn.layer_idx = attn.layer_idx, self.slot
        try:
            return self.layer(hidden_states, *args, **kwargs)
        finally:
            attn.layer_idx = own

    def extra_repr(self) -> str:
        return f"slot={self.slot}, scale={self.scale:g}"


def path_config(embed_config: Any, layer_types: Sequence[str]) -> Any:
    """``embed_config`` with one decoder layer per slot of a path whose layers have
    ``layer_types`` (attention kinds, e.g. ``full_attention``)."""
    cfg = copy.deepcopy(embed_config)
    cfg.num_hidden_layers = len(layer_types)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = list(layer_types)
    return cfg


def layer_type(config: Any, index: int) -> str:
    """The attention kind of decoder layer ``index`` of a model with ``config``."""
    types = getattr(config, "layer_types", None)
    return str(types[index]) if types is not None else "full_attention"


def build_path_model(embed_model: Any, layers: Sequence[nn.Module], layer_types: Sequence[str],
                     scales: Sequence[float]) -> Any:
    """A ``type(embed_model)`` running ``layers`` in order, ``scales[t]`` multiplying the
    hidden state entering slot ``t``, with ``embed_model``'s embeddings, norm and head."""
    if not len(layers) == len(layer_types) == len(scales):
        raise ValueError(f"{len(layers)} layers, {len(layer_types)} layer types and "
                         f"{len(scales)} scales; give one of each per slot")
    cfg = path_config(embed_model.config, layer_types)
    with torch.device("meta"):
        shell = type(embed_model)(cfg)
    inner, src = shell.model, embed_model.model
    inner.embed_tokens = src.embed_tokens
    inner.rotary_emb = src.rotary_emb
    inner.norm = src.norm
    inner.layers = nn.ModuleList(
        SlotLayer(layer, t, s) for t, (layer, s) in enumerate(zip(layers, scales, strict=True)))
    shell.lm_head = embed_model.lm_head
    shell.generation_config = copy.deepcopy(embed_model.generation_config)
    # transformers records output_hidden_states/attentions with forward hooks it installs on
    # every decoder layer it finds: here they are shared (twice if used twice, again for each
    # candidate). Marking the decoder as hooked keeps them off; such outputs come back empty.
    inner._output_capturing_hooks_installed = True
    left = [n for n, t in [*shell.named_parameters(), *shell.named_buffers()] if t.is_meta]
    assert not left, f"path model tensors left unset: {left[:3]}"
    return shell.eval()
