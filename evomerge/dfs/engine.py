"""The ``dfs`` engine: source models loaded once, each DFS recipe run as a path over them.

:class:`DFSEngine` loads its sources once (model folders, hub ids, or inline ps recipes merged
once by the ps engine) and checks they can be chained (:mod:`evomerge.dfs.sources`). ``apply``
builds the path model of a recipe out of wrappers around the loaded layers
(:func:`evomerge.dfs.path_model.build_path_model`): no weights are copied, every candidate runs
on the same layer modules, so a candidate costs a few milliseconds to build.

``num_layers`` is M, the total number of decoder layers of the loaded sources, in source order
(:attr:`DFSEngine.layer_table` lists them as ``(source, layer index)``): the layers a search
space lays out (and repeats) to draw its slots from.

>>> sources = {"a": "models/a", "b": "models/b"}
>>> engine = DFSEngine(sources)                                   # doctest: +SKIP
>>> recipe = DFSRecipe(sources=sources, embed_from="a", layers=[("a", 0), ("b", 1), ("a", 1)],
...                    scales=[1, 0.9, 1.1])
>>> model, tokenizer = engine.apply(recipe)                       # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evomerge.config import JobConfig, LoadConfig
from evomerge.dfs.path_model import build_path_model, layer_type
from evomerge.dfs.sources import Source, load_sources
from evomerge.recipe import DFSRecipe, Recipe

DEFAULT_LOAD = LoadConfig.model_validate({})


def dfs_recipe(recipe: Any) -> DFSRecipe:
    """``recipe`` if it is a dfs recipe, else a ValueError that says which engine takes it."""
    if not isinstance(recipe, DFSRecipe):
        kind = getattr(recipe, "kind", type(recipe).__name__)
        raise ValueError(f"the dfs engine takes kind 'dfs' recipes only, not kind {kind!r}")
    return recipe


def used_sources(recipe: DFSRecipe) -> list[str]:
    """The sources ``recipe`` uses (embed_from and every layer's), in ``recipe.sources`` order."""
    used = {recipe.embed_from, *(name for name, _ in recipe.layers)}
    return [name for name in recipe.sources if name in used]


class DFSEngine:
    """Sources loaded once; :meth:`apply` turns a dfs recipe into ``(model, tokenizer)``.

    ``sources``: name -> model folder, hub id or inline ps recipe. ValueError if they differ in
    architecture or hidden size, or are of an architecture the engine does not chain.
    """

    def __init__(self, sources: Mapping[str, str | Recipe], *,
                 load: LoadConfig = DEFAULT_LOAD) -> None:
        self.sources = dict(sources)
        self.load = load
        self.loaded: dict[str, Source] = load_sources(self.sources, load=load)
        self.layer_table = tuple((name, i) for name, src in self.loaded.items()
                                 for i in range(src.num_layers))
        self.num_layers = len(self.layer_table)

    @classmethod
    def from_job(cls, job: JobConfig) -> DFSEngine:
        """An engine over the job's models (``models.sources()``: base first, then experts)."""
        return cls(job.models.sources(), load=job.load)

    @classmethod
    def from_recipe(cls, recipe: Any, *, load: LoadConfig | None = None) -> DFSEngine:
        """An engine holding just the sources ``recipe`` uses, in ``recipe.dtype`` if set."""
        recipe = dfs_recipe(recipe)
        load = load or DEFAULT_LOAD
        if recipe.dtype is not None:
            load = load.model_copy(update={"dtype": recipe.dtype})
        return cls({n: recipe.sources[n] for n in used_sources(recipe)}, load=load)

    def apply(self, recipe: Any) -> tuple[Any, Any]:
        """The path model of ``recipe`` and the embed_from tokenizer. The model shares this
        engine's layers: it is valid until the next call."""
        recipe = dfs_recipe(recipe)
        self.check(recipe)
        embed = self.loaded[recipe.embed_from]
        layers = [self.loaded[name].layers[i] for name, i in recipe.layers]
        types = [layer_type(self.loaded[name].model.config, i) for name, i in recipe.layers]
        model = build_path_model(embed.model, layers, types, recipe.scales)
        return model, embed.tokenizer

    def check(self, recipe: DFSRecipe) -> None:
        """ValueError if ``recipe`` uses a source this engine did not load (or loaded from
        elsewhere) or a layer index its source does not have."""
        for name in used_sources(recipe):
            if name not in self.loaded:
                raise ValueError(
                    f"recipe source {name!r} is not loaded by this dfs engine (sources: "
                    f"{', '.join(self.loaded)}); build the engine from the recipe "
                    "(DFSEngine.from_recipe)")
            if recipe.sources[name] != self.sources[name]:
                raise ValueError(
                    f"recipe source {name!r} is {_short(recipe.sources[name])} but this engine "
                    f"loaded {_short(self.sources[name])}; build the engine from the recipe")
        for t, (name, i) in enumerate(recipe.layers):
            count = self.loaded[name].num_layers
            if i >= count:
                raise ValueError(
                    f"layers[{t}] is ({name!r}, {i}) but model {name!r} has {count} decoder "
                    f"layers; give a layer index from 0 to {count - 1}")


def _short(source: str | Recipe) -> str:
    return repr(source) if isinstance(source, str) else f"an inline {source.method} recipe"
