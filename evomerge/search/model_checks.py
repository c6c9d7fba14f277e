"""Preflight of a job's models: folders (config.json, weights, tokenizer, safetensors headers)
or hub ids (the local cache offline, the hub online), one architecture and the same tensors,
and ``layer_groups`` within the layer count. Reads no weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.config import JobConfig
from evomerge.merge.loading import (
    SAFETENSORS_INDEX,
    TOKENIZER_FILES,
    check_same_tensors,
    check_weight_files,
    locate,
    parse_source,
    safetensors_shapes,
)
from evomerge.strict import ConfigError, MachineError

HUB_TIMEOUT_S = 10.0


@dataclass
class ModelInfo:
    key: str
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]] | None  # None: weights not local or pickle-only


def _model_key(name: str) -> str:
    return "models.base.path" if name == "base" else f"models.experts.{name}.path"


def check_models(job: JobConfig, *, skip: Callable[[str], bool],
                 machine: Callable[..., Any]) -> None:
    """Every model folder or hub id of ``job``, then their agreement and ``layer_groups``.

    ``skip(location)`` leaves a model out (e.g. in a toy suite not built yet); hub checks run
    through ``machine(check, *args)``, which raises or notes a :class:`MachineError`."""
    infos: dict[str, ModelInfo] = {}
    for name, source in job.models.sources().items():
        key = _model_key(name)
        location, revision = parse_source(source)
        if skip(location):
            continue
        try:
            where, revision, local = locate(name, source)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"{key}: {err}") from None
        info = (
            _local_model(key, name, Path(where), allow_pickle=job.load.allow_pickle)
            if local
            else machine(_hub_model, key, where, revision)
        )
        if info is not None:
            infos[name] = info
    _check_agreement(job, infos)


def _local_model(key: str, name: str, folder: Path, *, allow_pickle: bool) -> ModelInfo:
    config = _read_json(key, folder / "config.json")
    try:
        check_weight_files(name, folder, allow_pickle=allow_pickle)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"{key}: {err}") from None
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(
            f"{key}: {str(folder)!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer into the model folder (tokenizer.save_pretrained)"
        )
    has_safetensors = (folder / SAFETENSORS_INDEX).is_file() or any(folder.glob("*.safetensors"))
    try:
        shapes = safetensors_shapes(folder) if has_safetensors else None
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"{key}: {err}") from None
    return ModelInfo(key, config, shapes)


def _read_json(key: str, path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"{key}: {str(path)!r} is not valid JSON ({err}); save the model again with "
            "save_pretrained"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: {str(path)!r} is not a JSON object; save the model again")
    return data


def _hub_model(key: str, repo: str, revision: str | None) -> ModelInfo | None:
    """A hub id must be in the local cache when offline, or known to the hub when online."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "config.json", revision=revision)
    if isinstance(cached, str):
        return ModelInfo(key, _read_json(key, Path(cached)), None)
    at = f" at revision {revision!r}" if revision else ""
    if _hub_offline(constants):
        raise MachineError(
            f"{key}: {repo!r} is no local folder, and as a hub model{at} it is not in the "
            f"local Hugging Face cache while HF_HUB_OFFLINE is set; download it first "
            f"(huggingface-cli download {repo}) or give a local folder"
        )
    _ask_hub(key, repo, revision, at)
    return None


def _hub_offline(constants: Any) -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE or env)


def _ask_hub(key: str, repo: str, revision: str | None, at: str) -> None:
    from huggingface_hub import model_info
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        model_info(repo, revision=revision, timeout=HUB_TIMEOUT_S)
    except RevisionNotFoundError:
        raise ConfigError(
            f"{key}: hub model {repo!r} has no revision {revision!r}; fix the @revision"
        ) from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"{key}: hub model {repo!r} does not exist or needs a token (huggingface-cli "
            "login); fix the id or give a local folder"
        ) from None
    except Exception as err:  # no network, DNS, timeout, proxy: all mean "cannot fetch it"
        raise MachineError(
            f"{key}: cannot reach the Hugging Face hub for {repo!r}{at} "
            f"({type(err).__name__}); check the network, or download it and set "
            "HF_HUB_OFFLINE=1"
        ) from None


def _check_agreement(job: JobConfig, infos: dict[str, ModelInfo]) -> None:
    """Same architecture and tensors as the anchor (the base, else the first expert); for a
    dfs search, layers that can be chained (:mod:`evomerge.search.dfs_checks`)."""
    if job.search.space.name == "dfs":
        from evomerge.search.dfs_checks import check_dfs_models

        return check_dfs_models(job, infos)
    anchor = next(iter(job.models.sources()))
    ref = infos.get(anchor)
    if ref is None:
        return
    for name, info in infos.items():
        if name == anchor:
            continue
        want, got = _arch(ref.config), _arch(info.config)
        if want != got:
            raise ConfigError(
                f"{info.key}: model {name!r} is {got[0]} {list(got[1])} but {anchor!r} is "
                f"{want[0]} {list(want[1])}; models to merge must share one architecture"
            )
        if ref.shapes is not None and info.shapes is not None:
            try:
                check_same_tensors(anchor, ref.shapes, name, info.shapes)
            except ValueError as err:
                raise ConfigError(f"{info.key}: {err}") from None
    _check_layer_groups(job, ref.config)
    _check_module_kinds(job, ref)


def _arch(config: dict[str, Any]) -> tuple[Any, tuple[Any, ...]]:
    return config.get("model_type"), tuple(config.get("architectures") or ())


def _check_layer_groups(job: JobConfig, config: dict[str, Any]) -> None:
    groups = getattr(job.search.space, "layer_groups", 1)
    nested = config.get("text_config")
    text: dict[str, Any] = nested if isinstance(nested, dict) else config
    layers = next((text[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in text),
                  None)
    if isinstance(layers, int) and groups > layers:
        raise ConfigError(
            f"search.space.layer_groups: {groups} but the models have {layers} layers; use at "
            f"most {layers}"
        )
    knots = getattr(getattr(job.search.space, "schedule", None), "knots", None)
    if isinstance(layers, int) and knots is not None and knots > layers:
        raise ConfigError(
            f"search.space.schedule.knots: {knots} but the models have {layers} layers; use at "
            f"most {layers}"
        )


def _check_module_kinds(job: JobConfig, ref: ModelInfo) -> None:
    """With ``module_kinds``, every kind must take the value of some tensor of the models."""
    from evomerge.merge.coefficients import (
        ARCHITECTURES,
        KIND_FILTERS,
        SEARCH_KINDS,
        assign_kinds,
        layer_index,
    )

    space = job.search.space
    if not getattr(space, "module_kinds", False) or ref.shapes is None:
        return
    names = [n for n in ref.shapes
             if space.non_layer == "first" or layer_index(n) is not None]  # type: ignore[union-attr]
    for kind, matched in assign_kinds(SEARCH_KINDS, names).items():
        if matched:
            continue
        model_type = ref.config.get("model_type")
        sample = next((n for n in names if layer_index(n) == 0), "?")
        known = ARCHITECTURES.get(str(model_type), {}).get(kind)
        why = (f"evomerge matches {kind} by {list(KIND_FILTERS.get(kind, ()))}"
               if known is None else f"{model_type} names it {known!r}")
        raise ConfigError(
            f"search.space.module_kinds: kind {kind!r} matches no tensor of {ref.key} "
            f"(model_type {model_type}, layer tensors like {sample!r}; {why}), so its "
            "coefficients would do nothing; set module_kinds: false"
        )
