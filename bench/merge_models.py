"""Benchmark models: a random Llama base and experts = base + seeded noise, as safetensors folders.

Also turns an evomerge :class:`~evomerge.recipe.Recipe` into the same merge for mergekit 0.1.5:
a YAML-like config for ``run_merge`` (per-layer lists with exactly ``num_hidden_layers`` entries,
which mergekit reads exactly) and per-tensor parameters for its in-memory ``merge_state_dicts``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from evomerge.recipe import Recipe

SIZES: dict[str, dict[str, Any]] = {
    # ~101M parameters: 12 x 6.3M decoder layers + 2 x 12.6M embedding / head (untied)
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, vocab_size=16384),
    # ~10M parameters, for a quick check
    "10m": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=4, vocab_size=8192),
}
NOISE = 0.01  # std of the fake fine-tune delta (base weights have std 0.02)


def build_models(root: Path, k: int, *, size: str = "100m", dtype: str = "float32",
                 seed: int = 0) -> tuple[dict[str, str], dict[str, Any]]:
    """Folders ``base``, ``e0`` .. ``e{k-1}`` under ``root`` (reused when already built)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.toy.tokenizer import make_tokenizer

    stamp = {"size": size, "k": k, "dtype": dtype, "seed": seed, "noise": NOISE}
    names = ["base", *(f"e{i}" for i in range(k))]
    paths = {n: str(root / n) for n in names}
    info = {**SIZES[size], "tie_word_embeddings": False}
    stamp_file = root / "stamp.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return paths, {**info, "params": json.loads((root / "params.json").read_text())}
    tok = make_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(**info, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      architectures=["LlamaForCausalLM"], dtype=dtype)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype)).eval()
    base_sd = {key: v.detach() for key, v in model.state_dict().items()}
    for i, name in enumerate(names):
        sd = base_sd if name == "base" else _perturbed(base_sd, seed * 1000 + i)
        _save(Path(paths[name]), cfg, sd)
        tok.save_pretrained(paths[name])
    params = sum(v.numel() for v in base_sd.values())
    (root / "params.json").write_text(json.dumps(params))
    stamp_file.write_text(json.dumps(stamp))
    return paths, {**info, "params": params}


def _save(folder: Path, cfg: Any, sd: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def _perturbed(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {key: v + (torch.randn(v.shape, generator=gen) * NOISE).to(v.dtype)
            for key, v in sd.items()}


def mergekit_config(recipe: Recipe, dtype: str) -> dict[str, Any]:
    """The mergekit YAML (as a dict) for a recipe whose per-model values are per-layer tuples."""
    models = []
    for name, params in recipe.models.items():
        models.append({"model": recipe.sources[name],
                       "parameters": {k: list(v) if isinstance(v, tuple) else v
                                      for k, v in params.items()}})
    assert recipe.base_model is not None
    return {"merge_method": recipe.method, "base_model": recipe.sources[recipe.base_model],
            "models": models, "dtype": dtype, "parameters": dict(recipe.parameters)}


def mergekit_params(recipe: Recipe, tensor_names: list[str], num_layers: int) -> dict[str, Any]:
    """Per-tensor, per-model parameters for mergekit's ``merge_state_dicts``, resolved by
    evomerge's own rules so both merges use the very same coefficients."""
    from mergekit.merge_methods.base import PerGroupValues

    from evomerge.merge.reference import plan_merge, tensor_params

    plan = plan_merge(recipe, available=list(recipe.sources))
    per_key: dict[str, list[dict[str, float]]] = {}
    for name in tensor_names:
        kwargs = tensor_params(recipe, plan, name, num_layers=num_layers)
        for key in plan.spec.model_params:
            per_key.setdefault(key, []).append(dict(zip(plan.models, kwargs[key], strict=True)))
    return {key: PerGroupValues(values) for key, values in per_key.items()}
