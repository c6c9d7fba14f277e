"""The Ray worker: holds one engine per recipe kind, owns its evaluators, Recipe -> metrics.

The engine of the kind the search produces (ps: a Workspace, models loaded once) is built when
the worker starts; an engine for another kind on the first recipe of that kind
(:mod:`evomerge.engines`); a kind with no engine fails that trial with a ValueError. Evaluators
see only the ``(model, tokenizer)`` an engine returns.

Workers never talk to the study storage; the driver does. A Python exception in ``evaluate``
reaches the driver as a ``RayTaskError`` (that trial fails, the actor lives on); a dead actor
raises ``RayActorError`` and Ray restarts it (``max_restarts=-1``), re-running ``__init__``.
"""

from __future__ import annotations

import functools
import math
import os
import resource
import socket
import time
from pathlib import Path
from typing import Any

from evomerge.config import JobConfig
from evomerge.engines import Engine, engine_factory
from evomerge.recipe import Recipe
from evomerge.search.anchors import fitness_examples

SEARCH_KIND = "ps"  # the kind the parameter space and AdaMerging produce


def search_kind(job: JobConfig) -> str:
    """The recipe kind the job's search space produces (its engine is built at start)."""
    return "dfs" if job.search.space.name == "dfs" else SEARCH_KIND


class MergeWorker:
    """Plain class; :func:`worker_actor_class` wraps it as a Ray actor."""

    def __init__(self, job_json: str) -> None:
        import torch

        from evomerge.evaluators.base import build_evaluator

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if not os.environ.get("EVOMERGE_VERBOSE"):  # `evomerge search -v` keeps them
            quiet_transformers()
        self.job = JobConfig.model_validate_json(job_json)
        torch.set_num_threads(self.job.resources.torch_threads)
        t0 = time.perf_counter()
        self.engines: dict[str, Engine] = {}
        self.engine(search_kind(self.job))  # at start, as the pool expects: a bad model fails
        self.evaluators = [build_evaluator(cfg) for cfg in self.job.evaluators]
        self._held_out: list[Any] | None = None
        self.load_s = time.perf_counter() - t0

    def engine(self, kind: str) -> Engine:
        """The engine for recipe kind ``kind``, built from the job on first use."""
        if kind not in self.engines:
            self.engines[kind] = _build_engine(self.job, kind)
        return self.engines[kind]

    def ping(self) -> dict[str, Any]:
        engine = self.engine(search_kind(self.job))
        info = {"pid": os.getpid(), "load_s": self.load_s, "num_layers": engine.num_layers,
                "peak_rss_mb": peak_rss_mb(), **held_mb(engine),
                "fitness_examples": fitness_examples(self.evaluators)}
        return {**info, "node": _node_id(), "host": socket.gethostname()}

    def evaluate(
        self, recipe_json: str, fraction: float = 1.0, subset: dict[str, Any] | None = None,
        per_example: bool = False,
    ) -> dict[str, Any]:
        """The fitness metrics; ``subset`` (label -> indices, weights) scores those examples
        only; ``per_example`` adds ``result["per_example"]`` (label -> per-example record)."""
        return self._run(recipe_json, self.evaluators, fraction, subset, per_example)

    def evaluate_held_out(self, recipe_json: str) -> dict[str, Any]:
        if self._held_out is None:
            self._held_out = self._build_held_out()
        return self._run(recipe_json, self._held_out, 1.0)

    def _build_held_out(self) -> list[Any]:
        from evomerge.evaluators.base import build_evaluator

        return [
            build_evaluator(held_out_config(cfg), split=getattr(cfg, "held_out_split", "test"))
            for cfg in self.job.evaluators
            if has_held_out(cfg)
        ]

    def _run(
        self, recipe_json: str, evaluators: list[Any], fraction: float,
        subset: dict[str, Any] | None = None, per_example: bool = False,
    ) -> dict[str, Any]:
        recipe = Recipe.from_json(recipe_json)
        started = time.time()  # wall clock: the driver measures the queue time with it
        t0 = time.perf_counter()
        model, tokenizer = self.engine(recipe.kind).apply(recipe)
        t1 = time.perf_counter()
        metrics: dict[str, float] = {}
        vectors: dict[str, Any] | None = {} if per_example else None
        extra: dict[str, Any] = {"per_example": vectors} if per_example else {}
        if subset:
            extra["subset"] = subset
        for ev in evaluators:
            metrics.update(ev.evaluate(model, tokenizer, limit=_limit(ev, fraction), **extra))
        t2 = time.perf_counter()
        trim_heap()
        out = {"metrics": metrics, "merge_s": t1 - t0, "eval_s": t2 - t1, "pid": os.getpid(),
               "started": started, "rss_mb": current_rss_mb(), "peak_rss_mb": peak_rss_mb()}
        return out if vectors is None else {**out, "per_example": vectors}


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``; a no-op
    elsewhere). A merge's or an evaluation's temporaries (the first apply's compile, a
    generation's KV caches) are freed into glibc's arenas, which keep them: ~0.6 GB a SmolLM2
    worker would otherwise hold for the rest of the search. A few milliseconds a trial."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> Any:
    import ctypes
    import ctypes.util

    if os.uname().sysname != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def current_rss_mb() -> float:
    """This process's resident memory now, in MiB (Linux ``/proc``; the peak elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return peak_rss_mb()
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if os.uname().sysname == "Darwin" else 2**10)


def held_mb(engine: Any) -> dict[str, float]:
    """What a Workspace engine holds in MiB by role (``held_model_mb``, ``held_base_mb``,
    ``held_task_vectors_mb``, ``held_caches_mb``); {} for an engine that does not count."""
    counts = getattr(getattr(engine, "workspace", None), "held_bytes", None)
    if counts is None:
        return {}
    return {f"held_{role}_mb": n / 2**20 for role, n in counts().items()}


def quiet_transformers() -> None:
    """Turn off transformers' "Loading weights" bars and info logs in this process."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_warning()


def _node_id() -> str | None:
    """The Ray node this worker runs on (None outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _build_engine(job: JobConfig, kind: str) -> Engine:
    """The engine of ``kind`` over the job's models; a dfs search's over its space's sources
    (the models taking part and its recipes, e.g. the PS winner of phase 1)."""
    factory = engine_factory(kind)
    if kind == "dfs" and job.search.space.name == "dfs":
        from evomerge.search_spaces.dfs import pool_recipe

        return factory.from_recipe(pool_recipe(job.search.space, job.models), load=job.load)
    return factory.from_job(job)


def _limit(evaluator: Any, fraction: float) -> int | None:
    """Examples to use at this fidelity; ``None`` means the evaluator's own limit."""
    if fraction >= 1.0:
        return None
    n = getattr(evaluator, "num_examples", None)
    if n is None:
        return None
    return max(1, math.ceil(fraction * n))


def held_out_config(cfg: Any) -> Any:
    """The evaluator config of the held-out pass: ``limit`` caps the fitness split only; the
    held-out split is scored whole unless ``held_out_limit`` is set."""
    return cfg.model_copy(update={"limit": getattr(cfg, "held_out_limit", None)})


def has_held_out(cfg: Any) -> bool:
    """A held-out split exists for folder data (``{data}/{split}.jsonl``), not for one file;
    lm_eval tasks are re-run on their test split (or on ``held_out_tasks``)."""
    if getattr(cfg, "name", None) == "lm_eval":
        return True
    split = getattr(cfg, "held_out_split", None)
    data = getattr(cfg, "data", None)
    return bool(split) and data is not None and Path(data).is_dir()


def worker_actor_class(job: JobConfig, cls: type = MergeWorker) -> Any:
    """``cls`` as a Ray actor with the job's resources (benchmarks pass a simulated worker)."""
    import ray

    res = job.resources
    return ray.remote(
        num_cpus=res.num_cpus, num_gpus=res.num_gpus, resources=dict(res.custom_resources),
        max_restarts=-1, max_task_retries=0,
    )(cls)
