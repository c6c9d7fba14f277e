"""Mean Shannon entropy of a model's predictions on unlabeled prompts (lower is more confident).

For a causal LM the value is the mean, over every real (non-padding) token of every prompt, of
the entropy of the next-token distribution at that token. For a sequence classifier it is the
mean entropy of the class distribution per prompt. Natural log (nats): uniform logits over V
classes give ``log V``, a one-hot prediction gives 0.

Entropy rewards confidence, not correctness: report a labeled metric beside it.

>>> from evomerge.config import EntropyEvalConfig
>>> cfg = EntropyEvalConfig(name="entropy", data="toy_suite/data/reverse")  # doctest: +SKIP
>>> EntropyEvaluator(cfg).evaluate(model, tokenizer)  # doctest: +SKIP
{'entropy/reverse': 0.41}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from evomerge.evaluators.base import (
    Subset,
    per_example_record,
    scored,
    subset_of,
    weighted_mean,
)
from evomerge.evaluators.text import TextEvaluator, model_max_length

Positions = Literal["prompt", "last", "answer"]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) over the last dimension, computed in float32; differentiable."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def prediction_entropy(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Summed entropy of the model's predictions on one right-padded batch, and their count.

    Causal LM (logits ``B x T x V``): one distribution per real token; classifier (``B x C``):
    one per row.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    h = entropy(logits)
    if h.dim() == 1:  # a sequence classifier: one distribution per row
        return h.sum(), h.numel()
    mask = attention_mask.to(h.dtype)
    return (h * mask).sum(), int(attention_mask.sum())


class EntropyEvaluator(TextEvaluator):
    """``evaluate(model, tokenizer) -> {"entropy/<label>": mean entropy in nats}`` and the
    ``scored/`` counts (prompts; tokens whose predictions were scored)."""

    name = "entropy"

    def evaluate(
        self, model: Any, tokenizer: Any, *, limit: int | None = None,
        subset: Subset | None = None, per_example: dict[str, Any] | None = None,
    ) -> dict[str, float]:
        """Mean entropy over the first ``limit`` prompts (the smaller of ``limit``, cfg.limit),
        or over the prompts ``subset[label]`` names, weighted (a prompt's weight times its
        tokens); ``per_example`` gets each prompt's mean entropy and token count."""
        chosen = subset_of(subset, self.label, self.num_examples, limit)
        texts = None if chosen is None else [self.texts[i] for i in chosen[0]]
        batches = self.batches(model, tokenizer, limit=limit, max_length=model_max_length(model),
                               texts=texts)
        sums: list[float] = []
        counts: list[float] = []
        with torch.inference_mode():
            for ids, mask in batches:
                s, n = prediction_entropy_rows(model, ids, mask)
                sums += s
                counts += n
        weights = [1.0] * len(sums) if chosen is None else chosen[1]
        means = [s / n for s, n in zip(sums, counts, strict=True)]
        if per_example is not None:
            per_example[self.label] = per_example_record(means, counts)
        return {self.metric: weighted_mean(means, weights, counts),
                **scored(self.label, examples=len(sums), tokens=int(sum(counts)))}


def prediction_entropy_rows(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[list[float], list[float]]:
    """:func:`prediction_entropy` per row: summed entropy and count of each row."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    h = entropy(logits)
    if h.dim() == 1:
        return h.tolist(), [1.0] * h.numel()
    mask = attention_mask.to(h.dtype)
    return (h * mask).sum(-1).tolist(), mask.sum(-1).tolist()


# -- entropy at chosen positions, under substituted parameters (AdaMerging's loss) -------------
def forward_with(model: Any, params: Mapping[str, Tensor]) -> Callable[..., Any]:
    """``model``'s forward with ``params`` in place of its own (``functional_call``)."""
    return lambda **kw: torch.func.functional_call(model, dict(params), args=(), kwargs=kw)


def scored_batch(
    model: Any, params: Mapping[str, Tensor], tokenizer: Any, prompts: Sequence[str],
    positions: Positions,
) -> tuple[Tensor, Tensor]:
    """Right-padded token ids and a 0/1 mask of the positions whose predictions are scored.

    ``prompt``: every prompt token; ``last``: the last prompt token (it predicts the answer's
    first token); ``answer``: the prompt followed by the merged model's own greedy answer and a
    newline, scoring the positions that predict them.
    """
    seqs = [tokenizer(p)["input_ids"] for p in prompts]
    if positions == "prompt":
        spans = [(0, len(s)) for s in seqs]
    elif positions == "last":
        spans = [(len(s) - 1, len(s)) for s in seqs]
    elif positions == "answer":
        from evomerge.evaluators.accuracy import generate

        with torch.no_grad():
            answers = generate(_Functional(model, params), tokenizer, list(prompts),
                               max_new_tokens=32, stop=("\n",))
        tails = [tokenizer(a + "\n", add_special_tokens=False)["input_ids"] for a in answers]
        spans = [(len(s) - 1, len(s) + len(t) - 1) for s, t in zip(seqs, tails, strict=True)]
        seqs = [s + t for s, t in zip(seqs, tails, strict=True)]
    else:
        raise ValueError(f"positions must be 'prompt', 'last' or 'answer', got {positions!r}")
    ids = right_pad(seqs, int(tokenizer.pad_token_id))
    pick = torch.zeros_like(ids)
    for i, (lo, hi) in enumerate(spans):
        pick[i, lo:hi] = 1
    return ids, pick


def right_pad(seqs: Sequence[Sequence[int]], pad: int) -> Tensor:
    """Token lists as one right-padded ``(B, T)`` tensor."""
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids


class _Functional:
    """Looks like the model to a generation loop but runs with the given parameters."""

    def __init__(self, model: Any, params: Mapping[str, Tensor]) -> None:
        self.device = model.device
        self._forward = forward_with(model, {k: v.detach() for k, v in params.items()})

    def __call__(self, **kwargs: Any) -> Any:
        return self._forward(**kwargs)


def mean_entropy(model: Any, params: Mapping[str, Tensor], ids: Tensor, pick: Tensor) -> Tensor:
    """Mean entropy of the predictions at the ``pick`` positions of right-padded ``ids``
    (padding comes after every picked position, so causal attention needs no mask)."""
    h = entropy(forward_with(model, params)(input_ids=ids).logits)
    return (h * pick).sum() / pick.sum()
