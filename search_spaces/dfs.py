"""Data-flow space (DFS, Sakana AI 2024 section 3.2): Optuna parameters <-> a layer path.

The decoder layers of the models taking part (``models``, model A first) are laid out in order,
``M`` of them, and the sequence is repeated ``r`` times: ``T = M * r`` slots. Every parameter is
a float, so CMA-ES searches them all (Optuna would sample a categorical at random):

- ``dfs/i/{t}`` in [-1, 1], one indicator per slot: slot ``t`` is on the path iff it is > 0;
- scales, in ``scale_bounds``, multiply the hidden state as it enters a layer, in one of two
  forms (``scales``):

  - ``slot`` (default): ``dfs/s/{t}``, the scale entering slot ``t`` when the slot is used;
  - ``matrix``: the paper's full ``W`` in R^{M x M}, ``dfs/s/{i}/{j}`` entering layer ``j``
    (of the M) from layer ``i``; the first layer of a path enters from the embeddings at 1.

Why ``slot`` is the default: a path of at most ``T`` layers crosses at most ``T - 1`` of W's
``M^2`` transitions, each once, so one scale per slot is a ``T``-dimensional form that covers
every path (``2T`` parameters against ``T + M^2``; on the toy suite, M = 12 and r = 2, 48
against 168). CMA-ES needs on the order of ``n^2`` evaluations to adapt its covariance, so on
a budget of a few hundred evaluations the smaller space is the one it can search; a per-slot
scale can also differ between two passes of the same transition at different depths. Its cost:
turning an earlier slot on or off changes which layer a later scale follows (W does not have
that coupling). The paper's other proposal for large M, ``W_ij = f_theta(i, j)``, would need a
network and its own parameter names; ``matrix`` is there for small M.

Embeddings, final norm, head and tokenizer come from ``embed_from`` (default: model A). With
``fix_first`` / ``fix_last`` (the paper fixes model A's), every path begins with A's first
layer / ends with A's last one (entered at scale 1 in ``slot`` form); they are not among the T
slots. The start point (:meth:`DFSSpace.start`, CMA-ES's first mean with ``start: uniform``,
and the ``init`` baseline) is the paper's: model A's first repetition on, every other slot off,
every scale 1, i.e. model A itself (slots a fixed layer duplicates stay off).

A point whose path is empty (every indicator <= 0 and no fixed layer), or longer than
``max_path_length`` with ``too_long: fail``, is no candidate: :meth:`DFSSpace.decode` raises
:class:`InvalidCandidate`, which the search loop stores as a failed trial with the reason.
``too_long: truncate`` keeps the first ``max_path_length`` layers instead (the fixed last layer
stays last).

>>> from evomerge.config import DFSSpaceConfig, ModelsConfig
>>> models = ModelsConfig(experts={"a": {"path": "a"}, "b": {"path": "b"}})
>>> cfg = DFSSpaceConfig(name="dfs", repeats=2, num_layers={"a": 2, "b": 2})
>>> space = DFSSpace(cfg, models=models)
>>> len(space.distributions()), space.decode(space.start()).layers
(16, (('a', 0), ('a', 1)))
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from optuna.distributions import FloatDistribution

from evomerge.config import DFSSpaceConfig, ModelsConfig, default_dfs_models
from evomerge.recipe import DFSRecipe, Recipe, Source, ps_recipe

ON, OFF = 0.5, -0.5  # indicator values of the start point: 1.5 sigma0 (CMA-ES default) from 0
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


class InvalidCandidate(ValueError):
    """A point of the space that is no candidate (an empty path, a path too long); the search
    loop fails its trial with this message instead of evaluating it."""


class DFSSpace:
    """Maps Optuna parameters to a :class:`~evomerge.recipe.DFSRecipe` and back."""

    many_to_one = True  # indicator magnitudes and unused scales do not reach the recipe

    def __init__(self, cfg: DFSSpaceConfig, *, models: ModelsConfig) -> None:
        self.cfg = cfg
        self.names = list(default_dfs_models(cfg, models))
        self.sources = _sources(cfg, models, self.names)
        self.counts = {n: _num_layers(cfg, n, self.sources[n]) for n in self.names}
        self.sequence = [(n, i) for n in self.names for i in range(self.counts[n])]
        self.M, self.T = len(self.sequence), len(self.sequence) * cfg.repeats
        self.a, self.embed = self.names[0], cfg.embed_from or self.names[0]
        last = (self.a, self.counts[self.a] - 1)
        self.first = [(self.a, 0)] if cfg.fix_first else []
        self.last = [last] if cfg.fix_last else []
        self._check_lengths()

    def _check_lengths(self) -> None:
        most, fixed = self.cfg.max_path_length, len(self.first) + len(self.last)
        if most is None:
            return
        if most <= fixed:
            raise ValueError(
                f"search.space.max_path_length: {most} leaves no room beside the {fixed} fixed "
                "layer(s) (fix_first / fix_last); raise it or unfix them"
            )
        start = self.counts[self.a]
        if self.cfg.too_long == "fail" and start > most:
            raise ValueError(
                f"search.space.max_path_length: {most} is below the start path, model A "
                f"({self.a!r}) with {start} layers; raise it to at least {start}, or set "
                "too_long: truncate"
            )

    # -- parameters ------------------------------------------------------------------------
    def _scale_names(self) -> list[str]:
        if self.cfg.scales == "slot":
            return [f"dfs/s/{t}" for t in range(self.T)]
        return [f"dfs/s/{i}/{j}" for i in range(self.M) for j in range(self.M)]

    def distributions(self) -> dict[str, FloatDistribution]:
        b = self.cfg.scale_bounds
        out = {f"dfs/i/{t}": FloatDistribution(-1.0, 1.0) for t in range(self.T)}
        out.update({n: FloatDistribution(b.low, b.high, log=b.log) for n in self._scale_names()})
        return out

    def clip(self, params: dict[str, float]) -> dict[str, float]:
        dists = self.distributions()
        return {k: min(max(v, dists[k].low), dists[k].high) for k, v in params.items()}

    # -- params <-> recipe -----------------------------------------------------------------
    def used_slots(self, params: Mapping[str, float]) -> list[int]:
        """The slots on the path, in order, after ``too_long: truncate``; InvalidCandidate for
        an empty or (with ``too_long: fail``) too long path."""
        used = [t for t in range(self.T) if float(params[f"dfs/i/{t}"]) > 0]
        fixed = len(self.first) + len(self.last)
        if not used and not fixed:
            raise InvalidCandidate(
                f"every indicator dfs/i/0..{self.T - 1} is <= 0: the path has no layer"
            )
        most = self.cfg.max_path_length
        if most is not None and len(used) + fixed > most:
            if self.cfg.too_long == "fail":
                raise InvalidCandidate(
                    f"the path has {len(used) + fixed} layers, more than "
                    f"search.space.max_path_length {most} (too_long: fail)"
                )
            used = used[: most - fixed]
        return used

    def decode(self, params: Mapping[str, float]) -> DFSRecipe:
        used = self.used_slots(params)
        at = [None] * len(self.first) + [t % self.M for t in used] + [None] * len(self.last)
        layers = self.first + [self.sequence[t % self.M] for t in used] + self.last
        if self.last:
            at[-1] = self.sequence.index(self.last[0])
        if self.first:
            at[0] = 0
        scales = [self._scale(params, used, at, k) for k in range(len(layers))]
        return DFSRecipe(
            sources={n: self.sources[n] for n in self.names},
            layers=tuple(layers),
            scales=tuple(scales),
            embed_from=self.embed,
        )

    def _scale(self, params: Mapping[str, float], used: list[int], at: list[Any], k: int) -> float:
        """The scale entering path position ``k`` (``at``: each position's index in the M)."""
        if self.cfg.scales == "matrix":
            return 1.0 if k == 0 else float(params[f"dfs/s/{at[k - 1]}/{at[k]}"])
        searched = k - len(self.first)
        if 0 <= searched < len(used):
            return float(params[f"dfs/s/{used[searched]}"])
        return 1.0  # a fixed first / last layer

    def encode(self, recipe: DFSRecipe) -> dict[str, float]:
        """A point that decodes to ``recipe`` (a path of this space's shape): each searched
        layer in the earliest free slot after the previous one, indicators at +-0.5, scales
        not on the path at 1."""
        params = {n: 1.0 for n in self._scale_names()} | {f"dfs/i/{t}": OFF for t in range(self.T)}
        inner = len(recipe.layers) - len(self.last)
        t, prev = -1, 0 if self.first else None
        for k in range(len(self.first), len(recipe.layers)):
            j = self.sequence.index(tuple(recipe.layers[k]))  # type: ignore[arg-type]
            if k < inner:
                t = next(s for s in range(t + 1, self.T) if s % self.M == j)
                params[f"dfs/i/{t}"] = ON
                if self.cfg.scales == "slot":
                    params[f"dfs/s/{t}"] = recipe.scales[k]
            if self.cfg.scales == "matrix" and prev is not None:
                params[f"dfs/s/{prev}/{j}"] = recipe.scales[k]
            prev = j
        return params

    # -- start points ------------------------------------------------------------------------
    def _path_of(self, name: str) -> dict[str, float]:
        """``name``'s layers in the first repetition on, minus what a fixed layer duplicates."""
        start = self.sequence.index((name, 0))
        on = set(range(start, start + self.counts[name]))
        if name == self.a:
            on -= {0} if self.first else set()
            on -= {self.counts[self.a] - 1} if self.last else set()
        params = {n: 1.0 for n in self._scale_names()}
        params.update({f"dfs/i/{t}": ON if t in on else OFF for t in range(self.T)})
        return self.clip(params)

    def start(self) -> dict[str, float]:
        """The paper's initialisation: model A's first repetition on (model A itself)."""
        return self._path_of(self.a)

    def baselines(self) -> dict[str, dict[str, float]]:
        """Evaluated first: ``init`` (model A, the start point) and ``path:{m}``, each other
        model's layers once (with ``embed_from``'s embeddings and head, and any fixed layers)."""
        out = {"init": self.start()}
        out.update({f"path:{n}": self._path_of(n) for n in self.names[1:]})
        return out


def pool_recipe(cfg: DFSSpaceConfig, models: ModelsConfig) -> DFSRecipe:
    """A recipe that names every source of the space once (layer 0 of each): the dfs engine
    built from it (``from_recipe``) loads exactly the models, recipes included, that the
    search's candidates use, and not the base unless it takes part."""
    names = list(default_dfs_models(cfg, models))
    return DFSRecipe(sources=_sources(cfg, models, names), layers=tuple((n, 0) for n in names),
                     scales=(1.0,) * len(names), embed_from=cfg.embed_from or names[0])


def _sources(cfg: DFSSpaceConfig, models: ModelsConfig, names: list[str]) -> dict[str, Source]:
    known: dict[str, Source] = dict(models.sources())
    for name, recipe in cfg.recipes.items():
        known[name] = load_recipe(name, recipe)
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(
            f"search.space.models: {missing[0]!r} is neither a model nor a recipe "
            f"({', '.join(known)}); fix the name"
        )
    return {n: known[n] for n in names}


def load_recipe(name: str, recipe: str | Mapping[str, Any]) -> Recipe:
    """``search.space.recipes.{name}``: an inline ps recipe, or a recipe YAML file."""
    key = f"search.space.recipes.{name}"
    if isinstance(recipe, str):
        path = Path(recipe)
        if not path.is_file():
            raise ValueError(f"{key}: recipe file {recipe!r} does not exist; fix the path")
        try:
            data = Recipe.from_yaml(path.read_text(encoding="utf-8"))
        except ValueError as err:
            first = str(err).splitlines()[0]
            raise ValueError(f"{key}: {recipe!r} is no recipe: {first}") from None
    else:
        data = Recipe.from_dict(recipe)
    return ps_recipe(data, user="a dfs source", fix="give the merged models' folders as sources")


def _num_layers(cfg: DFSSpaceConfig, name: str, source: Source) -> int:
    given = (cfg.num_layers or {}).get(name)
    if given is not None:
        return given
    if isinstance(source, Recipe):  # a merge has the layers of the models it merges
        source = next(iter(source.sources.values()))  # type: ignore[assignment]
    key = "models.base.path" if name == "base" else f"models.experts.{name}.path"
    if name in cfg.recipes:
        key = f"search.space.recipes.{name}"
    return read_num_layers(key, str(source))


def read_num_layers(key: str, source: str) -> int:
    """Decoder layers of a model folder or hub id, from its ``config.json`` (no weights)."""
    from evomerge.merge.loading import parse_source

    location, revision = parse_source(source)
    path = Path(location).expanduser() / "config.json"
    if not path.is_file():
        path = _hub_config(key, location, revision)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{key}: cannot read {str(path)!r} ({err}); save the model again"
        ) from None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    n = next((text[k] for k in LAYER_KEYS if k in text), None)
    if not isinstance(n, int) or n < 1:
        raise ValueError(
            f"{key}: {str(path)!r} gives no layer count ({', '.join(LAYER_KEYS)}); set "
            "search.space.num_layers for it"
        )
    return n


def _hub_config(key: str, repo: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, "config.json", revision=revision))
    except Exception as err:  # offline, unknown repo, no network: all mean "no config here"
        raise ValueError(
            f"{key}: {repo!r} is no local model folder and its config.json cannot be fetched "
            f"({type(err).__name__}); fix the path, or set search.space.num_layers"
        ) from None
