"""Every job-config model, in one module (pydantic v2, frozen, unknown keys refused).

``load_job(path)`` reads a YAML job, validates it and raises :class:`ConfigError` whose message
names the dotted key (``evaluators.1.split``) and, for a wrong key or name, the allowed values.

>>> cfg = JobConfig.model_validate({
...     "name": "demo",
...     "models": {"base": {"path": "b"}, "experts": {"x": {"path": "x"}}},
...     "evaluators": [{"name": "entropy", "data": "d.jsonl"}],
...     "objectives": [{"metric": "entropy/d", "direction": "minimize"}],
... })
>>> cfg.search.sampler.name
'cmaes'
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from evomerge.merge.methods_spec import METHODS, VALID_RANGE  # each parameter's valid range
from evomerge.strict import (
    Bool,
    ConfigError,
    Float,
    Int,
    KeyedValueError,
    Strict,
    format_validation_error,
)
from evomerge.yaml_file import read_yaml

# A plain name: a file or folder name that stays where it is put (not '.', '..', '.hidden').
PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


def plain_name_message(value: str) -> str:
    return (
        f"{value!r} is not a plain name; use letters, digits, '_', '-' and '.' (not first), "
        "e.g. 'my-run'"
    )


# -- models ----------------------------------------------------------------------------------
class ModelSource(Strict):
    path: str = Field(min_length=1, description="local folder or Hugging Face hub id")
    revision: str | None = None

    @property
    def source(self) -> str:
        """The Recipe's source string: ``path`` or ``hub/id@revision``."""
        return f"{self.path}@{self.revision}" if self.revision else self.path


class ModelsConfig(Strict):
    base: ModelSource | None = None
    experts: dict[str, ModelSource]

    @model_validator(mode="after")
    def _names(self) -> ModelsConfig:
        if not self.experts:
            raise ValueError("experts is empty; list at least one model to merge")
        if "base" in self.experts:
            raise ValueError("'base' is reserved for models.base; rename that expert")
        for name in self.experts:  # names become parameter names (w/{name}/0)
            if not PLAIN_NAME.fullmatch(name):
                raise KeyedValueError(f"experts.{name}", plain_name_message(name))
        return self

    def sources(self) -> dict[str, str]:
        """name -> source string, the base (as ``base``) first."""
        out = {"base": self.base.source} if self.base is not None else {}
        return {**out, **{name: m.source for name, m in self.experts.items()}}


class LoadConfig(Strict):
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "cpu"
    allow_pickle: Bool = False
    trust_remote_code: Bool = False
    merge_cache_bytes: Int | None = Field(
        None, ge=0, description="cap on each merge cache (TIES argsort orders, DELLA ranks; "
        "DARE needs none); None: half the free device memory"
    )
    tie_order: Literal["mergekit", "index"] = Field(
        "mergekit", description="which tied entries TIES/breadcrumbs keep where a trim bound "
        "cuts a group of equal magnitudes: mergekit (its argsort's choice, entry for entry; "
        "sorts those task vectors) or index (the lowest flat indices; selection only, no sort)"
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", value):
            raise ValueError(f"{value!r} is not a device; use cpu, cuda, cuda:N or mps")
        return value


class ToySuiteConfig(Strict):
    """Build the toy suite into ``dir`` before the job if it is not there (cached)."""

    dir: str = "toy_suite"
    size: Literal["tiny", "small", "smollm2", "smollm2-quick"] = "small"


# -- evaluators ------------------------------------------------------------------------------
class DataEvalConfig(Strict):
    """Shared part of the evaluators over local JSONL data (``name`` set by each subclass)."""

    name: str
    data: str = Field(description="a folder with {split}.jsonl files, or one .jsonl file")
    split: str = "validation"
    held_out_split: str | None = "test"
    label: str | None = Field(None, description="metric suffix; default: the data's stem")
    limit: Int | None = Field(None, ge=1)
    held_out_limit: Int | None = Field(None, ge=1)
    batch_size: Int = Field(32, ge=1)


class EntropyEvalConfig(DataEvalConfig):
    name: Literal["entropy"]
    field: str = "prompt"


class AccuracyEvalConfig(DataEvalConfig):
    name: Literal["accuracy"]
    max_new_tokens: Int = Field(32, ge=1)
    stop: tuple[str, ...] | None = Field(
        None, description="stop strings; default: a newline, or only the end of the turn "
        "(EOS) with chat_template"
    )
    normalize: Literal["none", "strip", "lower_strip"] = "strip"
    field: str = Field("prompt", description="the row key holding the prompt (the user turn)")
    chat_template: Bool = False
    system: str | None = Field(None, description="a system turn (needs chat_template: true)")
    speculative: Bool = Field(
        True, description="verify each prompt's previous answer in one forward pass (greedy "
        "output unchanged); false: generate every token"
    )

    @model_validator(mode="after")
    def _system_needs_chat(self) -> AccuracyEvalConfig:
        if self.system is not None and not self.chat_template:
            raise KeyedValueError(
                "system", "a system prompt is only used with chat_template: true; set "
                "chat_template: true or remove system"
            )
        return self


class PerplexityEvalConfig(DataEvalConfig):
    name: Literal["perplexity"]
    field: str = "text"
    max_length: Int = Field(512, ge=2)


class LmEvalConfig(Strict):
    name: Literal["lm_eval"]
    tasks: tuple[str, ...] = Field(min_length=1)
    include_path: str | None = None
    num_fewshot: Int | None = Field(None, ge=0)
    limit: Int | None = Field(None, ge=1)
    held_out_limit: Int | None = Field(None, ge=1)
    batch_size: Int = Field(32, ge=1)
    split: str = "validation"
    held_out_tasks: tuple[str, ...] = ()
    speculative: Bool = Field(
        True, description="greedy generate_until requests run on evomerge's generation "
        "(shared prefix once, previous answers verified in one pass); false: lm-eval's own"
    )


class CostEvalConfig(Strict):
    name: Literal["cost"]
    latency: Bool = False
    latency_tokens: Int = Field(32, ge=1)


EvaluatorConfig = Annotated[
    EntropyEvalConfig | AccuracyEvalConfig | PerplexityEvalConfig | LmEvalConfig | CostEvalConfig,
    Field(discriminator="name"),
]


# -- search ----------------------------------------------------------------------------------
class Bounds(Strict):
    low: Float
    high: Float
    log: Bool = False

    @model_validator(mode="after")
    def _order(self) -> Bounds:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) > high ({self.high}); swap them")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got {self.low}")
        return self


def _check_method(name: str) -> None:
    if name not in METHODS:
        from evomerge.registry import unknown_name_message

        raise ValueError(unknown_name_message("merge method", name, sorted(METHODS)))


def range_text(key: str) -> str:
    low, high, low_in, high_in = VALID_RANGE[key]
    if math.isinf(low) and math.isinf(high):
        return "(any finite number)"
    return f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def in_range(key: str, value: float) -> bool:
    low, high, low_in, high_in = VALID_RANGE.get(key, (-math.inf, math.inf, False, False))
    above = value >= low if low_in else value > low
    below = value <= high if high_in else value < high
    return above and below and math.isfinite(value)


class ScheduleConfig(Strict):
    """``search.space.schedule``: each searched coefficient is a schedule over depth (see
    :class:`evomerge.recipe.Schedule`): ``linear`` (2 parameters) or ``piecewise`` with
    ``knots`` (K >= 2 parameters) per model, parameter and module kind."""

    kind: Literal["linear", "piecewise"]
    knots: Int | None = Field(None, ge=2)

    @model_validator(mode="after")
    def _knots(self) -> ScheduleConfig:
        if self.kind == "linear" and self.knots is not None:
            raise KeyedValueError("knots", "a linear schedule has 2 parameters and takes no "
                                  "knots; drop knots, or use kind: piecewise")
        if self.kind == "piecewise" and self.knots is None:
            raise KeyedValueError("knots", "a piecewise schedule needs knots (2 or more), "
                                  "e.g. {kind: piecewise, knots: 3}")
        return self

    @property
    def size(self) -> int:
        """Parameters per scheduled coefficient."""
        return 2 if self.knots is None else self.knots


class ParameterSpaceConfig(Strict):
    name: Literal["parameter"]
    method: str = "ties"
    per_model: Bool = True
    layer_groups: Int = Field(1, ge=1)
    module_kinds: Bool = False
    schedule: ScheduleConfig | None = None
    bounds: dict[str, Bounds] = Field(default_factory=dict)
    fixed: dict[str, Any] = Field(default_factory=dict, description="global method parameters")
    non_layer: Literal["first", "base"] = "first"

    @model_validator(mode="after")
    def _method(self) -> ParameterSpaceConfig:
        _check_method(self.method)
        if self.schedule is not None and self.layer_groups > 1:
            raise KeyedValueError("schedule", f"a schedule replaces layer_groups (here "
                                  f"{self.layer_groups}); drop layer_groups or the schedule")
        spec = METHODS[self.method]
        known = set(spec.model_params) | set(spec.global_params)
        for key, b in self.bounds.items():
            if key not in known:
                raise ValueError(
                    f"bounds.{key} is not a parameter of {self.method}; allowed: {sorted(known)}"
                )
            for end in ("low", "high"):
                if not in_range(key, getattr(b, end)):
                    raise KeyedValueError(
                        f"bounds.{key}.{end}",
                        f"{getattr(b, end)} is outside {key}'s valid range {range_text(key)}; "
                        "keep both bounds inside it",
                    )
        flags = set(spec.flags) | set(spec.global_params)
        for key, value in self.fixed.items():
            if key not in flags:
                raise ValueError(
                    f"fixed.{key} is not a parameter of {self.method}; allowed: {sorted(flags)}"
                )
            _check_fixed(key, value, is_flag=key in spec.flags)
        return self


def _check_fixed(key: str, value: Any, *, is_flag: bool) -> None:
    if is_flag:
        if not isinstance(value, bool):
            raise KeyedValueError(f"fixed.{key}", f"expected true or false, got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not in_range(key, value):
        where = range_text(key).removeprefix("(any ").removesuffix(")")
        where = where if where == "finite number" else f"number in {where}"
        raise KeyedValueError(f"fixed.{key}", f"expected a {where}, got {value!r}")


class DFSSpaceConfig(Strict):
    """Data-flow space (DESIGN.md section 4; :mod:`evomerge.search_spaces.dfs`): a path through
    the decoder layers of ``models``, their layer sequence repeated ``repeats`` times."""

    name: Literal["dfs"]
    models: tuple[str, ...] | None = Field(
        None, description="the sources taking part, model A first; default: every expert "
        "(after the recipes)"
    )
    recipes: dict[str, str | dict[str, Any]] = Field(
        default_factory=dict, description="name -> ps recipe (a YAML file or a mapping) whose "
        "merged model is a source"
    )
    repeats: Int = Field(2, ge=1, description="r: the layer sequence is repeated r times")
    max_path_length: Int | None = Field(None, ge=1, description="most layers on a path")
    too_long: Literal["fail", "truncate"] = Field(
        "fail", description="a longer path: a failed trial, or its first max_path_length layers"
    )
    scales: Literal["slot", "matrix"] = Field(
        "slot", description="one scale per slot, or the full M x M transition matrix W"
    )
    scale_bounds: Bounds = Bounds(low=0.5, high=1.5)
    embed_from: str | None = Field(None, description="default: model A")
    fix_first: Bool = Field(False, description="every path starts with model A's first layer")
    fix_last: Bool = Field(False, description="every path ends with model A's last layer")
    num_layers: dict[str, Int] | None = Field(
        None, description="decoder layers per model; default: read from each config.json"
    )

    @model_validator(mode="after")
    def _check(self) -> DFSSpaceConfig:
        b = self.scale_bounds
        if not b.low <= 1.0 <= b.high or b.low <= 0:
            raise KeyedValueError(
                "scale_bounds", f"[{b.low:g}, {b.high:g}] must be positive and contain 1.0 "
                "(the start path, model A, has every scale 1); e.g. {low: 0.5, high: 1.5}"
            )
        for name, recipe in self.recipes.items():
            if not PLAIN_NAME.fullmatch(name):
                raise KeyedValueError(f"recipes.{name}", plain_name_message(name))
            if isinstance(recipe, dict):
                _check_inline_recipe(f"recipes.{name}", recipe)
        for name, n in (self.num_layers or {}).items():
            if n < 1:
                raise KeyedValueError(f"num_layers.{name}", f"is {n}; give a count >= 1")
        return self


def _check_inline_recipe(key: str, data: dict[str, Any]) -> None:
    from evomerge.recipe import Recipe, ps_recipe

    try:
        ps_recipe(Recipe.from_dict(data), user="a dfs source",
                  fix="give the merged models' folders as its sources")
    except ValidationError as err:
        raise KeyedValueError(key, f"is not a ps recipe: {format_validation_error(err)}") from None
    except ValueError as err:
        raise KeyedValueError(key, f"is not a ps recipe: {err}") from None


def check_dfs_space(
    space: DFSSpaceConfig, models: ModelsConfig, *, key: str, winner: str | None = None
) -> None:
    """The dfs space's names against the job's models: ``models`` (default: the experts),
    ``embed_from`` and ``num_layers`` name sources; at least two models take part. ``winner``
    is the name the PS winner takes in phase 2 of a ``search.then`` job."""
    known = [*models.sources(), *space.recipes, *([winner] if winner else [])]
    clash = [n for n in [*space.recipes, *([winner] if winner else [])] if n in models.sources()]
    if clash:
        raise KeyedValueError(f"{key}.recipes.{clash[0]}", f"{clash[0]!r} is already a model "
                              "name (models.base / models.experts); rename the recipe")
    taking = list(space.models or default_dfs_models(space, models, winner=winner))
    for i, name in enumerate(taking):
        if name not in known:
            from evomerge.registry import unknown_name_message

            raise KeyedValueError(f"{key}.models.{i}", unknown_name_message("model", name, known))
    if len(set(taking)) != len(taking):
        raise KeyedValueError(f"{key}.models", f"{list(taking)} lists a model twice; list each "
                              "once (repeats repeats the whole sequence)")
    if len(taking) < 2:
        raise KeyedValueError(f"{key}.models", f"{taking} is one model; a dfs path needs 2 or "
                              "more (list them in models, or add experts)")
    if space.embed_from is not None and space.embed_from not in taking:
        raise KeyedValueError(f"{key}.embed_from", f"{space.embed_from!r} is not one of the "
                              f"models taking part ({', '.join(taking)})")
    for name in space.num_layers or {}:
        if name not in taking:
            raise KeyedValueError(f"{key}.num_layers.{name}", f"{name!r} is not one of the "
                                  f"models taking part ({', '.join(taking)})")


def default_dfs_models(
    space: DFSSpaceConfig, models: ModelsConfig, *, winner: str | None = None
) -> tuple[str, ...]:
    """The models a dfs space takes when ``models`` is not given: the PS winner (phase 2), the
    recipes, then the experts (not the base)."""
    return space.models or (*([winner] if winner else []), *space.recipes, *models.experts)


SearchSpaceConfig = Annotated[ParameterSpaceConfig | DFSSpaceConfig, Field(discriminator="name")]


class CoarseConfig(Strict):
    """``search.sampler.coarse`` of cmaes: the first ``trials`` sampler trials search one value
    per model and parameter (every layer group / knot / kind of it shares it), then CMA-ES
    over the whole space starts at the best of them (:mod:`evomerge.search.coarse`)."""

    trials: Int = Field(ge=2, description="sampler trials of the coarse (per-model) phase")
    sigma0: Float = Field(0.25, gt=0, description="coarse step size, in [0, 1] units")
    popsize: Int | None = Field(None, ge=2, description="default: cmaes' for the coarse size")


class CmaesConfig(Strict):
    name: Literal["cmaes"]
    sigma0: Float | None = Field(None, gt=0)
    popsize: Int | None = Field(None, ge=2)
    separable: Bool = False
    seed: Int = 0
    start: Literal["center", "uniform", "adamerging"] = Field(
        "center", description="first mean: the bounds' middle, the uniform-merge baseline, or "
        "the coefficients AdaMerging learns before the search (the job's adamerging settings)"
    )
    restarts: Int = Field(0, ge=0)
    inc_popsize: Int = Field(2, ge=1)
    restart_patience: Int = Field(10, ge=1)
    coarse: CoarseConfig | None = Field(
        None, description="coarse to fine: per-model trials first, then per layer; sigma0 is "
        "then the fine phase's (default: half of coarse.sigma0)"
    )

    @model_validator(mode="after")
    def _coarse_sigma(self) -> CmaesConfig:
        coarse = self.coarse
        if coarse is not None and self.sigma0 is not None and self.sigma0 > coarse.sigma0:
            raise KeyedValueError(
                "sigma0", f"{self.sigma0} is larger than coarse.sigma0 ({coarse.sigma0}); "
                "the fine phase refines the coarse winner with a smaller step: lower sigma0 or "
                "raise coarse.sigma0"
            )
        return self


class Nsga2Config(Strict):
    name: Literal["nsga2"]
    population_size: Int = Field(16, ge=2)
    seed: Int = 0


class TpeConfig(Strict):
    name: Literal["tpe"]
    n_startup_trials: Int = Field(10, ge=0)
    seed: Int = 0


class RandomConfig(Strict):
    name: Literal["random"]
    seed: Int = 0


class GridConfig(Strict):
    name: Literal["grid"]
    points: Int = Field(5, ge=2, description="grid points per searched parameter")
    seed: Int = 0


class GpConfig(Strict):
    """Optuna's Gaussian-process sampler (``optuna.samplers.GPSampler``; logEI, qLogEI over
    running trials): few evaluations, but each ask costs more as trials grow."""

    name: Literal["gp"]
    n_startup_trials: Int = Field(10, ge=0, description="random trials before the GP")
    seed: Int = 0
    deterministic_objective: Bool = Field(False, description="fit no observation noise")


SamplerConfig = Annotated[
    CmaesConfig | Nsga2Config | TpeConfig | RandomConfig | GridConfig | GpConfig,
    Field(discriminator="name"),
]


class SubsetConfig(Strict):
    """``search.fidelity.subset``: after ``warmup`` candidates scored on the whole fitness split,
    score every later one on ``size`` examples per label, chosen from the warm-up candidates'
    per-example scores (``anchors``) or at random (:mod:`evomerge.search.anchors`).
    ``method: random, warmup: 0`` draws the subset before the first trial: every trial, the
    baselines too, is scored on it. ``confirm: K`` re-scores the top K trials by their subset
    estimate on the whole fitness split after the last trial; the best of those (by the full
    score) is then the best trial (:mod:`evomerge.search.fidelity`)."""

    method: Literal["anchors", "random"] = "anchors"
    size: Int = Field(ge=1, description="examples per label (per task) in the subset")
    warmup: Int = Field(8, ge=0, description="candidates scored in full to choose it from "
                        "(random: 0 draws it up front)")
    seed: Int = 0
    confirm: Int = Field(0, description="after the last trial, re-score the top K trials by "
                         "subset estimate on the whole fitness split (0: off)")

    @field_validator("confirm")
    @classmethod
    def _confirm_count(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"must be 0 (off) or how many of the top trials to re-score on "
                             f"the whole fitness split, e.g. 3; got {value}")
        return value

    @model_validator(mode="after")
    def _anchors_need_warmup(self) -> SubsetConfig:
        if self.method == "anchors" and self.warmup < 3:
            raise KeyedValueError("warmup", f"must be at least 3 with method: anchors (the "
                                  f"anchors are chosen from the warm-up candidates' scores), "
                                  f"got {self.warmup}; set warmup: 8, or method: random")
        return self


class FidelityConfig(Strict):
    """Successive halving over the fraction of evaluation examples used.

    ``mode: fixed`` scores each candidate at ``fractions`` in turn. ``mode: auto`` picks the
    cheap rung among ``fractions``: the first ``warmup`` candidates are scored at every
    fraction, the smallest fraction whose Kendall tau against the full score is at least
    ``threshold`` is used (rungs: it, then 1.0), and one more candidate is scored at every
    fraction after each ``recheck_every`` (:class:`evomerge.search.rank_fidelity.AutoFidelity`).
    """

    mode: Literal["fixed", "auto"] = "fixed"
    fractions: tuple[Float, ...] = (0.25, 1.0)
    reduction_factor: Int = Field(2, ge=2)
    threshold: Float = Field(0.8, ge=-1, le=1, description="auto: the tau a fraction needs")
    warmup: Int = Field(8, ge=3, description="auto: candidates scored at every fraction first")
    recheck_every: Int = Field(16, ge=1, description="auto: candidates between re-checks")
    subset: SubsetConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _subset_scores_in_full(cls, data: Any) -> Any:  # no cheap rung unless one is given
        if isinstance(data, dict) and data.get("confirm") is not None:
            raise KeyedValueError("confirm", "confirms the estimates of a subset and is a key "
                                  "of subset; write subset: {method: random, size: 16, "
                                  "warmup: 0, confirm: 3}, or remove confirm")
        if isinstance(data, dict) and data.get("subset") is not None and "fractions" not in data:
            return {**data, "fractions": [1.0]}
        return data

    @model_validator(mode="after")
    def _increasing(self) -> FidelityConfig:
        f = self.fractions
        if not f or any(not 0 < x <= 1 for x in f) or list(f) != sorted(set(f)) or f[-1] != 1.0:
            raise ValueError(f"fractions must increase within (0, 1] and end at 1.0, got {f}")
        auto_only = [  # a dumped config holds the defaults: only a changed value is refused
            k for k in ("threshold", "warmup", "recheck_every")
            if getattr(self, k) != type(self).model_fields[k].default
        ]
        if self.mode == "fixed" and auto_only:
            raise KeyedValueError(auto_only[0], "is only used with mode: auto; add mode: auto "
                                  "or remove it")
        if self.subset is not None and (self.mode == "auto" or len(f) > 1):
            raise KeyedValueError("subset", f"replaces the cheap rungs (every candidate after "
                                  f"the warm-up is scored on the subset only), but mode is "
                                  f"{self.mode} with fractions {list(f)}; remove fractions "
                                  "and mode, or remove subset")
        if self.mode == "auto":
            if len(f) < 2:
                raise KeyedValueError("fractions", f"mode: auto chooses among the fractions "
                                      f"below 1.0, got {list(f)}; list some, e.g. "
                                      "[0.1, 0.25, 0.5, 1.0]")
        return self


class SearchConfig(Strict):
    space: SearchSpaceConfig = ParameterSpaceConfig(name="parameter")
    sampler: SamplerConfig = CmaesConfig(name="cmaes")
    trials: Int = Field(32, ge=1)
    baselines: Bool = True
    fidelity: FidelityConfig | None = None
    held_out_top_k: Int = Field(3, ge=0)
    trial_timeout: Float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="seconds one worker call may run; past it the worker is killed and "
        "restarted and that trial fails (default: no limit)",
    )
    then: ThenConfig | None = Field(
        None, description="phase 2: a dfs search over the phase-1 (ps) winner and the models"
    )


class Objective(Strict):
    metric: str | None = None
    weights: dict[str, Float] | None = Field(None, description="weighted mean of several metrics")
    direction: Literal["maximize", "minimize"] = "maximize"

    @model_validator(mode="after")
    def _one(self) -> Objective:
        if (self.metric is None) == (self.weights is None):
            raise ValueError("give exactly one of 'metric' or 'weights'")
        if self.weights is not None and sum(self.weights.values()) == 0:
            raise KeyedValueError(
                "weights", f"{self.weights or '{}'} sums to 0 (the objective is the weighted "
                "mean); give weights with a non-zero sum, e.g. {metric_a: 1, metric_b: 1}"
            )
        return self

    @property
    def label(self) -> str:
        """What the objective is, in words a reader does not misread as a sum: the metric, or
        ``mean(a, b)`` (equal weights), or ``weighted_mean(a=2, b=1)``."""
        if self.metric is not None:
            return self.metric
        weights = self.weights or {}
        if len(set(weights.values())) <= 1:
            return f"mean({', '.join(weights)})"
        return f"weighted_mean({', '.join(f'{m}={w:g}' for m, w in weights.items())})"

    @property
    def metrics(self) -> tuple[str, ...]:
        return (self.metric,) if self.metric else tuple(self.weights or {})


class ThenConfig(Strict):
    """Phase 2 of a PS-then-DFS job (:mod:`evomerge.search.phases`): a dfs search whose
    models include the phase-1 winner (the best ps trial on the fitness split) as ``winner``.
    Studies ``{name}/ps`` and ``{name}/dfs`` of one run."""

    space: DFSSpaceConfig
    sampler: SamplerConfig = CmaesConfig(name="cmaes")
    trials: Int = Field(32, ge=1)
    baselines: Bool = True
    fidelity: FidelityConfig | None = None
    held_out_top_k: Int = Field(3, ge=0)
    objectives: tuple[Objective, ...] | None = Field(
        None, min_length=1, description="phase 2's objectives; default: the job's"
    )
    winner: str = Field("ps", description="the phase-1 winner's name among the dfs models")

    @field_validator("winner")
    @classmethod
    def _plain_winner(cls, value: str) -> str:
        if not PLAIN_NAME.fullmatch(value):
            raise ValueError(plain_name_message(value))
        return value


class ResourcesConfig(Strict):
    workers: Int = Field(1, ge=1)
    num_cpus: Float = Field(1.0, gt=0)
    num_gpus: Float = Field(0.0, ge=0)
    torch_threads: Int = Field(1, ge=1)
    custom_resources: dict[str, Float] = Field(
        default_factory=dict, description="Ray custom resources per worker, e.g. {node2: 1}"
    )
    address: str | None = Field(None, description="Ray address; None starts a local Ray")


class AdaMergingConfig(Strict):
    granularity: Literal["task", "layer"] = "layer"
    ties: Bool = Field(False, description="AdaMerging++: TIES-trimmed task vectors")
    density: Float = Field(0.5, gt=0, le=1)
    init: Float = Field(0.3, ge=0, le=1)
    lr: Float = Field(1e-3, gt=0)
    steps: Int = Field(500, ge=1)
    batch_size: Int = Field(16, ge=1)
    seed: Int = 0


class JobConfig(Strict):
    name: str
    run_dir: str | None = Field(None, description="default: runs/{name}")
    toy_suite: ToySuiteConfig | None = None
    models: ModelsConfig
    load: LoadConfig = LoadConfig()
    search: SearchConfig = SearchConfig()
    evaluators: tuple[EvaluatorConfig, ...] = Field(min_length=1)
    objectives: tuple[Objective, ...] = Field(min_length=1)
    resources: ResourcesConfig = ResourcesConfig()
    storage: str | None = Field(None, description="Optuna storage URL; default: journal file")
    storage_fsync: Bool = Field(
        False, description="fsync every journal record (only an OS crash or power loss can "
        "lose unsynced records; ~1 ms per record)"
    )
    allow_test_split: Bool = False
    adamerging: AdaMergingConfig | None = None

    @field_validator("name")
    @classmethod
    def _plain(cls, value: str) -> str:  # the study name and the default runs/{name}
        if not PLAIN_NAME.fullmatch(value):
            raise ValueError(plain_name_message(value))
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> JobConfig:
        space = self.search.space
        if isinstance(space, ParameterSpaceConfig) and METHODS[space.method].needs_base:
            if self.models.base is None:
                raise KeyedValueError(
                    "models.base", f"is missing: method {space.method!r} needs models.base; "
                    "add it, or use method: linear"
                )
        if isinstance(space, ParameterSpaceConfig):
            most = METHODS[space.method].max_models
            if most is not None and len(self.models.experts) > most:
                raise KeyedValueError(
                    "models.experts", f"{space.method} merges at most {most} model(s) into the "
                    f"base, got {len(self.models.experts)}; list {most}, or use another method"
                )
        if not self.allow_test_split:
            for i, ev in enumerate(self.evaluators):
                if getattr(ev, "split", None) == "test":
                    raise KeyedValueError(
                        f"evaluators.{i}.split", "is 'test': optimising on the test split leaks "
                        "it into the search. Use 'validation', or set allow_test_split: true"
                    )
        multi = len(self.objectives) > 1
        if multi and self.search.sampler.name == "cmaes":
            raise KeyedValueError(
                "search.sampler.name", "cmaes is single-objective; use nsga2 or tpe for "
                "several objectives, or combine the metrics in one objective with 'weights'"
            )
        _check_distinct_metrics(self.evaluators)
        _check_dfs_job(self)
        return self

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")


def _check_dfs_job(job: JobConfig) -> None:
    """A dfs space's model names; a ``search.then`` job: ps first, one winner, samplers that
    fit phase 2's objectives."""
    if isinstance(job.search.space, DFSSpaceConfig):
        check_dfs_space(job.search.space, job.models, key="search.space")
    then = job.search.then
    if then is None:
        return
    if not isinstance(job.search.space, ParameterSpaceConfig):
        raise KeyedValueError("search.then", "follows a ps search: set search.space.name: "
                              "parameter (phase 1), or drop search.then")
    if len(job.objectives) > 1:
        raise KeyedValueError("objectives", f"has {len(job.objectives)} objectives, but phase 1 "
                              "of a search.then job picks one winner; give one objective (put "
                              "Pareto objectives in search.then.objectives)")
    check_dfs_space(then.space, job.models, key="search.then.space", winner=then.winner)
    if len(then.objectives or job.objectives) > 1 and then.sampler.name == "cmaes":
        raise KeyedValueError("search.then.sampler.name", "cmaes is single-objective; use "
                              "nsga2 or tpe for several search.then.objectives")


def _check_distinct_metrics(evaluators: tuple[Any, ...]) -> None:
    """Two evaluators writing the same metric name would overwrite each other's score."""
    from evomerge.evaluators.base import default_label

    seen: dict[str, int] = {}
    for i, ev in enumerate(evaluators):
        if not hasattr(ev, "data"):
            continue
        metric = f"{ev.name}/{ev.label or default_label(ev.data)}"
        if metric in seen:
            raise KeyedValueError(
                f"evaluators.{i}", f"produces {metric!r} like evaluators.{seen[metric]}; give "
                "one of them a distinct 'label'"
            )
        seen[metric] = i


def parse_job(data: Any, *, source: str = "job config") -> JobConfig:
    """Validate a job mapping; :class:`ConfigError` names the first bad key on one line."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping (key: value lines) at the top level, got "
            f"{type(data).__name__}"
        )
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {format_validation_error(err)}") from None


def load_job(path: str | Path) -> JobConfig:
    """Read and validate a YAML job config (duplicate keys and tags refused)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"job config {str(p)!r} does not exist; check the path")
    return parse_job(read_yaml(p), source=str(p))
