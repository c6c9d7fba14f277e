"""Source models of a DFS path: loaded once, checked chainable, their layers addressable.

A source is a model folder or hub id, or an inline ps recipe (PS-then-DFS), materialised once
with the ps engine (:class:`~evomerge.merge.workspace.Workspace`); the Workspace is dropped and
its merged model kept. Layers of different models can follow each other only if they share the
architecture and the residual width, so :func:`check_chainable` refuses anything else up front.

Only decoder-only models laid out like Llama (``model.layers``, ``model.embed_tokens``,
``model.norm``, ``model.rotary_emb``, ``lm_head``; attention at ``layer.self_attn`` with a
``layer_idx``) are supported: :data:`SUPPORTED` lists the model types tested.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from evomerge.config import LoadConfig
from evomerge.recipe import Recipe

SUPPORTED = ("llama", "qwen2")
"""Model types whose layers the DFS engine and export chain (tested on both)."""

CHAIN_KEYS = ("model_type", "hidden_size", "head_dim")
"""Config values two models must share for one's layers to follow the other's."""


@dataclass
class Source:
    """One loaded source: its model (eval mode) and tokenizer."""

    model: Any
    tokenizer: Any

    @property
    def layers(self) -> Any:
        return self.model.model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def load_source(name: str, source: str | Recipe, *, load: LoadConfig) -> Source:
    """Load source ``name``: a folder or hub id, or an inline ps recipe merged once."""
    import torch

    from evomerge.merge.loading import load_model, load_tokenizer
    from evomerge.merge.reference import DTYPES

    if isinstance(source, str):
        return Source(load_model(name, source, load=load),
                      load_tokenizer(name, source, load=load))
    from evomerge.merge.workspace import Workspace

    workspace = Workspace.from_recipe(source, load=load)
    model = workspace.apply(source)
    tokenizer = workspace.tokenizer
    del workspace  # frees the anchor copy and task vectors; the merged model stays
    with torch.no_grad():
        model = model.to(dtype=DTYPES[load.dtype])
    return Source(model.eval(), tokenizer)


def chain_values(cfg: Any) -> dict[str, Any]:
    """The :data:`CHAIN_KEYS` of a model config (``head_dim`` derived when not stored)."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"model_type": cfg.model_type, "hidden_size": cfg.hidden_size, "head_dim": head_dim}


def check_supported(name: str, cfg: Any) -> None:
    """ValueError unless the config's architecture is one the DFS engine chains."""
    model_type = cfg.model_type
    if model_type not in SUPPORTED:
        raise ValueError(
            f"model {name!r} is a {model_type!r} model; the dfs engine supports "
            f"{', '.join(SUPPORTED)} (Llama-style decoder layers); pick models of those types"
        )


def check_chainable(configs: Mapping[str, Any]) -> None:
    """ValueError naming both models and both values if two configs differ in a
    :data:`CHAIN_KEYS` value (their layers could not follow each other)."""
    items = list(configs.items())
    ref_name, ref = items[0]
    want = chain_values(ref)
    for name, model in items[1:]:
        got = chain_values(model)
        for key in CHAIN_KEYS:
            if got[key] != want[key]:
                raise ValueError(
                    f"model {name!r} has {key} {got[key]!r} but model {ref_name!r} has "
                    f"{want[key]!r}; the layers of a dfs path must come from models of one "
                    "architecture and hidden size"
                )


def load_sources(sources: Mapping[str, str | Recipe], *, load: LoadConfig) -> dict[str, Source]:
    """Load every source once; configs of the model folders are checked (supported,
    chainable) before any weights load, every loaded model again after."""
    if not sources:
        raise ValueError("sources is empty; give at least one model")
    configs = {n: source_config(n, s, load=load) for n, s in sources.items()
               if isinstance(s, str)}
    _check_all(configs)
    loaded = {name: load_source(name, source, load=load) for name, source in sources.items()}
    _check_all({n: s.model.config for n, s in loaded.items()})
    return loaded


def _check_all(configs: Mapping[str, Any]) -> None:
    for name, cfg in configs.items():
        check_supported(name, cfg)
    if configs:
        check_chainable(configs)


def source_config(name: str, source: str, *, load: LoadConfig) -> Any:
    """The config of model ``name`` (reads config.json only)."""
    import transformers

    from evomerge.merge.loading import locate

    location, revision, _ = locate(name, source)
    opts: dict[str, Any] = {"trust_remote_code": load.trust_remote_code}
    if revision is not None:
        opts["revision"] = revision
    return transformers.AutoConfig.from_pretrained(location, **opts)
