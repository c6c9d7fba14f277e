"""The Workspace: models loaded once, each candidate recipe merged in place into one live model.

It is the engine for ps recipes (:class:`evomerge.engines.PSEngine` adapts it); it refuses what
it cannot merge (see :func:`mergeable`) rather than merge part of it.

The base model (or the first source when there is none) is the *anchor*: the Workspace keeps a
copy of its weights and, per tensor, the stacked task vectors ``theta_k - anchor`` of the other
sources, on ``load.device``. Task vectors are computed in float32 from the stored weights, read
one tensor at a time (no second model in memory), and kept in the model's dtype, or in float32
for a 16-bit load (rounding the weights to bfloat16 first zeroes about a third of a LoRA task
vector). A tensor that every source has bit for bit equal to the anchor's (embeddings and norms
of LoRA fine-tunes) gets no task vector and no copy: its base is the live parameter, which the
task-arithmetic family never needs to touch. So the Workspace holds at most ``(K + 2) x`` the
model (K task vectors, the copy, the live model), less the unchanged tensors, plus the caches.

:meth:`Workspace.apply` merges from those (never from the live weights, so applying X, then Y,
then X gives X's weights exactly) and writes the result into ``Workspace.model``; nothing
touches disk. Each tensor is merged by one fused kernel (:mod:`evomerge.merge.kernels`) that
reads the base and the K task vectors once and writes the parameter: the cost of a candidate is
about one pass over that memory. The method's spec picks the kernel (:meth:`Workspace._path`:
weighted sum, trim or DARE for the linear and task-arithmetic families); a method without a
fused path runs its reference kernel on the models' tensors rebuilt from the task vectors
(slerp, or a newly registered method). Trimming bounds (TIES, breadcrumbs) are found per
candidate by selection (:func:`evomerge.merge.trimming.window_bounds`: a sampled bracket, then a
partition of the few entries inside it), exactly mergekit's kept set; mergekit's argsort order
is computed (and cached, :class:`~evomerge.merge.merge_cache.SortCache`) only for a task vector
where a bound cuts a tie group, and never with ``load.tie_order: index`` (the lowest-index
entries of such a group are kept, :func:`evomerge.merge.trimming.index_ties`). DARE and DELLA's
random levels are hashed inside the kernels from (recipe seed, tensor name, model name) and each
entry's index (:mod:`evomerge.merge.levels`): nothing drawn or stored, the same on every device,
so a recipe is reproducible bit for bit. DELLA's row ranks come from a cache built on first use
(:mod:`evomerge.merge.merge_cache`), kept only if it fits in ``cache_bytes`` (default: half the
free memory of the device). The result equals
:func:`evomerge.merge.reference.merge_state_dicts` to float32 rounding (for a 16-bit load: that
merge of the stored weights, rounded to the model's dtype).

>>> ws = Workspace({"base": "models/base", "a": "models/a"}, "base")  # doctest: +SKIP
>>> model = ws.apply(recipe)                                         # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evomerge.config import LoadConfig
from evomerge.merge import kernels, levels, trimming
from evomerge.merge import merge_methods as mm
from evomerge.merge.loading import (
    SafetensorsReader,
    check_compatible,
    check_compatible_config,
    check_same_tensors,
    check_same_vocab,
    load_model,
    load_tokenizer,
)
from evomerge.merge.merge_cache import (
    DellaRanks,
    SceVariance,
    SortCache,
    rescale_factors,
)
from evomerge.merge.methods_spec import MethodSpec
from evomerge.merge.reference import MergePlan, keeps_base, plan_merge, tensor_params
from evomerge.recipe import AnyRecipe, Recipe, ps_recipe

DEFAULT_LOAD = LoadConfig.model_validate({})
Ties = list[tuple[Tensor, Tensor]]


class Workspace:
    """Sources loaded once; :meth:`apply` writes a recipe's merged weights into :attr:`model`.

    ``cache_bytes`` caps each cache (:mod:`evomerge.merge.merge_cache`): mergekit's argsort
    order of the task vectors where a TIES or breadcrumbs bound cuts a tie group (8 bytes per
    entry of those; beyond the cap sorted again when needed) and DELLA's row ranks
    (``K x params x 4`` bytes, for every seed; beyond the cap ranked anew per candidate); DARE
    needs no cache. None: half the memory free on the device when the cache
    is built. Default: ``load.merge_cache_bytes``. :meth:`held_bytes` counts what it holds.
    """

    def __init__(
        self, sources: Mapping[str, str], base_model: str | None = None, *,
        load: LoadConfig = DEFAULT_LOAD, cache_bytes: int | None = None,
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
        first = next(iter(self._params.values()))
        self._device = first.device
        self.task_vector_dtype = (torch.float32 if first.dtype in (torch.float16, torch.bfloat16)
                                  else first.dtype)
        others = [n for n in self.sources if n != self.anchor]
        self._row = {n: i for i, n in enumerate(others)}
        self._deltas: dict[str, Tensor] = {}  # only the tensors some model changes
        self._load_deltas(others)
        # The base of a tensor no model changes is the live parameter itself (one copy): the
        # merge leaves it as it is (or detaches a copy first, see _unchanged_merge).
        self._base = {n: (p.detach().clone() if n in self._deltas else p.detach())
                      for n, p in self._params.items()}
        self._aliased = {n for n in self._params if n not in self._deltas}
        if cache_bytes is None:
            cache_bytes = load.merge_cache_bytes
        self.sorts = SortCache(self._deltas, cache_bytes)
        self.della = DellaRanks(self._deltas, cache_bytes)
        self._level_keys: dict[tuple[int, str, tuple[int, ...]], Tensor] = {}
        self.sce = SceVariance(self._deltas, cache_bytes)
        self._bounds: dict[tuple[str, str, int],
                           tuple[tuple[int, int], trimming.Bounds, Ties | None]] = {}

    @classmethod
    def from_recipe(cls, recipe: Recipe, *, load: LoadConfig | None = None) -> Workspace:
        """A Workspace holding just the models ``recipe`` uses, in ``recipe.dtype`` if set."""
        recipe = mergeable(recipe)
        load = load or DEFAULT_LOAD
        if recipe.dtype is not None:
            load = load.model_copy(update={"dtype": recipe.dtype})
        used = {recipe.base_model, *recipe.models}
        sources = {n: s for n, s in recipe.model_sources().items() if n in used}
        return cls(sources, recipe.base_model, load=load)

    @property
    def names(self) -> list[str]:
        """The loaded source names, in order."""
        return list(self.sources)

    def _load_deltas(self, others: list[str]) -> None:
        """Each other model's task vectors ``theta_k - anchor``, computed in float32 from the
        stored weights one tensor at a time, stored in :attr:`task_vector_dtype` (float32 for a
        16-bit load: rounding the weights to bfloat16 first zeroes a third of a LoRA task
        vector); a tensor equal to the anchor's in every model gets none."""
        anchor = SafetensorsReader.open(self.sources[self.anchor])
        for name in others:
            source = self.sources[name]
            check_same_vocab(self.anchor, self.tokenizer,
                             name, load_tokenizer(name, source, load=self.load))
            reader = SafetensorsReader.open(source)
            shapes = {k: tuple(p.shape) for k, p in self._params.items()}
            if (anchor is None or reader is None or not anchor.covers(shapes, shapes)
                    or not reader.covers(shapes, shapes)):
                self._load_delta_from_model(name)
                continue
            check_compatible_config(self.anchor, self.model, name, source, load=self.load)
            check_same_tensors(self.anchor, anchor.shapes, name, reader.shapes)
            for key in self._params:
                self._store_delta(key, self._row[name], reader.get(key), anchor.get(key))

    def _load_delta_from_model(self, name: str) -> None:
        """The slow way (a hub id, pickle weights, renamed keys): the whole model, loaded."""
        source = self.sources[name]
        load = self.load.model_copy(update={"device": "cpu", "dtype": "float32"})
        other = load_model(name, source, load=load)
        check_compatible(self.anchor, self.model, name, other)
        anchor = load_model(self.anchor, self.sources[self.anchor], load=load).state_dict()
        state = other.state_dict()
        for key in self._params:
            self._store_delta(key, self._row[name], state[key], anchor[key])
        del other, state, anchor

    def _store_delta(self, key: str, row: int, theta: Tensor, anchor: Tensor) -> None:
        if theta.dtype == anchor.dtype and torch.equal(theta, anchor):
            return
        delta = theta.float() - anchor.float()
        if not delta.any():
            return
        if key not in self._deltas:
            shape = (len(self._row), *anchor.shape)
            self._deltas[key] = torch.zeros(shape, dtype=self.task_vector_dtype,
                                            device=self._device)
        with torch.no_grad():
            self._deltas[key][row] = delta.to(self._device, self.task_vector_dtype)

    def held_bytes(self) -> dict[str, int]:
        """Bytes of the tensors this Workspace holds: the live model, the anchor's copies (none
        for tensors no model changes), the task vectors and the merge caches."""
        def size(tensors: Any) -> int:
            return sum(t.numel() * t.element_size() for t in tensors)

        caches = self.sorts.nbytes() + self.della.nbytes()
        return {"model": size(self._params.values()),
                "base": size(self._base[n] for n in self._params if n not in self._aliased),
                "task_vectors": size(self._deltas.values()),
                "caches": caches + self.sce.nbytes()}

    def task_vector(self, name: str, row: int) -> Tensor:
        """The stored task vector of tensor ``name`` for source row ``row`` (zeros if none)."""
        stored = self._deltas.get(name)
        if stored is None:
            return torch.zeros_like(self._base[name], dtype=self.task_vector_dtype)
        return stored[row]

    # -- applying a recipe -------------------------------------------------------------------
    def apply(self, recipe: Recipe) -> Any:
        """Write the merge ``recipe`` describes into :attr:`model` (in place) and return it.

        ValueError for what this (the ps) engine cannot merge: see :func:`mergeable`."""
        recipe = mergeable(recipe)
        plan = plan_merge(recipe, available=self.names)
        self._check_recipe(recipe, plan)
        with torch.no_grad():
            for name, param in self._params.items():
                self._merge_into(recipe, plan, name, param)
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

    def _merge_into(self, recipe: Recipe, plan: MergePlan, name: str, param: Tensor) -> None:
        if keeps_base(recipe, name):
            if name not in self._aliased:
                param.copy_(self._base[name])
            return
        kwargs = tensor_params(recipe, plan, name, num_layers=self.num_layers)
        if name not in self._deltas and self._unchanged_merge(plan, name, param, kwargs):
            return
        rows = [self._row[m] for m in plan.models if m != self.anchor]
        path = self._path(plan.spec)
        path(recipe, plan, name, param, rows, kwargs)

    def _unchanged_merge(self, plan: MergePlan, name: str, param: Tensor, kwargs: dict) -> bool:
        """A tensor no model changes: the task-arithmetic family and SCE give the base exactly
        (nothing to do while the parameter is the base); linear gives ``beta * base``. False
        (after detaching a copy of the base from the parameter): merge it the general way."""
        spec = plan.spec
        keeps = spec.family == "task_arithmetic" or spec.kernel in (mm.sce,
                                                                   f"{mm.__name__}:sce")
        if spec.family == "linear":
            keeps = _linear_coefficients(plan, self.anchor, kwargs, name)[0] == 1.0
        if keeps:
            if name not in self._aliased:
                param.copy_(self._base[name])
            return True
        if name in self._aliased:
            self._base[name] = param.detach().clone()
            self._aliased.discard(name)
        return False

    def _path(self, spec: MethodSpec) -> Callable[..., None]:
        """The fused path for ``spec``'s family; its kernel on rebuilt tensors where none fits."""
        plain_sum = spec.family == "task_arithmetic" and not (spec.sparsifier or spec.consensus)
        if spec.family == "linear" or plain_sum:
            return self._weighted_sum
        if spec.family == "task_arithmetic" and spec.sparsifier is not None:
            return {"random": self._dare, "della": self._della}.get(spec.sparsifier, self._trim)
        if spec.kernel in (mm.sce, f"{mm.__name__}:sce"):
            return self._sce
        return self._reference

    def _weighted_sum(self, recipe: Recipe, plan: MergePlan, name: str, param: Tensor,
                      rows: list[int], kwargs: dict) -> None:
        beta, coeffs = _linear_coefficients(plan, self.anchor, kwargs, name)
        kernels.run(kernels.linear_kernel, param.view(-1), self._base[name].view(-1),
                    self._rows(name, rows), self._pack([beta, *coeffs]))

    def _dare(self, recipe: Recipe, plan: MergePlan, name: str, param: Tensor,
              rows: list[int], kwargs: dict) -> None:
        """One fused pass; the levels are hashed in the kernel (nothing drawn or cached), and
        the rescale factors come from one reduction over the same task vectors first."""
        deltas = self._rows(name, rows)
        keys = self._keys(recipe.seed, name, rows)
        cut = [float(mm.dare_cutoff(d)) for d in kwargs["density"]]
        scale = [1.0] * len(rows)
        if kwargs["rescale"]:
            scale = self._rescale(kernels.dare_l1_kernel, deltas, keys,
                                  torch.tensor(cut, device=self._device))
        kernels.run(kernels.dare_kernel, param.view(-1), self._base[name].view(-1), deltas,
                    keys, self._pack([kwargs["weight"], cut, scale]),
                    self._shared(plan.spec, kwargs))

    def _keys(self, seed: int, name: str, rows: list[int]) -> Tensor:
        """The level keys (K, 2) of task vectors ``rows`` of tensor ``name`` for ``seed``
        (kept: a few bytes per tensor, and SHA-256 per tensor and model is not free)."""
        cache_key = (seed, name, tuple(rows))
        keys = self._level_keys.get(cache_key)
        if keys is None:
            models = list(self._row)
            keys = levels.keys_tensor([levels.level_key(seed, name, models[r]) for r in rows],
                                      self._device)
            self._level_keys[cache_key] = keys
        return keys

    def _trim(self, recipe: Recipe, plan: MergePlan, name: str, param: Tensor,
              rows: list[int], kwargs: dict) -> None:
        """One fused pass keeping ``lo_k <= |tau_k| <= hi_k`` (ties included), then the entries
        of tie groups that a window cuts rewritten with mergekit's exact choice."""
        kind = plan.spec.sparsifier
        assert kind is not None  # ties, breadcrumbs
        deltas = self._rows(name, rows)
        n = deltas.shape[1]
        gamma = kwargs.get("gamma", [0.0] * len(rows))
        lo: list[float] = []
        hi: list[float] = []
        scale: list[float] = []
        fixes: list[list[tuple[Tensor, Tensor]]] = []
        for row, density, g in zip(rows, kwargs["density"], gamma, strict=True):
            window = trimming.rank_window(kind, n, density=density, gamma=g)
            low, high, factor, cut = self._trim_model(kind, name, row, window, kwargs["rescale"])
            lo.append(low)
            hi.append(high)
            scale.append(factor)
            fixes.append(cut)
        per_model = self._pack([kwargs["weight"], lo, hi, scale])
        shared = self._shared(plan.spec, kwargs)
        kernels.run(kernels.trim_kernel, param.view(-1), self._base[name].view(-1), deltas,
                    per_model, shared)
        if any(fixes):
            self._fix_ties(param.view(-1), name, deltas, fixes, per_model, shared)

    def _trim_model(self, kind: str, name: str, row: int, window: tuple[int, int] | None,
                    rescale: bool) -> tuple[float, float, float, list[tuple[Tensor, Tensor]]]:
        """One task vector's kept magnitudes ``(lo, hi)``, rescale factor and cut tie groups:
        bounds by selection (:func:`trimming.window_bounds`); where a tie group at a bound is
        cut, mergekit's argsort order (:class:`SortCache`) says which of its entries are kept,
        or with ``load.tie_order: index`` the lowest flat indices (:func:`trimming.index_ties`,
        no sort)."""
        if window is None:
            return 0.0, math.inf, 1.0, []
        if window[0] == window[1]:
            return 0.0, -1.0, 1.0, []
        key = (kind, name, row)
        last = self._bounds.get(key)
        if last is not None and last[0] == window and (last[1].l1 is not None or not rescale):
            _, bounds, ties = last
        else:
            magnitudes = self._deltas[name][row].abs()
            bounds = trimming.window_bounds(kind, magnitudes, window, l1=rescale)
            ties = None
            if bounds.cut and self.load.tie_order == "index":
                ties = trimming.index_ties(magnitudes, bounds)
            self._bounds[key] = (window, bounds, ties)
        if not bounds.cut or ties is not None:
            before, after = (bounds.l1[1], bounds.l1[0]) if bounds.l1 else (1.0, 1.0)
            factor = rescale_factors([before], [after], rescale)[0]
            return bounds.lo, bounds.hi, factor, ties or []
        s = self.sorts.get(kind, name, row)
        low, high = trimming.window_values(s, window)
        factor = rescale_factors([float(s.values.sum())], [trimming.window_l1(s, window)],
                                 rescale)[0]
        return low, high, factor, trimming.partial_ties(s, window)

    def _fix_ties(self, out: Tensor, name: str, deltas: Tensor,
                  fixes: list[list[tuple[Tensor, Tensor]]], per_model: Tensor,
                  shared: Tensor) -> None:
        """Rewrite the entries of cut tie groups with the keep masks mergekit uses there."""
        where = torch.unique(torch.cat([idx for groups in fixes for idx, _ in groups]))
        sub = deltas[:, where]
        a = sub.float().abs()
        keep = (a >= per_model[1][:, None]) & (a <= per_model[2][:, None])
        for k, groups in enumerate(fixes):
            for idx, kept in groups:
                keep[k, torch.searchsorted(where, idx)] = kept
        merged = torch.empty(where.numel(), dtype=out.dtype, device=out.device)
        kernels.masked_kernel(merged, self._base[name].view(-1)[where], sub, keep, per_model,
                              shared)
        out[where] = merged

    def _della(self, recipe: Recipe, plan: MergePlan, name: str, param: Tensor,
               rows: list[int], kwargs: dict) -> None:
        deltas = self._rows(name, rows)
        ranks = self.della.get(name, rows)
        keys = self._keys(recipe.seed, name, rows)
        row = trimming.row_length(self._base[name].shape)
        tables = []
        for density, epsilon in zip(kwargs["density"], kwargs["epsilon"], strict=True):
            table = trimming.della_table(density, epsilon, row)
            tables.append(table if table is not None else torch.zeros(mm.DARE_LEVELS,
                                                                      dtype=torch.int32))
        table = torch.stack(tables).to(self._device)
        scale = [1.0] * len(rows)
        if kwargs["rescale"]:
            scale = self._rescale(kernels.della_l1_kernel, deltas, ranks, keys, table)
        kernels.run(kernels.della_kernel, param.view(-1), self._base[name].view(-1), deltas,
                    ranks, keys, table, self._pack([kwargs["weight"], scale]),
                    self._shared(plan.spec, kwargs))

    def _rescale(self, kernel: Callable[..., None], deltas: Tensor, *masks: Tensor) -> list[float]:
        """mergekit's L1 rescale factors of masked task vectors (an extra read of them)."""
        sums = torch.empty((2, deltas.shape[0]), dtype=torch.float32, device=self._device)
        kernels.run(kernel, sums, deltas, *masks)
        before, after = sums.tolist()
        return rescale_factors(before, after, True)

    def _sce(self, recipe: Recipe, plan: MergePlan, name: str, param: Tensor,
             rows: list[int], kwargs: dict) -> None:
        """SCE on the stored task vectors, its selection mask from the cached variance."""
        tvs = self._rows(name, rows).float()
        mask = self.sce.mask(name, tvs, rows, kwargs["select_topk"])
        merged = mm.sce_merge(self._base[name].view(-1), tvs, mask)
        param.copy_(merged.view_as(param))

    def _reference(self, recipe: Recipe, plan: MergePlan, name: str, param: Tensor,
                   rows: list[int], kwargs: dict) -> None:
        """The spec's kernel on the merged models' tensors, rebuilt as anchor + task vector."""
        base = self._base[name]
        tensors = torch.stack([self.task_vector(name, self._row[m]).float() if m in self._row
                               else torch.zeros_like(base, dtype=torch.float32)
                               for m in plan.models]) + base.float()
        if plan.spec.seeded:
            kwargs["level_keys"] = [levels.level_key(recipe.seed, name, m) for m in plan.models]
        param.copy_(plan.spec(base if plan.base is not None else None, tensors, **kwargs))

    def _rows(self, name: str, rows: list[int]) -> Tensor:
        """The stored task vectors ``rows`` of tensor ``name`` as ``(K, n)`` (a view when all)."""
        stored = self._deltas.get(name)
        if stored is None:
            return torch.zeros((len(rows), self._base[name].numel()), device=self._device,
                               dtype=self.task_vector_dtype)
        flat = stored.view(stored.shape[0], -1)
        if rows == list(range(stored.shape[0])):
            return flat
        return flat[torch.tensor(rows, dtype=torch.long, device=flat.device)]

    def _pack(self, values: list) -> Tensor:
        return torch.tensor(values, dtype=torch.float32).to(self._device)

    def _shared(self, spec: MethodSpec, kwargs: dict) -> Tensor:
        total = sum(kwargs["weight"])
        return self._pack([kwargs.get("lambda_", 1.0), float(spec.consensus),
                           float(kwargs["normalize"]), total if abs(total) >= 1e-8 else 1.0])


def _linear_coefficients(plan: MergePlan, anchor: str, kwargs: dict,
                         name: str) -> tuple[float, list[float]]:
    """``(beta, c)`` with the merge = ``beta * anchor + sum_k c_k tau_k`` over the non-anchor
    models (``linear``: ``theta_k = anchor + tau_k``, the anchor's own tau is 0)."""
    weight = kwargs["weight"]
    total = sum(weight)
    if plan.spec.family == "linear":
        if kwargs["normalize"] and total == 0:
            raise mm.zero_total_error(weight, tensor=name, models=plan.models)
        div = total if kwargs["normalize"] else 1.0
        coeffs = [w / div for m, w in zip(plan.models, weight, strict=True) if m != anchor]
        return total / div, coeffs
    div = total if kwargs["normalize"] and abs(total) >= 1e-8 else 1.0
    scale = kwargs.get("lambda_", 1.0) / div
    return 1.0, [w * scale for w in weight]


def _num_layers(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(text, key, None) is not None:
            return int(getattr(text, key))
    raise ValueError(f"cannot find the number of layers in the {type(config).__name__}")


def mergeable(recipe: Any) -> Recipe:
    """``recipe`` if the Workspace can merge it (another kind goes to its own engine,
    :func:`evomerge.engines.engine_for`), else a ValueError that says why and what to do."""
    return ps_recipe(recipe, user="the Workspace (the ps engine)", fix=(
        "write that recipe out with `evomerge merge INNER.yaml DIR` and name DIR as the source"))


def merge_to_folder(recipe: AnyRecipe, out: str | Path, *,
                    load: LoadConfig | None = None) -> Path:
    """Apply ``recipe`` with the engine of its kind and write a Hugging Face folder
    (safetensors, config, tokenizer) to ``out``; returns ``out``. ``out`` must not be one of the
    recipe's source folders. A kind with no engine is refused before anything is loaded."""
    from evomerge.engines import engine_factory

    out = Path(out)
    factory = engine_factory(recipe.kind)
    for name, source in recipe.model_sources().items():
        if Path(source).exists() and Path(source).resolve() == out.resolve():
            raise ValueError(f"output folder {str(out)!r} is source {name!r}; choose another")
    if recipe.kind == "dfs":  # a plain model of the path, not the engine's shared-layer shell
        from evomerge.dfs.export import write_hf_folder

        write_hf_folder(recipe, out, load=load)
        return out
    model, tokenizer = factory.from_recipe(recipe, load=load).apply(recipe)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
