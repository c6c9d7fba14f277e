"""The extension-point registries, filled with lazy import strings (nothing heavy imported).

Merge methods are :class:`evomerge.merge.methods_spec.MethodSpec` objects (pure data, their kernels
lazy), declared and registered in :mod:`evomerge.merge.methods_spec`.
"""

from __future__ import annotations

from evomerge.merge.methods_spec import METHODS as MERGE_METHODS
from evomerge.registry import Registry

__all__ = ["EVALUATORS", "MERGE_METHODS", "SAMPLERS", "SEARCH_SPACES"]

SEARCH_SPACES = Registry("search space")
SEARCH_SPACES.register("parameter", "evomerge.search_spaces.parameter:ParameterSpace")
SEARCH_SPACES.register("dfs", "evomerge.search_spaces.dfs:DFSSpace")

EVALUATORS = Registry("evaluator")
EVALUATORS.register("entropy", "evomerge.evaluators.entropy:EntropyEvaluator")
EVALUATORS.register("accuracy", "evomerge.evaluators.accuracy:AccuracyEvaluator")
EVALUATORS.register("lm_eval", "evomerge.evaluators.lm_eval:LmEvalEvaluator")
EVALUATORS.register("perplexity", "evomerge.evaluators.perplexity:PerplexityEvaluator")
EVALUATORS.register("cost", "evomerge.evaluators.cost:CostEvaluator")

SAMPLERS = Registry("sampler")
for _name in ("cmaes", "nsga2", "tpe", "random", "grid", "gp"):
    SAMPLERS.register(_name, f"evomerge.search.samplers:make_{_name}")
