"""The Recipe: one frozen, JSON-serialisable description of a merge, of one of two kinds.

A recipe is what the search space produces, what a worker applies, what storage keeps (as a
trial attribute) and what export writes. It round-trips exactly through JSON and YAML. Its
``kind`` tags it:

- ``ps`` (:class:`Recipe`): a parameter-space merge, ``method`` over ``sources`` with per-model
  and global coefficients. Written without a ``kind`` key, so recipes stay byte-identical to
  those stored before kinds existed (same hash, same exported YAML); a dict without ``kind`` is
  a ps recipe.
- ``dfs`` (:class:`DFSRecipe`): a data-flow path (DESIGN.md section 4): the decoder layers a
  token passes through, as ``(source, layer index)`` slots, one scale per slot, and the source
  whose embeddings, final norm and head are used.

A source names a model (a local path or hub id) or is an inline ps recipe, whose merged model is
that source (PS-then-DFS). Load any kind with :meth:`Recipe.from_dict` (``from_json``,
``from_yaml``): it returns the kind the data names. Whether a kind can be merged is up to the
engines (:mod:`evomerge.engines`), not to this module.

Coefficient values (a *Value*) follow mergekit's conventions:

- a float: the same value for every tensor;
- a tuple of floats: one value per layer group; ``G`` groups split the ``L`` decoder layers into
  contiguous blocks, layer ``i`` takes group ``i * G // L``;
- a schedule over depth ``{"schedule": "linear", "values": [a, b]}`` (layer ``l`` of ``L`` takes
  ``a + b * l / (L - 1)``, LiNeS) or ``{"schedule": "piecewise", "values": [v0, ..., vK-1]}``
  (K evenly spaced knots, linear between them), optionally ``"clamp": [low, high]`` (see
  :class:`Schedule`);
- a mapping ``{"attention": v, "mlp": v, "default": v}``: a value per module kind, matched by
  the kind's tensor-name filters (:data:`evomerge.merge.coefficients.KIND_FILTERS`, per
  architecture), first match wins, ``default`` otherwise (each ``v`` a float, a per-group tuple
  or a schedule). ``self_attn``, the name before architecture-aware kinds, is still read with
  its old meaning (tensor names containing ``self_attn``: the attention kind of Llama, Mistral,
  Qwen2, Gemma and Phi).

Tensors outside the decoder layers (embeddings, final norm, lm_head) follow ``non_layer``:
``"first"`` gives them the first layer group's ``default`` value (what mergekit does with a list),
``"base"`` keeps the base model's tensor.

>>> r = Recipe(method="task_arithmetic", sources={"base": "b", "x": "m1"}, base_model="base",
...            models={"x": {"weight": 0.5}})
>>> Recipe.from_json(r.to_json()) == r, r.kind
(True, 'ps')
>>> d = Recipe.from_dict({"kind": "dfs", "sources": {"m": r.to_dict(), "y": "m2"},
...                       "layers": [["m", 0], ["y", 0], ["m", 1]], "scales": [1, 0.9, 1],
...                       "embed_from": "m"})
>>> type(d).__name__, Recipe.from_yaml(d.to_yaml()) == d
('DFSRecipe', True)
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.registry import unknown_name_message

Dtype = Literal["float32", "float16", "bfloat16"]

MODULE_KINDS = ("attention", "mlp", "default", "self_attn")  # self_attn: the legacy name
SCHEDULES = ("linear", "piecewise")


class Schedule(BaseModel):
    """A coefficient as a function of depth instead of one value per layer group.

    ``linear``: ``values = (a, b)``, layer ``l`` of ``L`` takes ``a + b * l / (L - 1)`` (LiNeS,
    ICLR 2025). ``piecewise``: ``values = (v0, ..., vK-1)``, K >= 2 knots at evenly spaced depths
    (the first and last layer included), linear between them. ``clamp = (low, high)``: every
    resolved value is clamped into it (the search space writes its search bounds there). Tensors
    outside the decoder layers take layer 0's value (see :mod:`evomerge.merge.coefficients`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    schedule: Literal["linear", "piecewise"]
    values: tuple[float, ...]
    clamp: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _shape(self) -> Schedule:
        n = len(self.values)
        if self.schedule == "linear" and n != 2:
            raise ValueError(f"a linear schedule takes values [a, b] (2 numbers), got {n}")
        if self.schedule == "piecewise" and n < 2:
            raise ValueError(f"a piecewise schedule takes 2 or more knot values, got {n}")
        if not all(math.isfinite(v) for v in (*self.values, *(self.clamp or ()))):
            raise ValueError("schedule values and clamp must be finite numbers")
        if self.clamp is not None and self.clamp[0] > self.clamp[1]:
            raise ValueError(f"schedule clamp {list(self.clamp)} has low > high; swap them")
        return self


LayerValues = tuple[float, ...]
KindValue = float | LayerValues | Schedule
Value = float | LayerValues | Schedule | dict[str, KindValue]
ParamValue = bool | int | float | LayerValues | Schedule | dict[str, KindValue] | str
KINDS = ("ps", "dfs")


class _RecipeBase(BaseModel):
    """Serialisation shared by every kind; ``from_*`` return the kind the data names."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _plain(self.model_dump(mode="json", exclude_none=True))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnyRecipe:
        """The recipe ``data`` describes, of the kind its ``kind`` key names (default ``ps``)."""
        data = dict(data)
        kind = data.get("kind", "ps")
        if kind == "ps":
            return Recipe.model_validate(data)
        if kind == "dfs":
            return DFSRecipe.model_validate(data)
        raise ValueError(unknown_name_message("recipe kind", str(kind), list(KINDS)))

    @classmethod
    def from_json(cls, text: str) -> AnyRecipe:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_yaml(cls, text: str) -> AnyRecipe:
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError(
                "a recipe YAML must be a mapping: 'method' and 'sources' (a ps recipe), or "
                "'kind: dfs' with 'sources', 'layers', 'scales' and 'embed_from'"
            )
        return cls.from_dict(data)

    @property
    def hash(self) -> str:
        """Stable content hash (sha256 of the canonical JSON), 16 hex digits."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def __hash__(self) -> int:
        return hash(self.to_json())

    def model_sources(self) -> dict[str, str]:
        """Every source that names a model, those inside inline recipes as ``outer.inner``."""
        sources: Mapping[str, str | Recipe] = getattr(self, "sources", {})
        out: dict[str, str] = {}
        for name, source in sources.items():
            if isinstance(source, str):
                out[name] = source
            else:
                out.update({f"{name}.{n}": s for n, s in source.model_sources().items()})
        return out


class DFSPath(BaseModel):
    """A data-flow-space path on a ps recipe (``Recipe.dfs``), the form before recipe kinds.

    Kept so that such stored recipes load and round-trip; no engine merges it (a ps engine
    refuses it rather than ignore it). New data-flow recipes are :class:`DFSRecipe`.
    """

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


class Recipe(_RecipeBase):
    """A parameter-space (``kind: ps``) merge recipe (see module docstring for value shapes)."""

    kind: Literal["ps"] = Field("ps", exclude=True)  # never written: see module docstring
    method: str
    sources: dict[str, str | Recipe] = Field(
        description="model name -> local path or hub id, or an inline ps recipe"
    )
    base_model: str | None = None
    models: dict[str, dict[str, Value]] = Field(
        default_factory=dict, description="per-model parameters of the models being merged"
    )
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    non_layer: Literal["first", "base"] = "first"
    dtype: Dtype | None = None
    seed: int = 0
    dfs: DFSPath | None = None

    @model_validator(mode="before")
    @classmethod
    def _check_schedules(cls, data: Any) -> Any:
        """A malformed schedule as one line naming its key (not pydantic's union report)."""
        if isinstance(data, Mapping):
            places = [(f"models.{m}", p) for m, p in (data.get("models") or {}).items()]
            for where, params in [*places, ("parameters", data.get("parameters"))]:
                if isinstance(params, Mapping):
                    for key, value in params.items():
                        _check_schedule(f"{where}.{key}", value)
        return data

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


class DFSRecipe(_RecipeBase):
    """A data-flow-space (``kind: dfs``) recipe: the path of decoder layers a token takes.

    ``layers[t]`` is slot ``t``: ``(source, layer index)``; ``scales[t]`` multiplies the hidden
    state as it enters slot ``t`` (from the embeddings for ``t = 0``, else from slot ``t - 1``),
    i.e. the scale ``W_ij`` of that transition. Embeddings, the final norm and the head (and the
    tokenizer) come from ``embed_from``.
    """

    kind: Literal["dfs"] = "dfs"
    sources: dict[str, str | Recipe] = Field(
        description="model name -> local path or hub id, or an inline ps recipe"
    )
    layers: tuple[tuple[str, int], ...] = Field(
        min_length=1, description="(source, layer index) per slot, in path order"
    )
    scales: tuple[float, ...] = Field(description="scale entering each slot")
    embed_from: str = Field(description="source of the embeddings, final norm, head, tokenizer")
    dtype: Dtype | None = None

    @model_validator(mode="after")
    def _check_path(self) -> DFSRecipe:
        known = ", ".join(self.sources)
        if self.embed_from not in self.sources:
            raise ValueError(f"embed_from {self.embed_from!r} is not in sources ({known})")
        for t, (name, layer) in enumerate(self.layers):
            if name not in self.sources:
                raise ValueError(f"layers[{t}] names {name!r}, which is not in sources ({known})")
            if layer < 0:
                raise ValueError(f"layers[{t}] has layer index {layer}; give an index >= 0")
        if len(self.scales) != len(self.layers):
            raise ValueError(
                f"scales has {len(self.scales)} entries but layers has {len(self.layers)}; "
                "give one scale per slot"
            )
        bad = [t for t, s in enumerate(self.scales) if not math.isfinite(s)]
        if bad:
            raise ValueError(f"scales[{bad[0]}] is {self.scales[bad[0]]}; give a finite number")
        return self


AnyRecipe = Recipe | DFSRecipe


def ps_recipe(recipe: Any, *, user: str, fix: str) -> Recipe:
    """``recipe`` if it is a ps recipe over model folders or hub ids; else a ValueError naming
    ``user`` (who cannot take it) and, for an inline source, ``fix``. A legacy ``dfs`` path is
    refused, never dropped to merge the rest."""
    if not isinstance(recipe, Recipe):
        kind = getattr(recipe, "kind", type(recipe).__name__)
        raise ValueError(f"{user} takes ps recipes only, not kind {kind!r}")
    if recipe.dfs is not None:
        raise ValueError(
            f"this ps recipe carries a data-flow path ('dfs', the form before recipe kinds), "
            f"which {user} cannot take and will not ignore; write it as a kind: dfs recipe "
            "(layers, scales and embed_from at the top level)"
        )
    inline = [n for n, s in recipe.sources.items() if not isinstance(s, str)]
    if inline:
        raise ValueError(f"source {inline[0]!r} is an inline recipe, which {user} cannot take; "
                         f"{fix}")
    return recipe
Source = str | Recipe  # a local path or hub id, or an inline ps recipe (its merged model)


def _check_schedule(where: str, value: Any) -> None:
    from pydantic import ValidationError

    subs = value.items() if isinstance(value, Mapping) and "schedule" not in value else []
    for kind, sub in subs:
        _check_schedule(f"{where}.{kind}", sub)
    if isinstance(value, Mapping) and "schedule" in value:
        try:
            Schedule.model_validate(value)
        except ValidationError as err:
            e = err.errors()[0]
            loc = ".".join(str(p) for p in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            raise ValueError(f"{where}{'.' + loc if loc else ''}: {msg}; a schedule is "
                             "{schedule: linear, values: [a, b]} or {schedule: piecewise, "
                             "values: [v0, v1, ...]}") from None


def _check_value(where: str, value: Any) -> None:
    if isinstance(value, dict):
        unknown = set(value) - set(MODULE_KINDS)
        if unknown:
            raise ValueError(
                f"{where} has unknown module kind(s) {sorted(unknown)}; allowed: {MODULE_KINDS}"
            )
        if {"attention", "self_attn"} <= set(value):
            raise ValueError(f"{where} gives both 'attention' and its legacy name 'self_attn'; "
                             "keep 'attention'")
    elif isinstance(value, tuple) and not value:
        raise ValueError(f"{where} is an empty list; give at least one value")


def _plain(obj: Any) -> Any:
    """Tuples -> lists so YAML/JSON dumps are plain (pydantic turns them back into tuples)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
