"""Preflight of a dfs search's models: a path chains their layers, so they must share the
architecture, the hidden size and the attention head size, and be of a type the dfs engine
chains; their layer counts and other tensor shapes may differ (reads config.json only).
"""

from __future__ import annotations

from typing import Any

from evomerge.config import DFSSpaceConfig, JobConfig, default_dfs_models
from evomerge.strict import ConfigError


def chain_values(config: dict[str, Any]) -> dict[str, Any]:
    """What two models' layers must agree on to follow each other, from a config.json."""
    nested = config.get("text_config")
    text: dict[str, Any] = nested if isinstance(nested, dict) else config
    hidden, heads = text.get("hidden_size"), text.get("num_attention_heads")
    head_dim = text.get("head_dim") or (hidden // heads if hidden and heads else None)
    return {
        "architecture": [config.get("model_type"), *(config.get("architectures") or [])],
        "hidden_size": hidden,
        "head_dim": head_dim,
    }


def check_dfs_models(job: JobConfig, infos: dict[str, Any]) -> None:
    """ConfigError on one line, naming the model's key, unless the models of the dfs space
    (``infos``: name -> :class:`~evomerge.search.model_checks.ModelInfo` of those checked) can be
    chained."""
    space = job.search.space
    assert isinstance(space, DFSSpaceConfig)
    names = [n for n in default_dfs_models(space, job.models) if n in infos]
    _check_supported(names, infos)
    if len(names) >= 2:
        _check_chainable(names, infos)
    if all(n in infos for n in default_dfs_models(space, job.models) if n not in space.recipes):
        from evomerge.search_spaces.dfs import DFSSpace

        try:  # layer counts against max_path_length; recipe files
            DFSSpace(space, models=job.models)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def _check_chainable(names: list[str], infos: dict[str, Any]) -> None:
    anchor, want = names[0], chain_values(infos[names[0]].config)
    for name in names[1:]:
        got = chain_values(infos[name].config)
        for key, value in got.items():
            if value != want[key]:
                shown = " ".join(map(str, value)) if key == "architecture" else value
                ref = " ".join(map(str, want[key])) if key == "architecture" else want[key]
                raise ConfigError(
                    f"{infos[name].key}: model {name!r} has {key} {shown} but {anchor!r} (model "
                    f"A) has {ref}; a dfs path chains layers of models of one architecture and "
                    "hidden size: pick such models in search.space.models"
                )


def _check_supported(names: list[str], infos: dict[str, Any]) -> None:
    from evomerge.dfs.sources import SUPPORTED

    for name in names:
        kind = infos[name].config.get("model_type")
        if kind not in SUPPORTED:
            raise ConfigError(
                f"{infos[name].key}: model {name!r} is a {kind!r} model; the dfs engine chains "
                f"{', '.join(SUPPORTED)} (Llama-style decoder layers); pick models of those types"
            )
