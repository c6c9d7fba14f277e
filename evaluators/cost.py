"""What a model costs to run: parameter count, decoder layers run, and (optionally) latency.

``cost/layers`` is the number of decoder layers a token passes through: a model that exposes
``num_layers_run`` reports that; any other model reports ``config.num_hidden_layers``. For a
data-flow-space (DFS) candidate, whose path model has one decoder layer per slot, that is the
path length (a layer used twice counts twice), so ``{metric: cost/layers, direction: minimize}``
beside a quality metric gives a quality/depth Pareto front (``configs/dfs_pareto.yaml``).
``cost/params`` counts each tensor once, so a layer used twice on a path counts once.
``cost/ms_per_token`` (with ``latency: true``) is the median over three timed runs of greedy
decoding ``latency_tokens`` tokens at batch 1, after one warm-up run, for ps and dfs models
alike; it is a wall-clock time and so varies from run to run.

>>> from evomerge.config import CostEvalConfig
>>> CostEvaluator(CostEvalConfig(name="cost")).evaluate(model, tokenizer)  # doctest: +SKIP
{'cost/params': 870272.0, 'cost/layers': 4.0}
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from evomerge.evaluators.base import scored

LATENCY_PROMPT = "hello world"
LATENCY_REPEATS = 3  # timed runs, after one warm-up


def count_params(model: Any) -> int:
    """Number of parameters; tied tensors count once."""
    return sum(p.numel() for p in model.parameters())


def layers_run(model: Any) -> int:
    """Decoder layers a token passes through (see module docstring)."""
    n = getattr(model, "num_layers_run", None)
    if n is None:
        config = getattr(model, "config", None)
        n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not isinstance(n, int):
        raise TypeError(
            f"cannot tell how many layers {type(model).__name__} runs: give it an int "
            "'num_layers_run' attribute or a config with 'num_hidden_layers'"
        )
    return n


def ms_per_token(model: Any, tokenizer: Any, *, tokens: int, repeats: int = 3) -> float:
    """Median wall-clock milliseconds per greedily decoded token at batch 1."""
    enc = tokenizer(LATENCY_PROMPT, return_tensors="pt").to(model.device)
    kwargs = dict(
        max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=None,
    )
    times = []
    with torch.inference_mode():
        model.generate(**enc, **kwargs)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(**enc, **kwargs)
            times.append((time.perf_counter() - start) * 1000 / tokens)
    return statistics.median(times)


class CostEvaluator:
    """``evaluate(model, tokenizer) -> {"cost/params", "cost/layers"[, "cost/ms_per_token"]}``
    and the ``scored/`` counts of label ``cost``."""

    name = "cost"

    def __init__(self, cfg: Any, *, split: str | None = None) -> None:
        self.cfg = cfg  # ``split`` is accepted for the protocol; cost reads no data

    def evaluate(
        self, model: Any, tokenizer: Any, *, limit: int | None = None,
        subset: Any = None, per_example: Any = None,
    ) -> dict[str, float]:
        """Cost metrics; ``limit``, ``subset`` and ``per_example`` do not apply (no examples
        are read).

        The ``scored/`` counts are 0 examples and the tokens decoded to time the latency
        (``(1 + LATENCY_REPEATS) * latency_tokens`` with ``latency: true``, else 0).
        """
        out = {"cost/params": float(count_params(model)), "cost/layers": float(layers_run(model))}
        tokens = 0
        if self.cfg.latency:
            if not hasattr(model, "generate"):
                raise TypeError(
                    f"latency needs a model with .generate(); {type(model).__name__} has none. "
                    "Set latency: false"
                )
            out["cost/ms_per_token"] = ms_per_token(
                model, tokenizer, tokens=self.cfg.latency_tokens, repeats=LATENCY_REPEATS
            )
            tokens = (1 + LATENCY_REPEATS) * self.cfg.latency_tokens
        return {**out, **scored("cost", examples=0, tokens=tokens)}
