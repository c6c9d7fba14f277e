"""The Ray worker: loads the models once (a Workspace), owns its evaluators, Recipe -> metrics.

Workers never talk to the study storage; the driver does. A Python exception in ``evaluate``
reaches the driver as a ``RayTaskError`` (that trial fails, the actor lives on); a dead actor
raises ``RayActorError`` and Ray restarts it (``max_restarts=-1``), re-running ``__init__``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from evomerge.config import JobConfig
from evomerge.recipe import Recipe


class MergeWorker:
    """Plain class; :func:`worker_actor_class` wraps it as a Ray actor."""

    def __init__(self, job_json: str) -> None:
        import torch

        from evomerge.evaluators.base import build_evaluator
        from evomerge.workspace import Workspace

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.job = JobConfig.model_validate_json(job_json)
        torch.set_num_threads(self.job.resources.torch_threads)
        models = self.job.models
        t0 = time.perf_counter()
        self.workspace = Workspace(
            models.sources(), "base" if models.base is not None else None, load=self.job.load
        )
        self.evaluators = [build_evaluator(cfg) for cfg in self.job.evaluators]
        self._held_out: list[Any] | None = None
        self.load_s = time.perf_counter() - t0

    def ping(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "load_s": self.load_s, "num_layers": self.workspace.num_layers}

    def evaluate(self, recipe_json: str, fraction: float = 1.0) -> dict[str, Any]:
        return self._run(recipe_json, self.evaluators, fraction)

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

    def _run(self, recipe_json: str, evaluators: list[Any], fraction: float) -> dict[str, Any]:
        recipe = Recipe.from_json(recipe_json)
        t0 = time.perf_counter()
        model = self.workspace.apply(recipe)
        t1 = time.perf_counter()
        metrics: dict[str, float] = {}
        for ev in evaluators:
            metrics.update(
                ev.evaluate(model, self.workspace.tokenizer, limit=_limit(ev, fraction))
            )
        t2 = time.perf_counter()
        return {"metrics": metrics, "merge_s": t1 - t0, "eval_s": t2 - t1, "pid": os.getpid()}


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
        num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_restarts=-1, max_task_retries=0
    )(cls)
