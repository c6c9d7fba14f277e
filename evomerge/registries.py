"""The extension-point registries, filled with lazy import strings (nothing heavy imported)."""

from __future__ import annotations

from evomerge.registry import Registry

MERGE_METHODS = Registry("merge method")
for _name in (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "slerp",
):
    MERGE_METHODS.register(_name, f"evomerge.merge_methods:{_name}")

SEARCH_SPACES = Registry("search space")
SEARCH_SPACES.register("parameter", "evomerge.search_spaces.parameter:ParameterSpace")

EVALUATORS = Registry("evaluator")
EVALUATORS.register("entropy", "evomerge.evaluators.entropy:EntropyEvaluator")
EVALUATORS.register("accuracy", "evomerge.evaluators.accuracy:AccuracyEvaluator")
EVALUATORS.register("lm_eval", "evomerge.evaluators.lm_eval:LmEvalEvaluator")
EVALUATORS.register("perplexity", "evomerge.evaluators.perplexity:PerplexityEvaluator")
EVALUATORS.register("cost", "evomerge.evaluators.cost:CostEvaluator")

SAMPLERS = Registry("sampler")
for _name in ("cmaes", "nsga2", "tpe", "random", "grid"):
    SAMPLERS.register(_name, f"evomerge.samplers:make_{_name}")
