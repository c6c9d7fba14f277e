"""Engines: one per recipe kind, the only thing between a worker and the merge code.

An engine turns a recipe of its kind into a model in memory: ``engine.apply(recipe) ->
(model, tokenizer)``. A worker holds one engine per kind, built on first use from the job
(:meth:`EngineFactory.from_job`); ``evomerge merge`` and ``export --format hf`` build one from
the recipe alone (:meth:`EngineFactory.from_recipe`). Evaluators see only the model and the
tokenizer. :data:`ENGINES` maps a kind to its factory as a lazy ``"module:attr"`` string; a kind
with no engine is refused with a ValueError, never merged as another kind.

The ps engine is the :class:`~evomerge.merge.workspace.Workspace` (models loaded once, each recipe
merged in place into one live model), adapted by :class:`PSEngine`. The dfs engine is
:class:`evomerge.dfs.engine.DFSEngine` (source models loaded once, each recipe run as a path over
their layers, no weight copies).

>>> ENGINES.names()
['dfs', 'ps']
>>> engine_factory("moe")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: recipe kind 'moe' has no engine in this version (engines: dfs, ps); a moe recipe ...
>>> engine = engine_for(recipe)                # doctest: +SKIP
>>> model, tokenizer = engine.apply(recipe)     # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from evomerge.registry import Registry

if TYPE_CHECKING:
    from evomerge.config import JobConfig, LoadConfig
    from evomerge.merge.workspace import Workspace


class Engine(Protocol):
    """Recipes of one kind -> a model in memory. ``num_layers``: decoder layers of the loaded
    models (what the search space's per-layer coefficients refer to)."""

    num_layers: int

    def apply(self, recipe: Any) -> tuple[Any, Any]:
        """The model ``recipe`` describes and its tokenizer (the model may be reused in place:
        it is valid until the next call)."""
        ...


class EngineFactory(Protocol):
    """What :data:`ENGINES` holds for a kind: the two ways to build its engine."""

    def from_job(self, job: JobConfig) -> Engine:
        """An engine over the job's models (a worker's, built once)."""
        ...

    def from_recipe(self, recipe: Any, *, load: LoadConfig | None = None) -> Engine:
        """An engine holding just what ``recipe`` needs (``evomerge merge``)."""
        ...


ENGINES = Registry("recipe engine")
ENGINES.register("ps", "evomerge.engines:PSEngine")
ENGINES.register("dfs", "evomerge.dfs.engine:DFSEngine")


def no_engine_message(kind: str) -> str:
    return (
        f"recipe kind {kind!r} has no engine in this version (engines: "
        f"{', '.join(ENGINES.names())}); a {kind} recipe can be stored and exported as a "
        "recipe YAML (--format recipe), not merged or exported as a model or mergekit config"
    )


def engine_factory(kind: str) -> EngineFactory:
    """The factory registered for recipe kind ``kind``; ValueError if there is none."""
    if kind not in ENGINES:
        raise ValueError(no_engine_message(kind))
    factory: EngineFactory = ENGINES.get(kind)
    return factory


def engine_for(recipe: Any, *, load: LoadConfig | None = None) -> Engine:
    """An engine for ``recipe``'s kind holding just what it needs."""
    return engine_factory(recipe.kind).from_recipe(recipe, load=load)


class PSEngine:
    """The Workspace as the ps engine: ps recipes in, ``(model, tokenizer)`` out.

    It refuses what the Workspace cannot merge (another kind, a legacy ``dfs`` path, an inline
    recipe as a source) with a ValueError; see :meth:`Workspace.apply`.
    """

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self.num_layers = workspace.num_layers

    @classmethod
    def from_job(cls, job: JobConfig) -> PSEngine:
        from evomerge.merge.workspace import Workspace

        base = "base" if job.models.base is not None else None
        return cls(Workspace(job.models.sources(), base, load=job.load))

    @classmethod
    def from_recipe(cls, recipe: Any, *, load: LoadConfig | None = None) -> PSEngine:
        from evomerge.merge.workspace import Workspace

        return cls(Workspace.from_recipe(recipe, load=load))

    def apply(self, recipe: Any) -> tuple[Any, Any]:
        return self.workspace.apply(recipe), self.workspace.tokenizer
