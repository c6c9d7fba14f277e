"""The Workspace: models loaded once, each candidate recipe merged in place into one live model.

The base model (or the first source when there is none) is the *anchor*: the Workspace keeps a
copy of its weights and, per tensor, the stacked task vectors ``theta_k - anchor`` of the other
sources, on ``load.device`` in the model's dtype. :meth:`Workspace.apply` merges from those (never
from the live weights, so applying X, then Y, then X gives X's weights exactly) and writes the
result into ``Workspace.model``; nothing touches disk. Trimming thresholds (TIES, breadcrumbs) come
from magnitude tables built once per task vector on first use
(:func:`evomerge.merge_methods.magnitude_table`): all sorted magnitudes while they fit in
``table_bytes`` (a threshold is then a lookup), else a quantile table refined exactly. DARE masks
come from generators seeded by (recipe seed, tensor name, model name), so a recipe is
reproducible bit for bit on a given device.

>>> ws = Workspace({"base": "models/base", "a": "models/a"}, "base")  # doctest: +SKIP
>>> model = ws.apply(recipe)                                         # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evomerge import merge_methods as mm
from evomerge.config import LoadConfig
from evomerge.loading import (
    check_compatible,
    check_same_vocab,
    load_model,
    load_tokenizer,
)
from evomerge.merge import DARE, MergePlan, keeps_base, plan_merge, tensor_params
from evomerge.recipe import Recipe

DEFAULT_LOAD = LoadConfig.model_validate({})


class Workspace:
    """Sources loaded once; :meth:`apply` writes a recipe's merged weights into :attr:`model`.

    ``table_bytes`` caps the memory of the trimming tables (TIES, breadcrumbs): within it every
    sorted magnitude is kept, beyond it a quantile table per task vector.
    """

    def __init__(
        self, sources: Mapping[str, str], base_model: str | None = None, *,
        load: LoadConfig = DEFAULT_LOAD, table_bytes: int = 1 << 30,
    ) -> None:
        if not sources:
            raise ValueError("sources is empty; give at least one model")
        if base_model is not None and base_model not in sources:
            raise ValueError(f"base_model {base_model!r} is not in sources ({', '.join(sources)})")
        self.sources = dict(sources)
        self.base_model = base_model
        self.load = load
        self.anchor = base_model or next(iter(self.sources))
        self.tokenizer = load_tokenizer(self.anchor, self.sources[self.anchor], load=load)
        self.model = load_model(self.anchor, self.sources[self.anchor], load=load)
        self.num_layers = _num_layers(self.model.config)
        self._params = dict(self.model.named_parameters())
        self._base = {n: p.detach().clone() for n, p in self._params.items()}
        others = [n for n in self.sources if n != self.anchor]
        self._row = {n: i for i, n in enumerate(others)}
        self._deltas = {
            n: torch.empty((len(others), *p.shape), dtype=p.dtype, device=p.device)
            for n, p in self._base.items()
        }
        for name in others:
            self._load_delta(name)
        self._tables: dict[tuple[str, int], mm.MagnitudeTable] = {}
        # Whole sorted magnitudes (a threshold is a pure lookup) when they fit in table_bytes;
        # else ~1024 quantiles per task vector, refined exactly at each use.
        elements = sum(d.numel() for d in self._deltas.values())
        self._table_size = None if elements * 4 <= table_bytes else 1024

    @classmethod
    def from_recipe(cls, recipe: Recipe, *, load: LoadConfig | None = None) -> Workspace:
        """A Workspace holding just the models ``recipe`` uses, in ``recipe.dtype`` if set."""
        load = load or DEFAULT_LOAD
        if recipe.dtype is not None:
            load = load.model_copy(update={"dtype": recipe.dtype})
        used = {recipe.base_model, *recipe.models}
        sources = {n: s for n, s in recipe.sources.items() if n in used}
        return cls(sources, recipe.base_model, load=load)

    @property
    def names(self) -> list[str]:
        """The loaded source names, in order."""
        return list(self.sources)

    def _load_delta(self, name: str) -> None:
        source = self.sources[name]
        check_same_vocab(self.anchor, self.tokenizer,
                         name, load_tokenizer(name, source, load=self.load))
        other = load_model(name, source, load=self.load.model_copy(update={"device": "cpu"}))
        check_compatible(self.anchor, self.model, name, other)
        state = other.state_dict()
        row = self._row[name]
        with torch.no_grad():
            for key, base in self._base.items():
                self._deltas[key][row] = state[key].to(base.device, base.dtype) - base
        del other, state

    # -- applying a recipe -------------------------------------------------------------------
    def apply(self, recipe: Recipe) -> Any:
        """Write the merge ``recipe`` describes into :attr:`model` (in place) and return it."""
        plan = plan_merge(recipe, available=self.names)
        self._check_recipe(recipe, plan)
        with torch.no_grad():
            for name, param in self._params.items():
                param.copy_(self._merged(recipe, plan, name))
        return self.model

    def _check_recipe(self, recipe: Recipe, plan: MergePlan) -> None:
        for name in (plan.base, *plan.models):
            if name is not None and recipe.sources[name] != self.sources[name]:
                raise ValueError(
                    f"recipe source {name!r} is {recipe.sources[name]!r} but this workspace "
                    f"loaded {self.sources[name]!r}; build a Workspace for the recipe's sources"
                )
        if plan.base is not None and plan.base != self.anchor:
            raise ValueError(
                f"recipe base_model {plan.base!r} differs from the workspace's "
                f"{self.anchor!r}; build a Workspace with base_model={plan.base!r}"
            )

    def _merged(self, recipe: Recipe, plan: MergePlan, name: str) -> Tensor:
        base = self._base[name]
        if keeps_base(recipe, name):
            return base
        kwargs = tensor_params(recipe, plan, name, num_layers=self.num_layers)
        deltas = self._stack(plan.models, name)
        if recipe.method == "linear":
            return mm.linear(None, deltas.add_(base.float()), **kwargs)
        if recipe.method == "slerp":
            return mm.slerp(base, deltas.add_(base.float()), **kwargs)
        if recipe.method in DARE:
            kwargs["generators"] = [
                mm.dare_generator(recipe.seed, name, m, base.device) for m in plan.models
            ]
        elif mm.SPARSIFIER[recipe.method] is not None:
            kwargs["kths"] = [self._kth(m, name) for m in plan.models]
        return mm.gta_merge(recipe.method, base, deltas, **kwargs)

    def _stack(self, models: tuple[str, ...], name: str) -> Tensor:
        """Float32 task vectors of ``models`` for tensor ``name`` (zeros for the anchor)."""
        stored = self._deltas[name]
        out = torch.zeros((len(models), *stored.shape[1:]), device=stored.device)
        for i, model in enumerate(models):
            if model != self.anchor:
                out[i] = stored[self._row[model]]
        return out

    def _kth(self, model: str, name: str) -> mm.Kth:
        if model == self.anchor:
            return lambda _magnitudes, r: torch.zeros((), device=self._base[name].device)
        key = (name, self._row[model])
        if key not in self._tables:
            delta = self._deltas[name][key[1]]
            self._tables[key] = mm.magnitude_table(delta.abs(), self._table_size or delta.numel())
        table = self._tables[key]
        return lambda magnitudes, r: mm.table_kth(magnitudes, table, r)


def _num_layers(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(text, key, None) is not None:
            return int(getattr(text, key))
    raise ValueError(f"cannot find the number of layers in the {type(config).__name__}")


def merge_to_folder(recipe: Recipe, out: str | Path, *, load: LoadConfig | None = None) -> Path:
    """Apply ``recipe`` and write a Hugging Face folder (safetensors, config, tokenizer) to
    ``out``; returns ``out``. ``out`` must not be one of the recipe's source folders."""
    out = Path(out)
    for name, source in recipe.sources.items():
        if Path(source).exists() and Path(source).resolve() == out.resolve():
            raise ValueError(f"output folder {str(out)!r} is source {name!r}; choose another")
    workspace = Workspace.from_recipe(recipe, load=load)
    model = workspace.apply(recipe)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    workspace.tokenizer.save_pretrained(out)
    return out
