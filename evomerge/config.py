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
        None, ge=0, description="cap on each merge cache (TIES tables, DARE levels); "
        "None: half the free device memory"
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
    size: Literal["tiny", "small"] = "small"


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
    stop: tuple[str, ...] = ("\n",)
    normalize: Literal["none", "strip", "lower_strip"] = "strip"


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


class ParameterSpaceConfig(Strict):
    name: Literal["parameter"]
    method: str = "ties"
    per_model: Bool = True
    layer_groups: Int = Field(1, ge=1)
    module_kinds: Bool = False
    bounds: dict[str, Bounds] = Field(default_factory=dict)
    fixed: dict[str, Any] = Field(default_factory=dict, description="global method parameters")
    non_layer: Literal["first", "base"] = "first"

    @model_validator(mode="after")
    def _method(self) -> ParameterSpaceConfig:
        _check_method(self.method)
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
    """Declared so the name is known; refused until a DFS engine exists."""

    name: Literal["dfs"]
    repeats: Int = Field(2, ge=1)
    max_path_length: Int | None = Field(None, ge=1)
    scale_bounds: Bounds = Bounds(low=0.5, high=1.5)
    embed_from: str | None = None

    @field_validator("name")
    @classmethod
    def _not_yet(cls, value: str) -> str:
        raise ValueError(
            "'dfs' is not available yet (no DFS search engine exists); use name: parameter"
        )


SearchSpaceConfig = Annotated[ParameterSpaceConfig | DFSSpaceConfig, Field(discriminator="name")]


class CmaesConfig(Strict):
    name: Literal["cmaes"]
    sigma0: Float | None = Field(None, gt=0)
    popsize: Int | None = Field(None, ge=2)
    separable: Bool = False
    seed: Int = 0
    start: Literal["center", "uniform"] = Field(
        "center", description="first mean: the bounds' middle or the uniform-merge baseline"
    )
    restarts: Int = Field(0, ge=0)
    inc_popsize: Int = Field(2, ge=1)
    restart_patience: Int = Field(10, ge=1)


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


SamplerConfig = Annotated[
    CmaesConfig | Nsga2Config | TpeConfig | RandomConfig | GridConfig,
    Field(discriminator="name"),
]


class FidelityConfig(Strict):
    """Successive halving over the fraction of evaluation examples used."""

    fractions: tuple[Float, ...] = (0.25, 1.0)
    reduction_factor: Int = Field(2, ge=2)

    @model_validator(mode="after")
    def _increasing(self) -> FidelityConfig:
        f = self.fractions
        if not f or any(not 0 < x <= 1 for x in f) or list(f) != sorted(set(f)) or f[-1] != 1.0:
            raise ValueError(f"fractions must increase within (0, 1] and end at 1.0, got {f}")
        return self


class SearchConfig(Strict):
    space: SearchSpaceConfig = ParameterSpaceConfig(name="parameter")
    sampler: SamplerConfig = CmaesConfig(name="cmaes")
    trials: Int = Field(32, ge=1)
    baselines: Bool = True
    fidelity: FidelityConfig | None = None
    held_out_top_k: Int = Field(3, ge=0)


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
        if self.metric is not None:
            return self.metric
        return "+".join(f"{w:g}*{m}" for m, w in (self.weights or {}).items())

    @property
    def metrics(self) -> tuple[str, ...]:
        return (self.metric,) if self.metric else tuple(self.weights or {})


class ResourcesConfig(Strict):
    workers: Int = Field(1, ge=1)
    num_cpus: Float = Field(1.0, gt=0)
    num_gpus: Float = Field(0.0, ge=0)
    torch_threads: Int = Field(1, ge=1)
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
        return self

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")


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
