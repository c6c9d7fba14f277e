"""Perplexity of a causal LM on held-out text: ``exp(total NLL / predicted tokens)``.

Each text is tokenized on its own (with the tokenizer's BOS), cut to ``max_length`` tokens, and
every token after the first is predicted from the ones before it; padding is excluded. Rows hold
``field`` (default ``text``); rows ``{"prompt", "answer"}`` (the toy data) use prompt + answer.

>>> from evomerge.config import PerplexityEvalConfig
>>> cfg = PerplexityEvalConfig(name="perplexity", data="heldout.jsonl")  # doctest: +SKIP
>>> PerplexityEvaluator(cfg).evaluate(model, tokenizer)  # doctest: +SKIP
{'perplexity/heldout': 3.2}
"""

from __future__ import annotations

import math
from typing import Any

import torch

from evomerge.evaluators.base import scored
from evomerge.evaluators.text import TextEvaluator


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of tokens 1..T-1 given their prefixes, padding excluded."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, input_ids[:, 1:, None])[..., 0]
    return (nll * mask[:, 1:].to(nll.dtype)).sum()


class PerplexityEvaluator(TextEvaluator):
    """``evaluate(model, tokenizer) -> {"perplexity/<label>": perplexity}`` (lower is better)
    and the ``scored/`` counts (texts; predicted tokens)."""

    name = "perplexity"

    def evaluate(
        self, model: Any, tokenizer: Any, *, limit: int | None = None
    ) -> dict[str, float]:
        """Perplexity over the first ``limit`` texts (the smaller of ``limit`` and cfg.limit)."""
        total, count = 0.0, 0
        batches = self.batches(model, tokenizer, limit=limit, max_length=self.cfg.max_length)
        with torch.inference_mode():
            for ids, mask in batches:
                logits = model(input_ids=ids, attention_mask=mask).logits
                if logits.dim() != 3:
                    raise TypeError(
                        f"perplexity needs a causal LM (logits batch x tokens x vocab), got "
                        f"logits of shape {tuple(logits.shape)} from {type(model).__name__}"
                    )
                total += float(token_nll(logits, ids, mask))
                count += int(mask[:, 1:].sum())
        if count == 0:
            raise ValueError(
                f"{self.path}: no token to predict; every text is a single token after "
                "tokenization (perplexity needs at least two)"
            )
        tokens = scored(self.label, examples=self.count(limit), tokens=count)
        return {self.metric: math.exp(total / count), **tokens}
