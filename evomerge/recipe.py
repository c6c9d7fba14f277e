"""The Recipe: one frozen, JSON-serialisable description of a merge.

A Recipe is what the search space produces, what a worker applies, what storage keeps (as a
trial attribute) and what export writes. It round-trips exactly through JSON and YAML.

Coefficient values (a *Value*) follow mergekit's conventions:

- a float: the same value for every tensor;
- a tuple of floats: one value per layer group; ``G`` groups split the ``L`` decoder layers into
  contiguous blocks, layer ``i`` takes group ``i * G // L``;
- a mapping ``{"self_attn": v, "mlp": v, "default": v}``: a value per module kind, chosen by
  substring of the tensor name, first match wins, ``default`` otherwise (each ``v`` a float or a
  per-group tuple).

Tensors outside the decoder layers (embeddings, final norm, lm_head) follow ``non_layer``:
``"first"`` gives them the first layer group's ``default`` value (what mergekit does with a list),
``"base"`` keeps the base model's tensor.

>>> r = Recipe(method="task_arithmetic", sources={"base": "b", "x": "m1"}, base_model="base",
...            models={"x": {"weight": 0.5}})
>>> Recipe.from_json(r.to_json()) == r
True
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

LayerValues = tuple[float, ...]
KindValue = float | LayerValues
Value = float | LayerValues | dict[str, KindValue]
ParamValue = bool | int | float | LayerValues | dict[str, KindValue] | str

MODULE_KINDS = ("self_attn", "mlp", "default")


class DFSPath(BaseModel):
    """A data-flow-space path: the layers a token passes through, with a scale per hop."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layers: tuple[tuple[str, int], ...] = Field(description="(model name, layer index) in order")
    scales: tuple[float, ...] = Field(description="scale applied to the hidden state per step")
    embed_from: str = Field(description="model whose embeddings, final norm and head are used")

    @model_validator(mode="after")
    def _same_length(self) -> DFSPath:
        if len(self.scales) != len(self.layers):
            raise ValueError(
                f"dfs.scales has {len(self.scales)} entries but dfs.layers has {len(self.layers)}"
            )
        return self


class Recipe(BaseModel):
    """A complete, self-contained merge recipe (see module docstring for value shapes)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str
    sources: dict[str, str] = Field(description="model name -> local path or hub id")
    base_model: str | None = None
    models: dict[str, dict[str, Value]] = Field(
        default_factory=dict, description="per-model parameters of the models being merged"
    )
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    non_layer: Literal["first", "base"] = "first"
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    seed: int = 0
    dfs: DFSPath | None = None

    @model_validator(mode="after")
    def _check_names(self) -> Recipe:
        if self.base_model is not None and self.base_model not in self.sources:
            raise ValueError(
                f"base_model {self.base_model!r} is not in sources ({', '.join(self.sources)})"
            )
        for name, params in self.models.items():
            if name not in self.sources:
                raise ValueError(f"models.{name} is not in sources ({', '.join(self.sources)})")
            for key, value in params.items():
                _check_value(f"models.{name}.{key}", value)
        return self

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _plain(self.model_dump(mode="json", exclude_none=True))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        return cls.model_validate(dict(data))

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError(
                "a recipe YAML must be a mapping with at least 'method' and 'sources'"
            )
        return cls.from_dict(data)

    @property
    def hash(self) -> str:
        """Stable content hash (sha256 of the canonical JSON), 16 hex digits."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def __hash__(self) -> int:
        return hash(self.to_json())


def _check_value(where: str, value: Any) -> None:
    if isinstance(value, dict):
        unknown = set(value) - set(MODULE_KINDS)
        if unknown:
            raise ValueError(
                f"{where} has unknown module kind(s) {sorted(unknown)}; allowed: {MODULE_KINDS}"
            )
    elif isinstance(value, tuple) and not value:
        raise ValueError(f"{where} is an empty list; give at least one value")


def _plain(obj: Any) -> Any:
    """Tuples -> lists so YAML/JSON dumps are plain (pydantic turns them back into tuples)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
