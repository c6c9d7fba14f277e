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

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from evomerge.methods_spec import METHODS
from evomerge.strict import ConfigError, Strict, format_validation_error


# -- models ----------------------------------------------------------------------------------
class ModelSource(Strict):
    path: str = Field(description="local folder or Hugging Face hub id")
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
        return self

    def sources(self) -> dict[str, str]:
        """name -> source string, the base (as ``base``) first."""
        out = {"base": self.base.source} if self.base is not None else {}
        return {**out, **{name: m.source for name, m in self.experts.items()}}


class LoadConfig(Strict):
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?|mps)$")
    allow_pickle: bool = False
    trust_remote_code: bool = False
    merge_cache_bytes: int | None = Field(
        None, ge=0, description="cap on each merge cache (TIES tables, DARE levels); "
        "None: half the free device memory"
    )


class ToySuiteConfig(Strict):
    """Build the toy suite into ``dir`` before the job if it is not there (cached)."""

    dir: str = "toy_suite"
    size: Literal["tiny", "small"] = "small"


# -- evaluators ------------------------------------------------------------------------------
class _DataEval(Strict):
    data: str = Field(description="a folder with {split}.jsonl files, or one .jsonl file")
    split: str = "validation"
    held_out_split: str | None = "test"
    label: str | None = Field(None, description="metric suffix; default: the data's stem")
    limit: int | None = Field(None, ge=1)
    held_out_limit: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)


class EntropyEvalConfig(_DataEval):
    name: Literal["entropy"]
    field: str = "prompt"


class AccuracyEvalConfig(_DataEval):
    name: Literal["accuracy"]
    max_new_tokens: int = Field(32, ge=1)
    stop: tuple[str, ...] = ("\n",)
    normalize: Literal["none", "strip", "lower_strip"] = "strip"


class PerplexityEvalConfig(_DataEval):
    name: Literal["perplexity"]
    field: str = "text"
    max_length: int = Field(512, ge=2)


class LmEvalConfig(Strict):
    name: Literal["lm_eval"]
    tasks: tuple[str, ...] = Field(min_length=1)
    include_path: str | None = None
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | None = Field(None, ge=1)
    held_out_limit: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)
    split: str = "validation"
    held_out_tasks: tuple[str, ...] = ()


class CostEvalConfig(Strict):
    name: Literal["cost"]
    latency: bool = False
    latency_tokens: int = Field(32, ge=1)


EvaluatorConfig = Annotated[
    EntropyEvalConfig | AccuracyEvalConfig | PerplexityEvalConfig | LmEvalConfig | CostEvalConfig,
    Field(discriminator="name"),
]


# -- search ----------------------------------------------------------------------------------
class Bounds(Strict):
    low: float
    high: float
    log: bool = False

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


class ParameterSpaceConfig(Strict):
    name: Literal["parameter"]
    method: str = "ties"
    per_model: bool = True
    layer_groups: int = Field(1, ge=1)
    module_kinds: bool = False
    bounds: dict[str, Bounds] = Field(default_factory=dict)
    fixed: dict[str, Any] = Field(default_factory=dict, description="global method parameters")
    non_layer: Literal["first", "base"] = "first"

    @model_validator(mode="after")
    def _method(self) -> ParameterSpaceConfig:
        _check_method(self.method)
        spec = METHODS[self.method]
        known = set(spec.model_params) | set(spec.global_params)
        for key in self.bounds:
            if key not in known:
                raise ValueError(
                    f"bounds.{key} is not a parameter of {self.method}; allowed: {sorted(known)}"
                )
        flags = set(spec.flags) | set(spec.global_params)
        for key in self.fixed:
            if key not in flags:
                raise ValueError(
                    f"fixed.{key} is not a parameter of {self.method}; allowed: {sorted(flags)}"
                )
        return self


class DFSSpaceConfig(Strict):
    name: Literal["dfs"]
    repeats: int = Field(2, ge=1)
    max_path_length: int | None = Field(None, ge=1)
    scale_bounds: Bounds = Bounds(low=0.5, high=1.5)
    embed_from: str | None = None


SearchSpaceConfig = Annotated[ParameterSpaceConfig | DFSSpaceConfig, Field(discriminator="name")]


class CmaesConfig(Strict):
    name: Literal["cmaes"]
    sigma0: float | None = Field(None, gt=0)
    popsize: int | None = Field(None, ge=2)
    separable: bool = False
    seed: int = 0
    start: Literal["center", "uniform"] = Field(
        "center", description="first mean: the bounds' middle or the uniform-merge baseline"
    )
    restarts: int = Field(0, ge=0)
    inc_popsize: int = Field(2, ge=1)
    restart_patience: int = Field(10, ge=1)


class Nsga2Config(Strict):
    name: Literal["nsga2"]
    population_size: int = Field(16, ge=2)
    seed: int = 0


class TpeConfig(Strict):
    name: Literal["tpe"]
    n_startup_trials: int = Field(10, ge=0)
    seed: int = 0


class RandomConfig(Strict):
    name: Literal["random"]
    seed: int = 0


class GridConfig(Strict):
    name: Literal["grid"]
    points: int = Field(5, ge=2, description="grid points per searched parameter")
    seed: int = 0


SamplerConfig = Annotated[
    CmaesConfig | Nsga2Config | TpeConfig | RandomConfig | GridConfig,
    Field(discriminator="name"),
]


class FidelityConfig(Strict):
    """Successive halving over the fraction of evaluation examples used."""

    fractions: tuple[float, ...] = (0.25, 1.0)
    reduction_factor: int = Field(2, ge=2)

    @model_validator(mode="after")
    def _increasing(self) -> FidelityConfig:
        f = self.fractions
        if not f or any(not 0 < x <= 1 for x in f) or list(f) != sorted(set(f)) or f[-1] != 1.0:
            raise ValueError(f"fractions must increase within (0, 1] and end at 1.0, got {f}")
        return self


class SearchConfig(Strict):
    space: SearchSpaceConfig = ParameterSpaceConfig(name="parameter")
    sampler: SamplerConfig = CmaesConfig(name="cmaes")
    trials: int = Field(32, ge=1)
    baselines: bool = True
    fidelity: FidelityConfig | None = None
    held_out_top_k: int = Field(3, ge=0)


class Objective(Strict):
    metric: str | None = None
    weights: dict[str, float] | None = Field(None, description="weighted mean of several metrics")
    direction: Literal["maximize", "minimize"] = "maximize"

    @model_validator(mode="after")
    def _one(self) -> Objective:
        if (self.metric is None) == (self.weights is None):
            raise ValueError("give exactly one of 'metric' or 'weights'")
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
    workers: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    torch_threads: int = Field(1, ge=1)
    address: str | None = Field(None, description="Ray address; None starts a local Ray")


class AdaMergingConfig(Strict):
    granularity: Literal["task", "layer"] = "layer"
    ties: bool = Field(False, description="AdaMerging++: TIES-trimmed task vectors")
    density: float = Field(0.5, gt=0, le=1)
    init: float = Field(0.3, ge=0, le=1)
    lr: float = Field(1e-3, gt=0)
    steps: int = Field(500, ge=1)
    batch_size: int = Field(16, ge=1)
    seed: int = 0


class JobConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    run_dir: str | None = Field(None, description="default: runs/{name}")
    toy_suite: ToySuiteConfig | None = None
    models: ModelsConfig
    load: LoadConfig = LoadConfig()
    search: SearchConfig = SearchConfig()
    evaluators: tuple[EvaluatorConfig, ...] = Field(min_length=1)
    objectives: tuple[Objective, ...] = Field(min_length=1)
    resources: ResourcesConfig = ResourcesConfig()
    storage: str | None = Field(None, description="Optuna storage URL; default: journal file")
    storage_fsync: bool = Field(
        False, description="fsync every journal record (only an OS crash or power loss can "
        "lose unsynced records; ~1 ms per record)"
    )
    allow_test_split: bool = False
    adamerging: AdaMergingConfig | None = None

    @model_validator(mode="after")
    def _cross_checks(self) -> JobConfig:
        space = self.search.space
        if isinstance(space, ParameterSpaceConfig) and METHODS[space.method].needs_base:
            if self.models.base is None:
                raise ValueError(f"method {space.method!r} needs models.base")
        if not self.allow_test_split:
            for i, ev in enumerate(self.evaluators):
                if getattr(ev, "split", None) == "test":
                    raise ValueError(
                        f"evaluators.{i}.split is 'test': optimising on the test split leaks it "
                        "into the search. Use 'validation', or set allow_test_split: true"
                    )
        multi = len(self.objectives) > 1
        if multi and self.search.sampler.name == "cmaes":
            raise ValueError(
                "cmaes is single-objective; use nsga2 or tpe for several objectives, or "
                "combine the metrics in one objective with 'weights'"
            )
        return self

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")


def parse_job(data: Any, *, source: str = "job config") -> JobConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source} is invalid:\n{format_validation_error(err)}") from None


def load_job(path: str | Path) -> JobConfig:
    """Read and validate a YAML job config."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"job config {str(p)!r} does not exist")
    return parse_job(yaml.safe_load(p.read_text()), source=str(p))
